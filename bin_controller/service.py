"""`smartbin run`: the service. Real pins and camera, or (--simulate) the simulator's.

Start-up order matters to systemd: READY=1 is sent only when camera, model, pins and
store are up. The sorting loop's heartbeat feeds the watchdog. SIGTERM lets the current
item finish, rests the flap, publishes `offline`, closes the store and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from typing import Any

from bin_controller.assembly import Bin, build_bin
from bin_controller.bins import BINS
from bin_controller.config import FAST_MECHANICS, load_config, merge
from bin_controller.overrides import cli_overrides
from bin_controller.sdnotify import Notifier, heartbeat_fresh

log = logging.getLogger("smartbin")


def _status_line(smartbin: Bin) -> str:
    loop = smartbin.loop
    counts = smartbin.store.snapshot() if smartbin.store else {"total": 0, **dict.fromkeys(
        BINS, 0)}
    faults = f", faults {sum(loop.fault_counts.values())}" if loop.fault_counts else ""
    detail = f" ({loop.state_detail})" if loop.state_detail else ""
    return (f"{loop.state}{detail}; sorted {counts['total']} (recyclable "
            f"{counts['recyclable']}, kitchen {counts['kitchen']}, hazardous "
            f"{counts['hazardous']}, other {counts['other']}){faults}")


def service_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's changes to the config file, merged in before validation.
    --simulate swaps in the simulator's camera and mock pins, and a person dropping items."""
    overrides = cli_overrides(args)
    if args.simulate:
        sim = {"camera": {"type": "simulated"}, "hardware": {"pin_factory": "mock"},
               "simulator": {"drop_interval_s": args.sim_interval,
                             "drop_items": args.sim_items or 0, "seed": args.seed,
                             "hang_camera_at": args.sim_hang_camera}}
        if args.sim_fast:
            sim = merge(sim, FAST_MECHANICS)
        overrides = merge(sim, overrides)
    return overrides


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cfg = load_config(args.config, service_overrides(args))
    notifier = Notifier()
    with build_bin(cfg) as smartbin:
        loop = smartbin.loop

        def on_signal(signum: int, _frame: object) -> None:
            log.info("%s: finishing the current item, then stopping",
                     signal.Signals(signum).name)
            notifier.stopping(f"stopping; {_status_line(smartbin)}")
            loop.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        loop.on_event.append(lambda e: log.info(
            "sorted #%d %s -> %s (%.0f%%)%s", e.seq, e.label_en or e.label or "?", e.bin,
            (e.bin_confidence or 0) * 100, " uncertain" if e.uncertain else
            (" failed" if e.failed else "")))
        if notifier.enabled:  # the status line costs a count query: only for systemd
            loop.on_event.append(lambda e: notifier.status(_status_line(smartbin)))
            loop.on_state.append(lambda s, d: notifier.status(_status_line(smartbin)))
        smartbin.start()
        watchdog = notifier.start_watchdog(heartbeat_fresh(lambda: loop.heartbeat))
        try:
            bundle = smartbin.classifier.bundle
            log.info("bin %s ready in %.2f s: model %s %s (%s), sensor %s, camera %s, mqtt %s",
                     cfg.bin.id, time.monotonic() - started, bundle.name, bundle.version,
                     smartbin.classifier.backend, cfg.sensor.type, cfg.camera.type,
                     f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.enabled else "off")
            notifier.ready(_status_line(smartbin))
            loop.run()
            # The loop has finished its item; leave the flap at rest and released.
            smartbin.flap.rest()
            log.info("stopped: %s", _status_line(smartbin))
        finally:
            watchdog.set()
    return 0
