"""How full each compartment is: sensor readings checked against an estimate from the items.

Every item counted adds its volume (its label's `volume_l` from the bundle, else the bin's
`fill.item_volume_l`) to the compartment it reached: the estimate. A sensor (ultrasonic or
time of flight, `fill.sensor`), read every `fill.interval_s` and smoothed by a median, is
trusted when it is plausible and then re-anchors the estimate; a reading far above the
estimate (`fill.fault_gap_pct`: the last good reading plus the items sorted since) is a
sensor fault, a sheet over the sensor, not a full compartment, and the estimate carries on.
A level that falls by `fill.emptied_drop_pct` means the compartment was emptied (or
`emptied()` says so: a command or a button).

States with hysteresis: `warn` from `fill.warn_pct`, `full` from `fill.full_pct`, each left
only `fill.hysteresis_pct` below. The loop asks `is_full` before it tips an item; what
happens then is `fill.when_full` (see sorter.py). The state is kept in `fill.json` in the
state folder, so a full compartment is still full after a restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bin_controller.bins import BINS
from bin_controller.config import FillSection
from bin_controller.domain import SortEvent

log = logging.getLogger(__name__)

FILL_FILE = "fill.json"
OK, WARN, FULL = "ok", "warn", "full"
# Levels kept per compartment for the fill rate (one per change): a day of a busy bin.
HISTORY = 500
# The fill rate is taken over at most this much of the recent history.
RATE_WINDOW_S = 6 * 3600.0
# A reading this soon after an item landed is not used: the heap still settles, and the
# sensor's own average still holds pings from before the item.
SETTLE_S = 0.5
# A sensor may give nothing this long after the tracker starts (no echo averaged yet)
# before that is its fault.
WARMUP_S = 3.0


class FillSensor(Protocol):
    """One compartment's distance sensor, looking down at the contents."""

    def distance_m(self) -> float | None:
        """The distance to the contents now; None when the sensor gives no reading."""
        ...

    def close(self) -> None: ...


@dataclass
class Compartment:
    """What is known about one compartment; saved in fill.json."""

    estimate_l: float = 0.0
    state: str = OK
    items: int = 0  # items sorted into it since it was last emptied
    emptied_at: float | None = None
    full_events: int = 0
    emptied_events: int = 0
    sensor_fault: bool = False
    sensor_pct: float | None = None  # the smoothed reading, when there is a sensor
    added_since_reading_l: float = 0.0  # volume sorted in since the last good reading
    margin_l: float = 0.0  # of estimate_l: fill.estimate_margin_pct of the items since then


@dataclass(frozen=True)
class Emptied:
    bin: str
    time: float
    pct_before: float
    items: int
    source: str  # "sensor" or "command"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Trend:
    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))


