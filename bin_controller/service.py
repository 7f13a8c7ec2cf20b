"""`smartbin run`: the service. Real pins and camera, or (--simulate) the simulator's.

Start-up order matters to systemd: READY=1 is sent only when camera, model, pins and
store are up. The sorting loop's heartbeat feeds the watchdog. SIGTERM lets the current
item finish, rests the flap, publishes `offline`, closes the store and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from contextlib import ExitStack
from typing import Any

import numpy as np

from bin_controller.app import attach, cli_overrides, open_store
from bin_controller.config import Config, load_config
from bin_controller.errors import SmartbinError
from bin_controller.hardware.flap import Flap, Gate
from bin_controller.hardware.pins import make_pin_factory
from bin_controller.hardware.sensors import make_sensor
from bin_controller.sdnotify import Notifier, heartbeat_fresh
from bin_controller.sorter import SortingLoop
from bin_controller.vision.classifier import Classifier

log = logging.getLogger("smartbin")


def build_loop(cfg: Config, stack: ExitStack, *, camera: Any = None,
               pin_factory: Any = None) -> SortingLoop:
    """Every part of the bin, opened in the order of the cycle and closed in reverse."""
    if cfg.camera.type == "simulated" and camera is None:
        raise SmartbinError("camera.type = 'simulated' needs 'smartbin run --simulate' or "
                            "'smartbin simulate'")
    factory = pin_factory or make_pin_factory(cfg.hardware.pin_factory)
    sensor = make_sensor(cfg.sensor, factory)
    stack.callback(sensor.close)
    if camera is None:
        from bin_controller.hardware.camera import PiCamera

        camera = PiCamera(cfg.camera, factory)
    stack.callback(camera.close)
    classifier = Classifier(cfg.model.bundle, backend=cfg.model.backend,
                            num_threads=cfg.model.threads, backbone=cfg.model.backbone or None)
    flap = Flap(cfg.flap, factory)
    stack.callback(flap.close)
    gate = None
    if cfg.gate.enabled:
        gate = Gate(cfg.gate, factory)
        stack.callback(gate.close)
    store = open_store(cfg)
    stack.callback(store.close)
    return SortingLoop(config=cfg, sensor=sensor, camera=camera, classifier=classifier,
                       flap=flap, recorder=store, gate=gate)


class _Feeder:
    """--simulate: a person dropping a generated item every few seconds."""

    def __init__(self, sim: Any, interval_s: float, limit: int | None, seed: int) -> None:
        from hardware_sim.sources import GeneratedSource

        self.sim, self.interval_s, self.limit = sim, interval_s, limit
        self.source = GeneratedSource(seed)
        self.stop = threading.Event()
        self.dropped = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            if self.limit is not None and self.dropped >= self.limit:
                return
            if self.sim.platform:
                continue  # wait for the flap to be clear, as a person would
            item = self.source.items(1)[0]
            item.id = self.dropped = self.dropped + 1
            self.sim.drop(item)


class _HangingCamera:
    """--sim-hang-camera N: the Nth capture never returns (what the watchdog is for)."""

    def __init__(self, inner: Any, hang_at: int) -> None:
        self.inner, self.hang_at, self.calls = inner, hang_at, 0

    def capture(self) -> np.ndarray:
        self.calls += 1
        if self.calls == self.hang_at:
            threading.Event().wait()
        return self.inner.capture()

    def close(self) -> None:
        self.inner.close()


def _status_line(loop: SortingLoop) -> str:
    counts = loop.recorder.snapshot()
    faults = f", faults {sum(loop.fault_counts.values())}" if loop.fault_counts else ""
    detail = f" ({loop.state_detail})" if loop.state_detail else ""
    return (f"{loop.state}{detail}; sorted {counts['total']} (recyclable "
            f"{counts['recyclable']}, kitchen {counts['kitchen']}, hazardous "
            f"{counts['hazardous']}, other {counts['other']}){faults}")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cfg = load_config(args.config, cli_overrides(args))
    notifier = Notifier()
    with ExitStack() as stack:
        feeder = None
        if args.simulate:
            from hardware_sim.mechanics import SimBin, SimCamera, Timing
            from hardware_sim.simulate import sim_config

            cfg = sim_config(cfg, fast=args.sim_fast)
            sim = SimBin(cfg, Timing.fast() if args.sim_fast else Timing())
            stack.callback(sim.close)
            camera: Any = SimCamera(sim)
            if args.sim_hang_camera:
                camera = _HangingCamera(camera, args.sim_hang_camera)
            loop = build_loop(cfg, stack, camera=camera, pin_factory=sim.pin_factory)
            sim.sync_sensor()
            feeder = _Feeder(sim, args.sim_interval, args.sim_items, args.seed)
        else:
            loop = build_loop(cfg, stack)
        telemetry = attach(cfg, loop, loop.recorder)
        if telemetry is not None:
            stack.callback(telemetry.stop)

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("%s: finishing the current item, then stopping",
                     signal.Signals(signum).name)
            notifier.stopping(f"stopping; {_status_line(loop)}")
            loop.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        loop.on_event.append(lambda e: log.info(
            "sorted #%d %s -> %s (%.0f%%)%s", e.seq, e.label_en or e.label or "?", e.bin,
            (e.bin_confidence or 0) * 100, " uncertain" if e.uncertain else
            (" failed" if e.failed else "")))
        if notifier.enabled:  # the status line costs a count query: only for systemd
            loop.on_event.append(lambda e: notifier.status(_status_line(loop)))
            loop.on_state.append(lambda s, d: notifier.status(_status_line(loop)))
        watchdog = notifier.start_watchdog(heartbeat_fresh(lambda: loop.heartbeat))
        stack.callback(watchdog.set)
        bundle = loop.classifier.bundle
        log.info("bin %s ready in %.2f s: model %s %s (%s), sensor %s, mqtt %s", cfg.bin.id,
                 time.monotonic() - started, bundle.name, bundle.version,
                 loop.classifier.backend, cfg.sensor.type,
                 f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.enabled else "off")
        notifier.ready(_status_line(loop))
        if feeder is not None:
            threading.Thread(target=feeder.run, name="sim-feeder", daemon=True).start()
            stack.callback(feeder.stop.set)
        loop.run()
        # The loop has finished its item; leave the flap at rest and released.
        loop.flap.rest()
        log.info("stopped: %s", _status_line(loop))
    return 0
