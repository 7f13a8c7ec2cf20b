"""Runs the real sorting loop against the simulated bin and reports what landed where."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.assembly import build_bin, make_classifier
from bin_controller.bins import BINS
from bin_controller.config import FAST_MECHANICS, Config, merge
from bin_controller.domain import SortEvent, State
from bin_controller.errors import ConfigError
from bin_controller.fill import Emptied
from bin_controller.memory_recorder import MemoryRecorder
from bin_controller.parts import ImageClassifier, Recorder
from bin_controller.sorter import SortingLoop
from bin_controller.vision.bundle import Bundle
from bin_controller.vision.classifier import Prediction
from hardware_sim.emptier import Emptier
from hardware_sim.mechanics import SimBin, SimCamera, SimItem

log = logging.getLogger(__name__)


@dataclass
class Faults:
    """Which items meet trouble (1-based item numbers)."""

    jam: set[int] = field(default_factory=set)
    camera_fail: dict[int, int] = field(default_factory=dict)  # item -> failed captures
    slow_classifier_s: dict[int, float] = field(default_factory=dict)
    double_drop: set[int] = field(default_factory=set)  # the next item drops mid-sort
    jam_clear_s: float = 0.5  # how long before the operator clears a jam (after the fault)
    classifier_fail: dict[int, int] = field(default_factory=dict)  # item -> failed calls
    disk_full: dict[int, int] = field(default_factory=dict)  # from item -> for n items
    cover_sensor: dict[int, str] = field(default_factory=dict)  # item -> compartment whose
    # fill sensor a sheet covers from that item on (the operator lifts it once reported)


class _SlowClassifier:
    """Wraps the classifier to delay chosen items, or to fail on them."""

    def __init__(self, inner: ImageClassifier) -> None:
        self.inner = inner
        self.delay_s = 0.0
        self.fail_next = 0  # calls that raise, as a broken interpreter would

    @property
    def bundle(self) -> Bundle:
        return self.inner.bundle

    @property
    def backend(self) -> str:
        return self.inner.backend

    def classify_array(self, frame: np.ndarray) -> Prediction:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("simulated classifier failure")
        return self.inner.classify_array(frame)


# Seconds between fill sensor readings in a fast simulation.
FAST_FILL_INTERVAL_S = 0.05
# The operator empties a full compartment this long after the alert (real-time mechanics).
EMPTY_AFTER_S = 3.0


def sim_config(cfg: Config, fast: bool = False, world: Path | None = None) -> Config:
    """`cfg` on the simulator: its camera and world on gpiozero's mock pins."""
    overrides: dict[str, Any] = {"camera": {"type": "simulated"},
                                 "hardware": {"pin_factory": "mock"}}
    if fast:
        overrides = merge(overrides, FAST_MECHANICS)
    if world is not None:
        overrides = merge(overrides, {"simulator": {"world_dir": str(world)}})
    if fast and cfg.fill.interval_s > FAST_FILL_INTERVAL_S:
        # Items come every few milliseconds: the fill sensors must keep up.
        overrides = merge(overrides, {"fill": {"interval_s": FAST_FILL_INTERVAL_S}})
    return cfg.with_overrides(overrides)


@dataclass
class SimResult:
    items: list[SimItem]
    events: list[SortEvent]
    loop: SortingLoop
    seconds: float
    timed_out: bool = False
    fill: dict[str, Any] | None = None

    def report(self) -> dict[str, Any]:
        routed = dict.fromkeys(BINS, 0)
        for e in self.events:
            routed[e.bin] += 1
        correct = sum(1 for i in self.items if i.compartment == i.true_bin)
        cycles = [e.cycle_ms for e in self.events if not e.error or "double" not in e.error]
        decisions = [e.decision_ms for e in self.events if e.decision_ms > 0]
        n = len(self.items)
        return {
            "items": [
                {
                    "n": i.id, "true_class": i.true_class, "true_bin": i.true_bin,
                    "label": i.events[0].label if i.events else None,
                    "label_en": i.events[0].label_en if i.events else None,
                    "confidence": i.events[0].confidence if i.events else None,
                    "bin": i.events[0].bin if i.events else None,
                    "compartment": i.compartment,
                    "uncertain": bool(i.events and i.events[0].uncertain),
                    "failed": bool(i.events and i.events[0].failed),
                    "seq": i.events[0].seq if i.events else None,
                }
                for i in self.items
            ],
            "routed": routed,
            "counted": len(self.events),
            "correct": correct,
            "bin_accuracy": round(correct / n, 4) if n else None,
            "uncertain": sum(1 for e in self.events if e.uncertain),
            "failed": sum(1 for e in self.events if e.failed),
            "faults": dict(self.loop.fault_counts),
            "cycle_ms": _pcts(cycles),
            "decision_ms": _pcts(decisions),
            "seconds": round(self.seconds, 2),
            "timed_out": self.timed_out,
            **({"fill": self.fill} if self.fill is not None else {}),
        }


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 2),
            "p95": round(float(np.percentile(values, 95)), 2)}


