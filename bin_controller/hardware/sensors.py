"""Presence sensing through gpiozero: IR break-beam, ultrasonic distance or PIR motion."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from gpiozero import Factory

from bin_controller.config import SensorSection


class GpioPresenceSensor:
    """Wraps a gpiozero input device; reports edges with their monotonic time."""

    def __init__(self, device: Any, *, inverted: bool = False,
                 on_edge: Callable[[bool], None] | None = None) -> None:
        self.device = device
        self.inverted = inverted
        self._callbacks: list[Callable[[bool, float], None]] = []
        self._clear = threading.Event()
        self._on_edge = on_edge
        if not self.present:
            self._clear.set()
        device.when_activated = lambda *_: self._edge(not inverted)
        device.when_deactivated = lambda *_: self._edge(inverted)

    def _edge(self, present: bool) -> None:
        t = time.monotonic()
        if self._on_edge:
            self._on_edge(present)
        if present:
            self._clear.clear()
        else:
            self._clear.set()
        for cb in list(self._callbacks):
            cb(present, t)

    @property
    def present(self) -> bool:
        return bool(self.device.is_active) != self.inverted

    def on_change(self, callback: Callable[[bool, float], None]) -> None:
        self._callbacks.append(callback)

    def wait_for_clear(self, timeout: float | None) -> bool:
        return self._clear.wait(timeout)

    def close(self) -> None:
        self.device.when_activated = None
        self.device.when_deactivated = None
        self.device.close()


def make_sensor(cfg: SensorSection, pin_factory: Factory) -> GpioPresenceSensor:
    from gpiozero import DigitalInputDevice, DistanceSensor, MotionSensor

    if cfg.type == "beam":
        # Receivers are open-collector: with the pull-up a broken beam reads low.
        device = DigitalInputDevice(cfg.pin, pull_up=cfg.beam_broken_level == "low",
                                    pin_factory=pin_factory)
        return GpioPresenceSensor(device)
    if cfg.type == "pir":
        device = MotionSensor(cfg.pin, pin_factory=pin_factory)
        return GpioPresenceSensor(device)
    with warnings.catch_warnings():
        # gpiozero suggests pigpio for echo timing; at a 20 cm threshold lgpio is plenty.
        warnings.simplefilter("ignore")
        device = DistanceSensor(echo=cfg.echo_pin, trigger=cfg.trigger_pin,
                                max_distance=cfg.max_distance_m,
                                threshold_distance=cfg.threshold_m, queue_len=3,
                                pin_factory=pin_factory)
    near, far = cfg.threshold_m, cfg.threshold_m + cfg.hysteresis_m

    def hysteresis(present: bool) -> None:
        # gpiozero has one threshold; widening it while an item is present gives hysteresis.
        device.threshold_distance = far if present else near

    # gpiozero's "active" for a distance sensor means out of range: no item on the flap.
    return GpioPresenceSensor(device, inverted=True, on_edge=hysteresis)
