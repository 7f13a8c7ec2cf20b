"""The compartments under the flap: how much lies in each, and the fill sensors above them.

Every item that lands takes its volume (see hardware_sim.items.item_volume) in the
compartment it fell into. With `fill.sensor = "ultrasonic"` each compartment has an
HC-SR04 on the mock pins, whose echo follows the physical fill with gaussian noise:
distance = empty_m - fill / capacity * (empty_m - full_m). A sheet over a sensor makes it
read a few centimetres; emptying a compartment sets its fill to 0.

An item that lands on a compartment already at or above `fill.full_pct` of its capacity is
counted in `sorted_onto_full`: what the fill levels are there to prevent.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPWMPin, MockTriggerPin

from bin_controller.bins import BINS
from bin_controller.config import Config

SPEED_OF_SOUND = 343.0
NOISE_M = 0.01  # an HC-SR04 over a heap of rubbish: about a centimetre
COVERED_M = 0.04  # a sheet lying on the sensor's horn
NEAREST_M = 0.02  # an HC-SR04 sees nothing nearer


# State changes a mock pin remembers (gpiozero's keep all: 30 a second per sensor).
PIN_HISTORY = 100


class _ShortMemoryPin(MockPWMPin):
    def _change_state(self, value):
        changed = super()._change_state(value)
        if len(self.states) > 2 * PIN_HISTORY:
            del self.states[:-PIN_HISTORY]
        return changed


class _EchoPin(_ShortMemoryPin):
    """An echo line whose edges carry the times the sound really took: the mock's own
    timestamps come from thread sleeps, off by milliseconds (tens of centimetres) on a
    busy machine."""

    stamp: float | None = None

    def _change_state(self, value):
        changed = super()._change_state(value)
        if changed and self.stamp is not None:
            self._last_change = self.stamp
        return changed


class _FillTriggerPin(MockTriggerPin, _ShortMemoryPin):
    """A trigger that asks its compartment how far the contents are, at every ping."""

    distance: Callable[[], float] | None = None

    def _echo(self):
        distance = self.distance() if self.distance is not None else 1.0
        echo = self.echo_pin
        time.sleep(0.001)
        rise = time.monotonic()
        echo.stamp = rise
        echo.drive_high()
        time.sleep(2 * distance / SPEED_OF_SOUND)
        echo.stamp = rise + 2 * distance / SPEED_OF_SOUND
        echo.drive_low()
        echo.stamp = None


class Compartments:
    """The physical fill of each compartment, and its fill sensor."""

    def __init__(self, cfg: Config, pin_factory: MockFactory) -> None:
        self.fill_cfg = cfg.fill
        self.capacity_l = {b: float(cfg.fill.capacity_l[b]) for b in BINS}
        self.fill_l = dict.fromkeys(BINS, 0.0)
        self.landed = dict.fromkeys(BINS, 0)
        self.sorted_onto_full = dict.fromkeys(BINS, 0)
        self.covered: set[str] = set()
        self.emptyings = dict.fromkeys(BINS, 0)
        self._noise = random.Random(cfg.simulator.seed)
        self._lock = threading.Lock()
        self.triggers: dict[str, _FillTriggerPin] = {}
        if cfg.fill.sensor == "ultrasonic":
            self._setup_pins(pin_factory)

    def _setup_pins(self, pin_factory: MockFactory) -> None:
        # Made before the controller opens its DistanceSensors, so that gpiozero hands
        # those the pins that answer.
        f = self.fill_cfg
        for b in BINS:
            echo = pin_factory.pin(int(f.echo_pins[b]), pin_class=_EchoPin)
            trigger = pin_factory.pin(int(f.trigger_pins[b]), pin_class=_FillTriggerPin,
                                      echo_pin=echo)
            trigger.distance = lambda b=b: self.distance_m(b)
            self.triggers[b] = trigger

    # ------------------------------------------------------------------ physics

    def pct(self, bin_name: str) -> float:
        with self._lock:
            return 100.0 * self.fill_l[bin_name] / self.capacity_l[bin_name]

    def distance_m(self, bin_name: str) -> float:
        """What the sensor above `bin_name` measures now."""
        f = self.fill_cfg
        with self._lock:
            if bin_name in self.covered:
                return COVERED_M + self._noise.gauss(0.0, NOISE_M / 4)
            share = self.fill_l[bin_name] / self.capacity_l[bin_name]
            distance = f.empty_m - share * (f.empty_m - f.full_m) + self._noise.gauss(0.0,
                                                                                      NOISE_M)
        return max(NEAREST_M, distance)

    def land(self, bin_name: str, volume_l: float) -> None:
        """An item fell into `bin_name`."""
        with self._lock:
            full_l = self.fill_cfg.full_pct / 100.0 * self.capacity_l[bin_name]
            if self.fill_l[bin_name] >= full_l:
                self.sorted_onto_full[bin_name] += 1
            self.fill_l[bin_name] += volume_l
            self.landed[bin_name] += 1

    def empty(self, bin_name: str) -> float:
        """The operator takes the bag out; returns the litres removed."""
        with self._lock:
            removed, self.fill_l[bin_name] = self.fill_l[bin_name], 0.0
            self.emptyings[bin_name] += 1
        return removed

    def cover(self, bin_name: str) -> None:
        with self._lock:
            self.covered.add(bin_name)

    def uncover(self, bin_name: str) -> None:
        with self._lock:
            self.covered.discard(bin_name)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"fill_l": dict(self.fill_l), "sorted_onto_full": dict(self.sorted_onto_full),
                    "covered": sorted(self.covered)}

    def restore(self, data: dict[str, Any]) -> None:
        with self._lock:
            for b in BINS:
                self.fill_l[b] = float(data.get("fill_l", {}).get(b, 0.0))
                self.sorted_onto_full[b] = int(data.get("sorted_onto_full", {}).get(b, 0))
            self.covered = {b for b in data.get("covered", []) if b in BINS}
