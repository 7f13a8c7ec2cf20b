"""What a dashboard sees on subscribing: availability, counts, last item, state, discovery;
plus faults as they happen and periodic stats.

Retained state goes at QoS 0 on purpose: paho re-sends unacknowledged QoS 1 messages after a
reconnect, and a stale count arriving after a fresh one would become the retained value.
Every connect republishes all of it anyway (`republish`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from bin_controller import __version__
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.mqtt.connection import Connection
from bin_controller.payloads import (
    AVAILABILITY,
    COUNTS,
    FAULT,
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
    last_payload,
    state_payload,
    stats_report,
    to_json,
)

log = logging.getLogger(__name__)

RECENT_EVENTS = 200  # enough for cycle percentiles and an hour's rate at normal use

Status = Callable[[], Mapping[str, JsonValue]]


class RetainedStore(Protocol):
    def snapshot(self) -> Mapping[str, int]: ...

    def last_event(self) -> SortEvent | None: ...

    def outbox_size(self) -> int: ...


def cpu_temperature() -> float | None:
    try:
        raw = Path("/sys/class/thermal/thermal_zone0/temp").read_text()
        return round(int(raw.strip()) / 1000, 1)
    except (OSError, ValueError):
        return None


class RetainedState:
    def __init__(self, conn: Connection, store: RetainedStore, base: str, *,
                 status: Status, stats_interval_s: float,
                 discovery: Mapping[str, JsonObject] | None = None) -> None:
        self.conn = conn
        self.store = store
        self.base = base
        self.status = status
        self.stats_interval_s = stats_interval_s
        self.discovery: Mapping[str, JsonObject] = discovery or {}
        self._state = state_payload(State.IDLE, "", {})
        self._recent: deque[SortEvent] = deque(maxlen=RECENT_EVENTS)
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _publish(self, suffix: str, payload: str, *, retain: bool = True) -> None:
        self.conn.publish(f"{self.base}/{suffix}", payload, retain=retain)

    # ------------------------------------------------------------------ on every connect

    def republish(self) -> None:
        self.conn.publish(f"{self.base}/{AVAILABILITY}", ONLINE, qos=1, retain=True)
        self._publish(STATE, self._state)
        self.publish_counts()
        last = self.store.last_event()
        if last:
            self._publish(LAST, last_payload(last))
        self.publish_discovery()

    def publish_counts(self) -> None:
        snapshot = self.store.snapshot()
        self._publish(COUNTS, counts_payload(snapshot))
        for suffix, payload in bin_count_payloads(snapshot).items():
            self._publish(suffix, payload)

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
        if self.conn.connected.is_set():
            self.publish_counts()
            self._publish(LAST, last_payload(event))

    def on_state(self, state: State, detail: str) -> None:
        # Kept even while offline: the next connect publishes the latest state.
        self._state = state_payload(state, detail, self.status())
        if self.conn.connected.is_set():
            self._publish(STATE, self._state)

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
            cpu_temperature_c=cpu_temperature())

    def _stats_loop(self) -> None:
        while not self._stop.wait(self.stats_interval_s):
            if self.conn.connected.is_set():
                self._publish(STATS, to_json(self.stats()), retain=False)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._stats_loop, name="mqtt-stats",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
