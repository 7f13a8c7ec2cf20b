"""The sorting cycle: sensor -> camera -> classifier -> bin map -> flap -> store -> telemetry.

Event-driven: the loop sleeps on a queue fed by sensor callbacks and commands, waking at
least every `loop.tick_s` to prove it is alive (the systemd watchdog reads `heartbeat`).
Faults never stop the bin: a jam waits for the chute to clear, a camera or classifier
error is retried and then the item goes to the fallback bin marked failed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from bin_controller.bins import BINS
from bin_controller.config import Config
from bin_controller.domain import Fault, SortEvent, State

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Counts and journals an event; returns it with its sequence number."""

    def record(self, event: SortEvent) -> SortEvent: ...


class MemoryRecorder:
    """Counts in memory: for the simulator without a state folder and for tests."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(BINS, 0)
        self.events: list[SortEvent] = []
        self._lock = threading.Lock()

    def record(self, event: SortEvent) -> SortEvent:
        with self._lock:
            event.seq = len(self.events) + 1
            self.counts[event.bin] += 1
            self.events.append(event)
        return event


class SortingLoop:
    def __init__(
        self,
        *,
        config: Config,
        sensor: Any,
        camera: Any,
        classifier: Any,
        flap: Any,
        recorder: Recorder,
        gate: Any = None,
    ) -> None:
        self.cfg = config
        self.sensor = sensor
        self.camera = camera
        self.classifier = classifier
        self.flap = flap
        self.gate = gate
        self.recorder = recorder
        self.state = State.IDLE
        self.state_detail = ""
        self.heartbeat = time.monotonic()
        self.faults: list[Fault] = []
        self.fault_counts: dict[str, int] = {}
        self.on_state: list[Callable[[State, str], None]] = []
        self.on_event: list[Callable[[SortEvent], None]] = []
        self.on_fault: list[Callable[[Fault], None]] = []
        self._wake: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._paused = False
        self._next_bin: str | None = None
        self._edge_t: float | None = None
        self._edges: list[bool] | None = None  # sensor edges while the flap is tipped
        self._lock = threading.Lock()
        sensor.on_change(self._sensor_changed)

    # ------------------------------------------------------------------ commands
    # Called from other threads (MQTT, signals); they run inside the loop's thread.

    def _submit(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        if threading.current_thread() is getattr(self, "_thread", None):
            return fn()
        done: queue.Queue[tuple[bool, Any]] = queue.Queue()

        def call() -> None:
            try:
                done.put((True, fn()))
            except Exception as exc:  # reported to the caller, never kills the loop
                done.put((False, exc))

        self._wake.put(("call", call))
        try:
            ok, value = done.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the bin is busy ({self.state}); try again") from None
        if not ok:
            raise value
        return value

    def pause(self) -> None:
        self._paused = True
        self._wake.put(("wake", None))

    def resume(self) -> None:
        self._paused = False
        self._wake.put(("wake", None))

    def sort_next(self, bin_name: str) -> None:
        if bin_name not in BINS:
            raise ValueError(f"unknown bin {bin_name!r}; bins are {', '.join(BINS)}")
        with self._lock:
            self._next_bin = bin_name

    def calibrate(self, *, bin_name: str | None = None, angle: float | None = None) -> float:
        """Move the flap to a bin's angle or a raw angle; only between items."""
        if (bin_name is None) == (angle is None):
            raise ValueError("give exactly one of bin or angle")
        if bin_name is not None and bin_name not in BINS:
            raise ValueError(f"unknown bin {bin_name!r}; bins are {', '.join(BINS)}")
        target = self.flap.angle_for(bin_name) if bin_name else float(angle)

        def move() -> float:
            if self.state not in (State.IDLE, State.PAUSED):
                raise RuntimeError(f"cannot calibrate while {self.state}")
            self.flap.move_to(target)
            self.flap.rest()
            return target

        return self._submit(move)

    def replace_classifier(self, classifier: Any) -> Any:
        """Swap the model between items; returns the old one."""

        def swap() -> Any:
            old, self.classifier = self.classifier, classifier
            return old

        return self._submit(swap, timeout=120)

    def status(self) -> dict[str, Any]:
        bundle = self.classifier.bundle
        return {"paused": self._paused, "model": bundle.name, "model_version": bundle.version,
                "backend": getattr(self.classifier, "backend", ""),
                "faults": dict(self.fault_counts),
                "last_fault": self.faults[-1].detail if self.faults else None}

    def stop(self) -> None:
        self._stop.set()
        self._wake.put(("wake", None))

    # ------------------------------------------------------------------ internals

    def _sensor_changed(self, present: bool, t: float) -> None:
        if present:
            self._edge_t = t
        edges = self._edges
        if edges is not None:
            edges.append(present)
        self._wake.put(("sensor", present))

    def _set_state(self, state: State, detail: str = "") -> None:
        self.heartbeat = time.monotonic()
        if state == self.state and detail == self.state_detail:
            return
        self.state, self.state_detail = state, detail
        log.debug("state %s %s", state, detail)
        for cb in self.on_state:
            cb(state, detail)

    def _fault(self, kind: str, detail: str) -> None:
        fault = Fault(kind, detail)
        self.faults = [*self.faults[-49:], fault]
        self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
        log.warning("fault %s: %s", kind, detail)
        for cb in self.on_fault:
            cb(fault)

    def _drain(self, timeout: float) -> None:
        """Wait for anything to happen (or the tick), running submitted commands."""
        try:
            kind, payload = self._wake.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if kind == "call":
                payload()
            try:
                kind, payload = self._wake.get_nowait()
            except queue.Empty:
                return

    def _wait(self, seconds: float) -> None:
        """A mechanical or cool-down wait that still stops promptly."""
        if seconds > 0:
            self._stop.wait(seconds)

    def run(self) -> None:
        self._thread = threading.current_thread()
        tick = self.cfg.loop.tick_s
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if self._paused:
                self._set_state(State.PAUSED)
                self._drain(tick)
                continue
            if not self.sensor.present:
                self._set_state(State.IDLE)
                self._drain(tick)
                continue
            self._cycle()
        self._set_state(State.IDLE, "stopped")

    def _attempt(self, what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        error = None
        for attempt in range(self.cfg.model.retries + 1):
            self.heartbeat = time.monotonic()
            try:
                return fn(), None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s failed (attempt %d): %s", what, attempt + 1, error)
        self._fault(what, error or "")
        return None, error

    def _cycle(self) -> None:
        edge = self._edge_t or time.monotonic()
        self._edge_t = None
        cfg = self.cfg
        if cfg.sensor.settle_s > 0:
            self._set_state(State.SETTLING)
            if self.sensor.wait_for_clear(cfg.sensor.settle_s):
                return  # gone before the settle time: a glitch, not an item
        if self.gate:
            self.gate.close_gate()
        self._set_state(State.CAPTURING)
        frame, error = self._attempt("camera", self.camera.capture)
        prediction = None
        if frame is not None:
            self._set_state(State.CLASSIFYING)
            prediction, error = self._attempt(
                "classifier", lambda: self.classifier.classify_array(np.asarray(frame)))
        bin_name, uncertain, forced = self._decide(prediction)
        bundle = self.classifier.bundle
        event = SortEvent(
            time=time.time(),
            bin=bin_name,
            label=prediction.label.name if prediction else None,
            label_en=prediction.label.name_en if prediction else None,
            confidence=round(prediction.confidence, 4) if prediction else None,
            bin_confidence=round(prediction.bin_confidence, 4) if prediction else None,
            uncertain=uncertain,
            failed=prediction is None,
            forced=forced,
            cycle_ms=0.0,
            decision_ms=0.0,
            model=bundle.name,
            model_version=bundle.version,
            error=error,
        )
        # Journalled as pending before the flap moves: a crash from here on is resolved
        # on restart by whether the item is still on the flap (see store.py).
        begin = getattr(self.recorder, "begin", None)
        if begin:
            event = begin(event)
        self._set_state(State.SORTING, bin_name)
        commanded: list[float] = []
        self._edges = edges = []
        try:
            self.flap.sort(bin_name, on_commanded=lambda: commanded.append(time.monotonic()))
        finally:
            self._edges = None
        event.decision_ms = round(((commanded[0] if commanded else time.monotonic()) - edge)
                                  * 1000, 2)
        event.cycle_ms = round((time.monotonic() - edge) * 1000, 2)
        self._emit(event)
        left = False in edges
        # Each clear after the first is another item that fell onto the tipped flap and
        # slid straight through: it is in that compartment, so it is counted there.
        for _ in range(max(0, edges.count(False) - 1)):
            self._fault("double_drop", f"an item passed unsorted into {bin_name}")
            self._emit(SortEvent(
                time=time.time(), bin=bin_name, label=None, label_en=None, confidence=None,
                uncertain=False, failed=True, forced=False, cycle_ms=0.0, decision_ms=0.0,
                model=bundle.name, model_version=bundle.version,
                error="double drop: passed unsorted"))
        self._set_state(State.CLEARING)
        if left and self.sensor.present:
            pass  # the first item left and another already waits: it gets its own cycle
        elif not self.sensor.wait_for_clear(cfg.sensor.jam_s):
            self._fault("jam", f"chute still blocked {cfg.sensor.jam_s:g} s after sorting")
            self._set_state(State.FAULT, "jam")
            while not self._stop.is_set() and not self.sensor.wait_for_clear(cfg.loop.tick_s):
                self.heartbeat = time.monotonic()
            log.info("jam cleared")
        if self.gate:
            self.gate.open_gate()
        if cfg.loop.cooldown_s > 0:
            self._set_state(State.COOLDOWN)
            self._wait(cfg.loop.cooldown_s)

    def _emit(self, event: SortEvent) -> None:
        event = self.recorder.record(event)
        for cb in self.on_event:
            cb(event)

    def _decide(self, prediction: Any) -> tuple[str, bool, bool]:
        """(bin, uncertain, forced) from the prediction, a pending sort_next, the threshold."""
        with self._lock:
            forced_bin, self._next_bin = self._next_bin, None
        if forced_bin:
            return forced_bin, False, True
        if prediction is None:
            return self.cfg.model.fallback_bin, False, False
        if prediction.bin_confidence < self.cfg.model.confidence_threshold:
            return self.cfg.model.fallback_bin, True, False
        return prediction.bin, False, False
