"""What a dashboard sees on subscribing: availability, counts, last item, state, fill,
discovery; plus faults as they happen and periodic stats.

Retained state goes at QoS 0 on purpose: paho re-sends unacknowledged QoS 1 messages after a
reconnect, and a stale count arriving after a fresh one would become the retained value.
Every connect republishes all of it anyway (`republish`).

With a site log, `counts` and `stats` carry its contamination. The sorting thread never
queries it (a review commits under the site log's lock with a full fsync): an event
publishes the counts with the contamination last read, and a short tick reads it again
when items were logged or another process (`smartbin review`) wrote to the log, and
publishes `counts` again when it changed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bin_controller import __version__
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.mqtt.connection import Connection
from bin_controller.payloads import (
    AVAILABILITY,
    COUNTS,
    FAULT,
    FILL,
    LAST,
    OFFLINE,
    ONLINE,
    STATE,
    STATS,
    JsonObject,
    JsonValue,
    bin_count_payloads,
    counts_payload,
    fault_payload,
    fill_payload,
    last_payload,
    state_payload,
    stats_report,
    to_json,
)

log = logging.getLogger(__name__)

RECENT_EVENTS = 200  # enough for cycle percentiles and an hour's rate at normal use
# How soon a review made by another process (the `smartbin review` command writes the site
# log directly) reaches the retained counts: one cheap `PRAGMA data_version` per tick.
POLL_S = 0.5
# An item reaches the site log on the photo writer's thread shortly after its event: the
# contamination (its `items`) is read again on every tick until this long after an event.
LOGGING_GRACE_S = 2.0

Status = Callable[[], Mapping[str, JsonValue]]
# The fill levels now (FillTracker.snapshot).
FillLevels = Callable[[], Mapping[str, Mapping[str, object]]]


class RetainedStore(Protocol):
    def snapshot(self) -> Mapping[str, int]: ...

    def last_event(self) -> SortEvent | None: ...

    def outbox_size(self) -> int: ...


class Reviewed(Protocol):
    """The site log, as far as the retained state reads it."""

    def contamination(self) -> dict[str, Any]: ...

    def data_version(self) -> int: ...


@dataclass(frozen=True)
class _Reading:
    started: float  # monotonic, when the read began
    version: int  # the site log's data_version then
    value: JsonObject


def cpu_temperature() -> float | None:
    try:
        raw = Path("/sys/class/thermal/thermal_zone0/temp").read_text()
        return round(int(raw.strip()) / 1000, 1)
    except (OSError, ValueError):
        return None


class RetainedState:
    def __init__(self, conn: Connection, store: RetainedStore, base: str, *,
                 status: Status, stats_interval_s: float,
                 discovery: Mapping[str, JsonObject] | None = None,
                 reviewed: Reviewed | None = None,
                 photo_stats: Callable[[], Mapping[str, JsonValue]] | None = None,
                 fill: FillLevels | None = None) -> None:
        self.conn = conn
        self.store = store
        self.base = base
        self.status = status
        self.stats_interval_s = stats_interval_s
        self.discovery: Mapping[str, JsonObject] = discovery or {}
        self.reviewed = reviewed
        self.photo_stats = photo_stats
        self.fill = fill
        # Read and publish under one lock, like the counts: levels changed by the loop,
        # the sensor thread and a command reach the broker in the order they were read.
        self._fill_lock = threading.Lock()
        # Snapshot, contamination and publish under one lock: counts published from the
        # loop, a command, the tick and a connect reach the broker in the order they were
        # read, so the retained value is the newest.
        self._counts_lock = threading.Lock()
        self._contamination: JsonObject | None = None
        self._version: int | None = None
        self._event_at = -math.inf  # when the last item was counted (monotonic)
        self._read_at = -math.inf  # when the contamination was last read
        # The loop's state and detail as last told; `state` is built from them and the
        # status read at publish time, under one lock, so the retained one is the newest.
        self._state_lock = threading.Lock()
        self._state: tuple[State, str] = (State.IDLE, "")
        self._recent: deque[SortEvent] = deque(maxlen=RECENT_EVENTS)
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _publish(self, suffix: str, payload: str, *, retain: bool = True) -> None:
        self.conn.publish(f"{self.base}/{suffix}", payload, retain=retain)

    # ------------------------------------------------------------------ on every connect

    def republish(self) -> None:
        self.conn.publish(f"{self.base}/{AVAILABILITY}", ONLINE, qos=1, retain=True)
        self.publish_state()
        self.publish_counts(refresh=True)
        last = self.store.last_event()
        if last:
            self._publish(LAST, last_payload(last))
        self.publish_fill()
        self.publish_discovery()
        # Once now, so a dashboard (and Home Assistant's diagnostic sensors, when it already
        # listens) need not wait stats_interval_s for the first figures.
        self.publish_stats()

    def publish_fill(self) -> None:
        """The fill levels as they are now (from any thread); nothing without a tracker."""
        if self.fill is None:
            return
        with self._fill_lock:
            self._publish(FILL, fill_payload(self.fill()))

    def on_fill(self) -> None:
        """A level or state changed: only while connected (every connect publishes it)."""
        if self.conn.connected.is_set():
            self.publish_fill()

    def publish_counts(self, *, refresh: bool = False) -> None:
        """The counts; with `refresh`, the contamination read again first (never on the
        sorting thread)."""
        reading = self._read_contamination() if refresh else None
        with self._counts_lock:
            if reading is not None:
                self._keep(reading)
            snapshot = self.store.snapshot()
            self._publish(COUNTS, counts_payload(snapshot, self._contamination))
            for suffix, payload in bin_count_payloads(snapshot).items():
                self._publish(suffix, payload)

    def _read_contamination(self) -> _Reading | None:
        """Read outside the counts lock, so the sorting thread's publish never waits on the
        site log; None when it cannot be read (the counts go out with the last value)."""
        if self.reviewed is None:
            return None
        started = time.monotonic()
        try:
            version = self.reviewed.data_version()
            fresh: JsonObject = self.reviewed.contamination()
        except Exception as exc:
            log.warning("the site log cannot be read for the contamination: %s", exc)
            return None
        return _Reading(started, version, fresh)

    def _keep(self, reading: _Reading) -> bool:
        """Under the counts lock: keep the reading unless a later one is kept already (two
        threads may read at once); whether the contamination changed."""
        if reading.started < self._read_at:
            return False
        self._read_at, self._version = reading.started, reading.version
        changed = reading.value != self._contamination
        self._contamination = reading.value
        return changed

    def poll_reviews(self) -> None:
        """Publish `counts` again when the contamination changed: items were logged, or
        another process wrote to the site log (its data_version moved)."""
        if self.reviewed is None or not self.conn.connected.is_set():
            return
        try:
            version = self.reviewed.data_version()
        except Exception as exc:
            log.debug("site log data_version: %s", exc)
            return
        if version == self._version and self._event_at < self._read_at - LOGGING_GRACE_S:
            return
        reading = self._read_contamination()
        if reading is None:
            return
        with self._counts_lock:
            if self._keep(reading):
                snapshot = self.store.snapshot()
                self._publish(COUNTS, counts_payload(snapshot, self._contamination))

    def publish_discovery(self) -> None:
        for topic, config in self.discovery.items():
            self.conn.publish(topic, to_json(config), retain=True)

    def announce_offline(self, timeout: float = 3.0) -> None:
        """Say goodbye before a clean disconnect (the last will covers the unclean one)."""
        if not self.conn.connected.is_set():
            return
        info = self.conn.publish(f"{self.base}/{AVAILABILITY}", OFFLINE, qos=1, retain=True)
        # Raises when the connection dropped meanwhile: then the will says offline anyway.
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(timeout=timeout)

    # ------------------------------------------------------------------ loop hooks

    def on_event(self, event: SortEvent) -> None:
        self._recent.append(event)
        self._event_at = time.monotonic()
        if self.conn.connected.is_set():
            self.publish_counts()
            self._publish(LAST, last_payload(event))

    def on_state(self, state: State, detail: str) -> None:
        # Kept even while offline: the next connect publishes the latest state.
        with self._state_lock:
            self._state = (state, detail)
            if self.conn.connected.is_set():
                self._publish(STATE, self.state_payload())

    def publish_state(self) -> None:
        """The last state again with the status as it is now (every connect; a reload
        changed the model, a fault the fault counts); only while connected."""
        with self._state_lock:
            if self.conn.connected.is_set():
                self._publish(STATE, self.state_payload())

    def state_payload(self) -> str:
        """The retained `state`: the state, its detail and every field of the status."""
        state, detail = self._state
        return state_payload(state, detail, self.status())

    def on_fault(self, fault: Fault, *, qos: int = 0) -> None:
        """Publish a fault as it happens. At QoS 0 only while connected (the loop's faults
        are in `state` anyway); at QoS 1 paho also keeps it for the next connect."""
        if qos or self.conn.connected.is_set():
            self.conn.publish(f"{self.base}/{FAULT}", fault_payload(fault), qos=qos)

    # ------------------------------------------------------------------ stats

    def stats(self) -> JsonObject:
        recent = list(self._recent)
        now = time.time()
        cycles = [e.cycle_ms for e in recent if e.cycle_ms]
        return stats_report(
            uptime_s=round(now - self._started, 1),
            cycle_ms_p50=round(float(np.percentile(cycles, 50)), 1) if cycles else None,
            cycle_ms_p95=round(float(np.percentile(cycles, 95)), 1) if cycles else None,
            items_per_hour=sum(1 for e in recent if now - e.time <= 3600),
            outbox=self.store.outbox_size(), version=__version__, status=self.status(),
            cpu_temperature_c=cpu_temperature(), contamination=self._fresh_contamination(),
            photos=self.photo_stats() if self.photo_stats is not None else None)

    def publish_stats(self) -> None:
        """One `stats` message (not retained), only while connected."""
        if self.conn.connected.is_set():
            self._publish(STATS, to_json(self.stats()), retain=False)

    def _fresh_contamination(self) -> JsonObject | None:
        if self.reviewed is None:
            return None
        try:
            fresh: JsonObject = self.reviewed.contamination()
        except Exception as exc:
            log.warning("the site log cannot be read for the contamination: %s", exc)
            return self._contamination
        return fresh

    def _tick(self) -> None:
        """Stats every stats_interval_s; the site log looked at every POLL_S."""
        next_stats = time.monotonic() + self.stats_interval_s
        while True:
            wait = max(0.0, next_stats - time.monotonic())
            if self.reviewed is not None:
                wait = min(wait, POLL_S)
            if self._stop.wait(wait):
                return
            try:
                self.poll_reviews()
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self.stats_interval_s
                    self.publish_stats()
            except Exception:  # one bad read must not end the stats for good
                log.exception("MQTT stats failed")

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, name="mqtt-stats", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