class FillTracker:
    """The loop's FillGauge (`is_full`, `added`); thread-safe."""

    def __init__(self, cfg: FillSection, state_dir: str | Path, *,
                 sensors: Mapping[str, FillSensor] | None = None,
                 volume_of: Callable[[str | None], float | None] = lambda label: None) -> None:
        self.cfg = cfg
        self.path = Path(state_dir) / FILL_FILE
        self.sensors = dict(sensors or {})
        self.volume_of = volume_of  # a label's volume from the running bundle, or None
        self.on_change: list[Callable[[], None]] = []
        self.on_emptied: list[Callable[[Emptied], None]] = []
        self.on_full: list[Callable[[str, float], None]] = []
        self.on_sensor_fault: list[Callable[[str, str], None]] = []
        self._lock = threading.RLock()
        self._readings: dict[str, deque[float]] = {
            b: deque(maxlen=cfg.smoothing) for b in self.sensors}
        self._trend = {b: _Trend() for b in BINS}
        self._last_item = dict.fromkeys(BINS, float("-inf"))  # monotonic time
        self._born = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bins, fresh = self._load()
        # A compartment never read before adopts its first reading (a bin fitted to
        # half-full compartments), instead of calling it a fault.
        self._adopt = set(self.sensors) if fresh else set()

    # ------------------------------------------------------------------ state

    def _load(self) -> tuple[dict[str, Compartment], bool]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {b: Compartment() for b in BINS}, True
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s); fill levels start again from the sensors "
                        "and the items sorted from now on", self.path, exc)
            return {b: Compartment() for b in BINS}, True
        out = {}
        for b in BINS:
            entry = raw.get(b) if isinstance(raw, dict) else None
            try:
                out[b] = Compartment(**entry) if isinstance(entry, dict) else Compartment()
            except TypeError:
                out[b] = Compartment()
            if out[b].state not in (OK, WARN, FULL):
                out[b].state = OK
        return out, False

    def _save(self) -> None:
        """Atomic (a crash leaves the old file or the new one); not fsynced on every item:
        after a power cut the estimate may lag a few items, which the sensors correct."""
        data = {b: asdict(c) for b, c in self.bins.items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop the sorting
            log.warning("%s cannot be written: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ------------------------------------------------------------------ levels

    def pct(self, bin_name: str) -> float:
        """The fused level: the estimate, re-anchored by every plausible reading."""
        with self._lock:
            c = self.bins[bin_name]
            return min(100.0, max(0.0, 100.0 * c.estimate_l / self.cfg.capacity_l[bin_name]))

    def is_full(self, bin_name: str) -> bool:
        with self._lock:
            return self.bins[bin_name].state == FULL

    def volume(self, event: SortEvent) -> float:
        return self.volume_of(event.label) or self.cfg.item_volume_l[event.bin]

    def added(self, event: SortEvent) -> None:
        """An item landed in `event.bin` (counted): its volume raises the estimate."""
        with self._lock:
            c = self.bins[event.bin]
            size = self.volume(event)
            # Items differ from their label's typical volume (a crushed can, a whole box):
            # fill.estimate_margin_pct keeps a compartment called not full from being full.
            margin = size * self.cfg.estimate_margin_pct / 100.0
            c.estimate_l += size + margin
            c.margin_l += margin
            c.added_since_reading_l += size
            c.items += 1
            self._last_item[event.bin] = time.monotonic()
            if event.bin in self._readings:
                # Readings from before the item describe a level without it: a median over
                # them would pull the level back down below what is in there now.
                self._readings[event.bin].clear()
            changed = self._update_state(event.bin)
            self._save()
        self._notify(changed)

    def _update_state(self, bin_name: str) -> list[tuple[str, float]]:
        """Apply the thresholds with hysteresis; the compartments that became full."""
        c = self.bins[bin_name]
        pct = self.pct(bin_name)
        self._trend[bin_name].points.append((time.time(), pct))
        cfg = self.cfg
        if c.state == FULL:
            if pct < cfg.full_pct - cfg.hysteresis_pct:
                c.state = WARN if pct >= cfg.warn_pct - cfg.hysteresis_pct else OK
        elif pct >= cfg.full_pct:
            c.state = FULL
            c.full_events += 1
            return [(bin_name, pct)]
        elif c.state == WARN:
            if pct < cfg.warn_pct - cfg.hysteresis_pct:
                c.state = OK
        elif pct >= cfg.warn_pct:
            c.state = WARN
        return []

    def _notify(self, became_full: list[tuple[str, float]]) -> None:
        for bin_name, pct in became_full:
            for cb in self.on_full:
                cb(bin_name, pct)
        for change in self.on_change:
            change()

    # ------------------------------------------------------------------ emptying

    def emptied(self, bin_name: str, *, source: str = "command") -> Emptied:
        """The compartment was emptied: the estimate starts again (the counts stay)."""
        with self._lock:
            c = self.bins[bin_name]
            event = Emptied(bin_name, time.time(), round(self.pct(bin_name), 1), c.items, source)
            c.estimate_l = 0.0
            c.added_since_reading_l = 0.0
            c.margin_l = 0.0
            c.items = 0
            c.emptied_at = event.time
            c.emptied_events += 1
            self._trend[bin_name].points.clear()
            if bin_name in self._readings and source == "command":
                # Readings from before the emptying would drag the median up for a while.
                self._readings[bin_name].clear()
            self._update_state(bin_name)
            self._save()
        log.info("compartment %s emptied (%s): it was %.0f %% full with %d items", bin_name,
                 source, event.pct_before, event.items)
        for cb in self.on_emptied:
            cb(event)
        self._notify([])
        return event

    # ------------------------------------------------------------------ sensors

    def poll(self) -> None:
        """Read every sensor once and fuse the readings with the estimates."""
        for bin_name, sensor in self.sensors.items():
            try:
                distance = sensor.distance_m()
            except Exception as exc:  # a failing sensor is one compartment's problem
                log.debug("fill sensor %s: %s", bin_name, exc)
                distance = None
            self._reading(bin_name, distance)

    def _reading(self, bin_name: str, distance: float | None) -> None:
        cfg = self.cfg
        emptied = False
        became_full: list[tuple[str, float]] = []
        fault: str | None = None
        with self._lock:
            c = self.bins[bin_name]
            now = time.monotonic()
            if now - self._last_item[bin_name] < SETTLE_S:
                return
            if distance is None and now - self._born < WARMUP_S:
                return
            if distance is None:
                fault = "gives no reading"
            else:
                span = cfg.empty_m - cfg.full_m
                raw = min(100.0, max(0.0, 100.0 * (cfg.empty_m - distance) / span))
                window = self._readings[bin_name]
                window.append(raw)
                smoothed = statistics.median(window)
                c.sensor_pct = round(smoothed, 1)
                estimate = self.pct(bin_name)
                # What the items make of the last good reading, without the margin: an
                # emptying is a drop from there (the margin alone must not look like one).
                expected = 100.0 * (c.estimate_l - c.margin_l) / cfg.capacity_l[bin_name]
                if bin_name in self._adopt:
                    self._adopt.discard(bin_name)
                    self._anchor(c, bin_name, smoothed)
                elif smoothed - estimate > cfg.fault_gap_pct:
                    fault = (f"reads {smoothed:.0f} % full but only {estimate:.0f} % is "
                             "accounted for by the items sorted: something covers the sensor")
                elif expected - smoothed >= cfg.emptied_drop_pct:
                    emptied = True
                else:
                    self._anchor(c, bin_name, smoothed)
            if fault is None and c.sensor_fault:
                c.sensor_fault = False
                log.warning("fill sensor %s reads plausibly again", bin_name)
            new_fault = fault is not None and not c.sensor_fault
            if fault is not None:
                c.sensor_fault = True
            if not emptied:
                became_full = self._update_state(bin_name)
            self._save()
        if emptied:
            self.emptied(bin_name, source="sensor")
            self._anchor_locked(bin_name)
        if new_fault and fault is not None:
            for cb in self.on_sensor_fault:
                cb(bin_name, f"fill sensor {bin_name} {fault}")
        self._notify(became_full)

    def _anchor(self, c: Compartment, bin_name: str, pct: float) -> None:
        c.estimate_l = pct / 100.0 * self.cfg.capacity_l[bin_name]
        c.added_since_reading_l = 0.0
        c.margin_l = 0.0

    def _anchor_locked(self, bin_name: str) -> None:
        """After an emptying the sensor saw: the level is what it reads now."""
        with self._lock:
            c = self.bins[bin_name]
            window = self._readings[bin_name]
            if window:
                latest = window[-1]
                window.clear()
                window.append(latest)
                self._anchor(c, bin_name, latest)
                self._update_state(bin_name)
                self._save()

    # ------------------------------------------------------------------ reading out

    def rate_pct_per_h(self, bin_name: str) -> float | None:
        """How fast it has been filling lately, from its recent levels."""
        with self._lock:
            points = [p for p in self._trend[bin_name].points
                      if p[0] >= time.time() - RATE_WINDOW_S]
        if len(points) < 2 or points[-1][0] - points[0][0] < 1.0:
            return None
        (t0, p0), (t1, p1) = points[0], points[-1]
        rate = (p1 - p0) / (t1 - t0) * 3600.0
        return rate if rate > 0 else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per compartment: level, state, source, sensor fault, items, time to full."""
        out = {}
        with self._lock:
            for b, c in self.bins.items():
                pct = self.pct(b)
                rate = self.rate_pct_per_h(b)
                full_in = None
                if rate and pct < self.cfg.full_pct:
                    full_in = round((self.cfg.full_pct - pct) / rate * 3600.0)
                out[b] = {"pct": round(pct, 1), "state": c.state,
                          "source": "sensor" if b in self.sensors and not c.sensor_fault
                          else "estimate",
                          "sensor_fault": c.sensor_fault, "sensor_pct": c.sensor_pct,
                          "items": c.items, "capacity_l": self.cfg.capacity_l[b],
                          "full_in_s": full_in, "emptied_at": c.emptied_at,
                          "full_events": c.full_events, "emptied_events": c.emptied_events}
        return out

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if not self.sensors:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fill-sensors", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.cfg.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for sensor in self.sensors.values():
            with contextlib.suppress(Exception):
                sensor.close()
