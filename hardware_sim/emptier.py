"""The person who empties the simulated bin's compartments.

When the bin says a compartment is full (its fill tracker's state: the `full` alert), this
person comes after `delay_s` and takes the bag out. With fill sensors that is all: the bin
sees the level drop. Without (or when the sensor cannot see the drop, a sheet lying on it),
they press "emptied", as the button in Home Assistant or the dashboard does
(`FillTracker.emptied(bin, source="command")`). A bin paused by `fill.when_full = "pause"`
is resumed once nothing is full any more. A sheet over a fill sensor, once the bin reports
it (`fill_sensor` fault), is lifted off after the same delay.
"""

from __future__ import annotations

import logging
import threading
import time

from bin_controller.bins import BINS
from bin_controller.domain import Fault
from bin_controller.fill import FillTracker
from bin_controller.sorter import SortingLoop
from hardware_sim.mechanics import SimBin

log = logging.getLogger(__name__)

# How often the person looks at the bin when nothing has told them to.
LOOK_S = 0.05
# With sensors, how many sensor readings the person waits for the bin to notice an
# emptying before pressing the button after all.
NOTICE_READINGS = 20


class Emptier:
    def __init__(self, world: SimBin, fill: FillTracker, loop: SortingLoop,
                 delay_s: float) -> None:
        self.world, self.fill, self.loop = world, fill, loop
        self.delay_s = delay_s
        self.emptied: list[str] = []
        self._due: dict[str, float] = {}  # compartment -> when the person empties it
        self._lift: dict[str, float] = {}  # covered sensor -> when the sheet is lifted
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-emptier", daemon=True)
        fill.on_full.append(lambda bin_name, pct: self._wake.set())
        loop.on_fault.append(self._on_fault)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _on_fault(self, fault: Fault) -> None:
        if fault.kind == "fill_sensor":
            for b in BINS:
                if b in self.world.compartments.covered:
                    self._lift.setdefault(b, time.monotonic() + self.delay_s)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(LOOK_S)
            self._wake.clear()
            now = time.monotonic()
            for b in BINS:
                if self.fill.is_full(b):
                    self._due.setdefault(b, now + self.delay_s)
            for b, at in sorted(self._lift.items()):
                if at <= now:
                    del self._lift[b]
                    log.info("the operator lifts the sheet off the fill sensor of %s", b)
                    self.world.uncover_sensor(b)
            for b, at in sorted(self._due.items()):
                if at <= now:
                    del self._due[b]
                    self._empty(b)
            # Only fill.when_full = "pause" pauses a simulated bin.
            if (self.fill.cfg.when_full == "pause" and self.loop.status()["paused"]
                    and not any(self.fill.is_full(b) for b in BINS)):
                log.info("the operator resumes the bin")
                self.loop.resume()

    def _empty(self, bin_name: str) -> None:
        removed = self.world.empty(bin_name)
        log.info("the operator empties %s (%.1f l)", bin_name, removed)
        self.emptied.append(bin_name)
        if self.fill.sensors:
            wait_s = NOTICE_READINGS * self.fill.cfg.interval_s
            deadline = time.monotonic() + wait_s
            while self.fill.is_full(bin_name) and time.monotonic() < deadline:
                if self._stop.wait(min(LOOK_S, self.fill.cfg.interval_s)):
                    return
            if not self.fill.is_full(bin_name):
                return  # the sensor saw it
        self.fill.emptied(bin_name, source="command")
