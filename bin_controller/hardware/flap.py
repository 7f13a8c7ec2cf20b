"""The servo flap that tips an item into its compartment, and the optional chute gate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gpiozero import Factory

from bin_controller.config import FlapSection, GateSection


class ServoFlap:
    """An AngularServo with an angle per bin; released after each move so it cannot jitter."""

    def __init__(self, cfg: FlapSection, pin_factory: Factory) -> None:
        from gpiozero import AngularServo

        self.cfg = cfg
        self._lock = threading.Lock()
        self.servo = AngularServo(
            cfg.pin, initial_angle=cfg.rest_angle, min_angle=cfg.min_angle,
            max_angle=cfg.max_angle, min_pulse_width=cfg.min_pulse_s,
            max_pulse_width=cfg.max_pulse_s, pin_factory=pin_factory,
        )
        time.sleep(cfg.move_s)
        self.servo.detach()

    def angle_for(self, bin_name: str) -> float:
        return self.cfg.angles[bin_name]

    def sort(self, bin_name: str, *, on_commanded: Callable[[], None] | None = None) -> None:
        """Tip to the bin, hold while the item slides off, return to rest, release."""
        with self._lock:
            self.servo.angle = self.cfg.angles[bin_name]
            if on_commanded:
                on_commanded()
            time.sleep(self.cfg.move_s + self.cfg.hold_s)
            self.servo.angle = self.cfg.rest_angle
            time.sleep(self.cfg.move_s)
            self.servo.detach()

    def move_to(self, angle: float, *, hold: bool = False) -> None:
        """Calibration: go to a raw angle (released afterwards unless hold)."""
        if not self.cfg.min_angle <= angle <= self.cfg.max_angle:
            raise ValueError(f"angle {angle} outside {self.cfg.min_angle}..{self.cfg.max_angle}")
        with self._lock:
            self.servo.angle = angle
            time.sleep(self.cfg.move_s)
            if not hold:
                self.servo.detach()

    def rest(self) -> None:
        self.move_to(self.cfg.rest_angle)

    def close(self) -> None:
        self.servo.close()


class ServoGate:
    """Optional second servo above the flap: closed while an item is being sorted."""

    def __init__(self, cfg: GateSection, pin_factory: Factory) -> None:
        from gpiozero import AngularServo

        self.cfg = cfg
        self.servo = AngularServo(cfg.pin, initial_angle=cfg.open_angle, min_angle=-90,
                                  max_angle=90, pin_factory=pin_factory)
        self.is_open = True

    def close_gate(self) -> None:
        self._move(self.cfg.closed_angle)
        self.is_open = False

    def open_gate(self) -> None:
        self._move(self.cfg.open_angle)
        self.is_open = True

    def _move(self, angle: float) -> None:
        self.servo.angle = angle
        time.sleep(self.cfg.move_s)
        self.servo.detach()

    def close(self) -> None:
        self.servo.close()
