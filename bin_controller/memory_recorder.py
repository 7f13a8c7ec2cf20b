"""Counts kept in memory: for a simulation without a state folder, benchmarks and tests."""

from __future__ import annotations

import threading

from bin_controller.bins import BINS
from bin_controller.domain import SortEvent
from bin_controller.parts import Pending


class MemoryRecorder:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(BINS, 0)
        self.events: list[SortEvent] = []
        self._lock = threading.Lock()

    def begin(self, event: SortEvent) -> Pending:
        return Pending(event)

    def commit(self, pending: Pending) -> SortEvent:
        return self.record(pending.event)

    def record(self, event: SortEvent) -> SortEvent:
        with self._lock:
            event.seq = len(self.events) + 1
            self.counts[event.bin] += 1
            self.events.append(event)
        return event