class Simulation:
    """The bin built from a simulator config, its loop turning in a thread, and a person
    who drops items on it one after another (as `drop`)."""

    def __init__(self, cfg: Config, *, classifier: ImageClassifier | None = None,
                 recorder: Recorder | None = None, empty_after_s: float | None = None,
                 emptier: bool = True) -> None:
        if cfg.camera.type != "simulated":
            raise ConfigError("a simulation needs camera.type = 'simulated' (see sim_config)")
        self.classifier = _SlowClassifier(classifier or make_classifier(cfg.model))
        self.bin = build_bin(cfg, classifier=self.classifier, recorder=recorder)
        camera = self.bin.camera
        assert isinstance(camera, SimCamera)  # what the registry builds for "simulated"
        self.camera = camera
        self.world: SimBin = camera.sim
        self.loop = self.bin.loop
        self.events: list[SortEvent] = []
        self._changed = threading.Condition()
        self.loop.on_event.append(self._on_event)
        self.loop.on_state.append(self._notify)
        self.world.on_land.append(self._notify)
        self._items: list[SimItem] = []
        self._thread = threading.Thread(target=self.loop.run, name="sorting-loop", daemon=True)
        self.started = time.monotonic()
        self._page_limit: int | None = None  # the database's own limit while the disk is full
        self.world.label_volumes = {label.name: label.volume_l
                                    for label in self.classifier.bundle.labels
                                    if label.volume_l is not None}
        self.fill = self.bin.fill  # None with a recorder other than the SQLite store
        self.full_events = dict.fromkeys(BINS, 0)
        self.emptied_events = dict.fromkeys(BINS, 0)
        self.sensor_faults = dict.fromkeys(BINS, 0)
        self.on_emptied: list[Callable[[Emptied], None]] = []
        self.emptier: Emptier | None = None
        if self.fill is not None:
            self.fill.on_full.append(self._on_full)
            self.fill.on_emptied.append(self._on_emptied)
            self.fill.on_sensor_fault.append(self._on_sensor_fault)
            if emptier:
                if empty_after_s is None:
                    empty_after_s = 0.0 if cfg.simulator.fast else EMPTY_AFTER_S
                self.emptier = Emptier(self.world, self.fill, self.loop, empty_after_s)

    def __enter__(self) -> Simulation:
        self.bin.start()
        self.started = time.monotonic()
        self._thread.start()
        if self.emptier is not None:
            self.emptier.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.emptier is not None:
            self.emptier.stop()
        self.loop.stop()
        self._thread.join(timeout=10)
        self.bin.close()

    # A full disk, as SQLite sees it: the count database may not grow past its present size
    # (what `PRAGMA max_page_count` does), until free_disk().
    def fill_disk(self) -> None:
        store = self.bin.store
        if store is None or self._page_limit is not None:
            return
        self._page_limit = int(store.db.execute("PRAGMA max_page_count").fetchone()[0])
        pages = int(store.db.execute("PRAGMA page_count").fetchone()[0])
        store.db.execute(f"PRAGMA max_page_count = {pages}")
        log.warning("simulated disk full: the count database is held at %d pages", pages)

    def free_disk(self) -> None:
        store = self.bin.store
        if store is None or self._page_limit is None:
            return
        store.db.execute(f"PRAGMA max_page_count = {self._page_limit}")
        self._page_limit = None
        log.warning("simulated disk full: space is back")

    def _on_full(self, bin_name: str, pct: float) -> None:
        self.full_events[bin_name] += 1
        self._notify()

    def _on_emptied(self, event: Emptied) -> None:
        self.emptied_events[event.bin] += 1
        for cb in self.on_emptied:
            cb(event)
        self._notify()

    def _on_sensor_fault(self, bin_name: str, detail: str) -> None:
        self.sensor_faults[bin_name] += 1

    def fill_report(self) -> dict[str, Any] | None:
        """Per compartment: the bin's level at the end, its full alerts and emptyings in
        this run, and the items that landed on a compartment already full (must be 0)."""
        if self.fill is None:
            return None
        levels = self.fill.snapshot()
        world = self.world.compartments
        redirected = dict.fromkeys(BINS, 0)
        for e in self.events:
            if e.redirected_from:
                redirected[e.redirected_from] += 1
        return {
            "sensor": self.fill.cfg.sensor, "when_full": self.fill.cfg.when_full,
            "full_pct": self.fill.cfg.full_pct,
            "sensor_faults": sum(self.sensor_faults.values()),
            **{b: {
                "final_pct": levels[b]["pct"], "state": levels[b]["state"],
                "physical_pct": round(world.pct(b), 1),
                "capacity_l": levels[b]["capacity_l"],
                "full_events": self.full_events[b], "emptied_events": self.emptied_events[b],
                "sorted_onto_full": world.sorted_onto_full[b],
                "redirected_from": redirected[b], "sensor_faults": self.sensor_faults[b],
            } for b in BINS},
        }

    def _on_event(self, event: SortEvent) -> None:
        with self._changed:
            self.events.append(event)
            if event.error and event.error.startswith("double drop"):
                waiting = [i for i in self._items if i.passed_unsorted and not i.events]
                if waiting:
                    waiting[0].events.append(event)
            else:
                for item in self.world.sorting:
                    item.events.append(event)
                self.world.sorting = []
            self._changed.notify_all()

    def _notify(self, *_: object) -> None:
        with self._changed:
            self._changed.notify_all()

    def drop(self, items: list[SimItem], *, faults: Faults | None = None,
             on_item: Callable[[SimItem], None] | None = None, item_timeout_s: float = 60.0,
             pace_s: float = 0.0) -> SimResult:
        """Drop the items one after another and wait for each to land."""
        faults = faults or Faults()
        self._items = items
        loop, sim, changed = self.loop, self.world, self._changed
        timed_out = False
        # Whatever still lies on the flap from before (a restarted controller) is sorted
        # first (or, jammed, cleared by the operator once reported); a person waits for a
        # clear flap before dropping the next item.
        if any(i.jam for i in sim.platform):
            _clear_jam_when_reported(loop, sim, faults.jam_clear_s, changed, item_timeout_s)
        with changed:
            changed.wait_for(lambda: not sim.platform and loop.state == State.IDLE,
                             timeout=item_timeout_s)
        pending_double: SimItem | None = None
        for index, item in enumerate(items):
            number = index + 1
            if item is pending_double:
                continue  # already dropped on top of the previous one
            item.jam = number in faults.jam
            self.camera.fail_next = faults.camera_fail.get(number, 0)
            self.classifier.delay_s = faults.slow_classifier_s.get(number, 0.0)
            self.classifier.fail_next = faults.classifier_fail.get(number, 0)
            if number in faults.cover_sensor:
                sim.cover_sensor(faults.cover_sensor[number])
            if number in faults.disk_full:
                self.fill_disk()
            elif any(at + n == number for at, n in faults.disk_full.items()):
                self.free_disk()
            batch = [item]
            if number in faults.double_drop and index + 1 < len(items):
                second = items[index + 1]
                pending_double = second
                batch.append(second)

                def drop_second(second: SimItem = second) -> None:
                    sim.on_tip.remove(drop_second)
                    sim.drop(second)

                sim.on_tip.append(drop_second)
            for dropped in batch:
                sim.remember(dropped)
            if pace_s:
                time.sleep(pace_s)  # the next person walks up to the bin
            sim.drop(item)
            if item.jam:
                _clear_jam_when_reported(loop, sim, faults.jam_clear_s, changed, item_timeout_s)
            ok = _wait_done(batch, loop, changed, item_timeout_s)
            for done in batch:
                if on_item:
                    on_item(done)
            if not ok:
                timed_out = True
                log.error("item %s did not finish: %s", [i.id for i in batch],
                          [(i.compartment, len(i.events)) for i in batch] + [loop.state,
                                                                            len(sim.platform)])
                break
        if faults.disk_full:
            self.free_disk()  # an episode running past the last item ends with the run
        return SimResult(items, list(self.events), loop, time.monotonic() - self.started,
                         timed_out, self.fill_report())


