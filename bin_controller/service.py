"""`smartbin run`: the sorting loop on real hardware, wired from the configuration."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from contextlib import ExitStack
from typing import Any

from bin_controller.app import apply_overrides, attach, open_store
from bin_controller.classifier import Classifier
from bin_controller.config import Config, load_config
from bin_controller.errors import SmartbinError
from bin_controller.flap import Flap, Gate
from bin_controller.pins import make_pin_factory
from bin_controller.sensors import make_sensor
from bin_controller.sorter import SortingLoop

log = logging.getLogger("smartbin")


def build_loop(cfg: Config, stack: ExitStack, *, camera: Any = None,
               pin_factory: Any = None) -> SortingLoop:
    """Every part of the bin, opened in the order of the cycle and closed in reverse."""
    if cfg.camera.type == "simulated" and camera is None:
        raise SmartbinError("camera.type = 'simulated' works only under 'smartbin simulate'")
    factory = pin_factory or make_pin_factory(cfg.hardware.pin_factory)
    sensor = make_sensor(cfg.sensor, factory)
    stack.callback(sensor.close)
    if camera is None:
        from bin_controller.camera import PiCamera

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


def run(args: argparse.Namespace) -> int:
    cfg = apply_overrides(load_config(args.config), args)
    with ExitStack() as stack:
        loop = build_loop(cfg, stack)
        telemetry = attach(cfg, loop, loop.recorder)
        if telemetry is not None:
            stack.callback(telemetry.stop)
        stopping = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: stopping after the current item", signum)
            stopping.set()
            loop.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        loop.on_event.append(lambda e: log.info("sorted #%d %s -> %s (%.0f%%)", e.seq,
                                                e.label_en or e.label, e.bin,
                                                (e.confidence or 0) * 100))
        log.info("bin %s ready: model %s %s", cfg.bin.id, loop.classifier.bundle.name,
                 loop.classifier.bundle.version)
        loop.run()
    return 0
