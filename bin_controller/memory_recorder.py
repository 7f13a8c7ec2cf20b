"""Counts kept in memory: for a simulation without a state folder, benchmarks and tests."""

from __future__ import annotations

import threading
from collections.abc import Sequence

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

    def commit(self, pending: Pending, *, also: Sequence[SortEvent] = ()) -> SortEvent:
        with self._lock:
            for event in (pending.event, *also):
                self._count(event)
        return pending.event

    def cleared(self) -> None:
        pass

    def record(self, event: SortEvent) -> SortEvent:
        with self._lock:
            self._count(event)
        return event

    def _count(self, event: SortEvent) -> None:
        event.seq = len(self.events) + 1
        self.counts[event.bin] += 1
        self.events.append(event)