def run_simulation(
    cfg: Config,
    items: list[SimItem],
    classifier: ImageClassifier | None = None,
    *,
    fast: bool = False,
    faults: Faults | None = None,
    recorder: Recorder | None = None,
    on_item: Callable[[SimItem], None] | None = None,
    on_loop: Callable[[SortingLoop], None] | None = None,
    item_timeout_s: float = 60.0,
    pace_s: float = 0.0,
) -> SimResult:
    """Simulate `items` dropped onto the bin `cfg` describes (counts in memory unless a
    recorder is given)."""
    with Simulation(sim_config(cfg, fast), classifier=classifier,
                    recorder=recorder or MemoryRecorder()) as simulation:
        if on_loop:
            on_loop(simulation.loop)
        return simulation.drop(items, faults=faults, on_item=on_item,
                               item_timeout_s=item_timeout_s, pace_s=pace_s)


def _wait_done(batch: list[SimItem], loop: SortingLoop, changed: threading.Condition,
               timeout: float) -> bool:
    """Until every item of the batch has landed and been counted, and the loop is idle."""
    def done() -> bool:
        return all(i.compartment and i.events for i in batch) and loop.state == State.IDLE

    with changed:
        return changed.wait_for(done, timeout=timeout)


def _clear_jam_when_reported(loop: SortingLoop, sim: SimBin, after_s: float,
                             changed: threading.Condition, timeout: float) -> None:
    with changed:
        changed.wait_for(lambda: loop.state == State.FAULT, timeout=timeout)
    time.sleep(after_s)
    sim.clear_jam()
