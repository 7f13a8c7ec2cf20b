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
from typing import Any, TypeVar

import numpy as np

from bin_controller.bins import BINS
from bin_controller.config import Config
from bin_controller.domain import Fault, FrameInfo, SortEvent, State
from bin_controller.errors import BusyError, CommandError
from bin_controller.parts import (
    Camera,
    DescribesFrames,
    FillGauge,
    Flap,
    Gate,
    ImageClassifier,
    PhotoSink,
    PresenceSensor,
    Recalibrates,
    Recorder,
)
from bin_controller.vision.classifier import Prediction

log = logging.getLogger(__name__)
T = TypeVar("T")


class SortingLoop:
    def __init__(
        self,
        *,
        config: Config,
        sensor: PresenceSensor,
        camera: Camera,
        classifier: ImageClassifier,
        flap: Flap,
        recorder: Recorder,
        gate: Gate | None = None,
        photos: PhotoSink | None = None,
        fill: FillGauge | None = None,
    ) -> None:
        self.cfg = config
        self.sensor = sensor
        self.camera = camera
        self.classifier = classifier
        self.flap = flap
        self.gate = gate
        self.recorder = recorder
        self.photos = photos
        self.fill = fill
        self.state = State.IDLE
        self.state_detail = ""
        self.heartbeat = time.monotonic()
        self.faults: list[Fault] = []
        self.fault_counts: dict[str, int] = {}
        self.on_state: list[Callable[[State, str], None]] = []
        self.on_event: list[Callable[[SortEvent], None]] = []
        self.on_fault: list[Callable[[Fault], None]] = []
        # A submitted command to run on the loop thread, or None: just wake up.
        self._wake: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._counted_on_flap = False  # see hold_until_clear
        self._stop = threading.Event()
        self._paused = False
        self._next_bin: str | None = None
        self._edge_t: float | None = None
        self._edges: list[bool] | None = None  # sensor edges while the flap is tipped
        self._lock = threading.Lock()
        sensor.on_change(self._sensor_changed)

    # ------------------------------------------------------------------ commands
    # Called from other threads (MQTT, signals); they run inside the loop's thread.

    def _submit(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()  # not running (or already on the loop's thread): nothing to race
        done: queue.Queue[tuple[T | None, BaseException | None]] = queue.Queue()
        # Whether the call started decides what a timeout means: not started, it is withdrawn
        # (the caller hears "busy" and it never happens behind its back); started, it is
        # short (a flap move, a model swap) and its outcome is awaited and returned.
        gate = threading.Lock()
        started = cancelled = False

        def call() -> None:
            nonlocal started
            with gate:
                if cancelled:
                    return
                started = True
            try:
                done.put((fn(), None))
            except Exception as exc:  # reported to the caller, never kills the loop
                done.put((None, exc))

        self._wake.put(call)
        try:
            value, error = done.get(timeout=timeout)
        except queue.Empty:
            with gate:
                cancelled = not started
            if cancelled:
                raise BusyError(f"the bin is busy ({self.state}); try again") from None
            value, error = done.get()
        if error is not None:
            raise error
        return value  # type: ignore[return-value]  # None only when error is set

    def pause(self) -> None:
        self._paused = True
        self._wake.put(None)

    def resume(self) -> None:
        self._paused = False
        self._wake.put(None)

    def sort_next(self, bin_name: str) -> None:
        if bin_name not in BINS:
            raise CommandError(f"unknown bin {bin_name!r}; bins are {', '.join(BINS)}")
        with self._lock:
            self._next_bin = bin_name

    def calibrate(self, *, bin_name: str | None = None, angle: float | None = None) -> float:
        """Move the flap to a bin's angle or a raw angle; only between items."""
        if bin_name is not None:
            if angle is not None:
                raise CommandError("give exactly one of bin or angle")
            if bin_name not in BINS:
                raise CommandError(f"unknown bin {bin_name!r}; bins are {', '.join(BINS)}")
            target = self.flap.angle_for(bin_name)
        elif angle is not None:
            target = float(angle)
        else:
            raise CommandError("give exactly one of bin or angle")

        def move() -> float:
            if self.state not in (State.IDLE, State.PAUSED):
                raise BusyError(f"cannot calibrate while {self.state}")
            self.flap.move_to(target)
            self.flap.rest()
            return target

        return self._submit(move)

    def replace_classifier(self, classifier: ImageClassifier) -> ImageClassifier:
        """Swap the model between items; returns the old one."""

        def swap() -> ImageClassifier:
            old, self.classifier = self.classifier, classifier
            return old

        return self._submit(swap, timeout=120)

    def recalibrate_camera(self) -> dict[str, Any]:
        """Settle and fix the camera's exposure again (camera.exposure = "locked"), between
        items and with the flap empty: the light it settles on is the empty, lit flap."""
        camera = self.camera
        if not isinstance(camera, Recalibrates):
            raise CommandError(f"this camera ({type(camera).__name__}) has no exposure to "
                               "recalibrate")

        def settle() -> dict[str, Any]:
            if self.state not in (State.IDLE, State.PAUSED) or self.sensor.present:
                raise BusyError("an item is on the flap; recalibrate with the flap empty")
            return camera.recalibrate()

        cam = self.cfg.camera
        return self._submit(settle, timeout=cam.warmup_s + cam.timeout_s + 10)

    def photograph_paused(self) -> np.ndarray:
        """A frame of what lies on the flap while the bin is paused (MQTT `cmd/capture`),
        taken on the loop's thread so that it never meets a cycle's own capture."""

        def shoot() -> np.ndarray:
            if not self._paused:
                raise BusyError("pause the bin first (cmd/pause), lay the item on the flap, "
                                "then capture; take it off before resuming")
            if not self.sensor.present:
                raise CommandError("nothing on the flap: lay the item on it (the bin is "
                                   "paused, so it stays there)")
            return np.asarray(self.camera.capture())

        return self._submit(shoot, timeout=self.cfg.camera.timeout_s + 5)

    def status(self) -> dict[str, Any]:
        bundle = self.classifier.bundle
        return {"paused": self._paused, "model": bundle.name, "model_version": bundle.version,
                "backend": self.classifier.backend,
                "faults": dict(self.fault_counts),
                "last_fault": self.faults[-1].detail if self.faults else None}

    def stop(self) -> None:
        self._stop.set()
        self._wake.put(None)

    # ------------------------------------------------------------------ internals

    def _sensor_changed(self, present: bool, t: float) -> None:
        if present:
            self._edge_t = t
        edges = self._edges
        if edges is not None:
            edges.append(present)
        self._wake.put(None)

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

    def report_fault(self, kind: str, detail: str) -> None:
        """A fault another part found (the store's full disk, a rebuilt database): counted,
        logged and published like the loop's own. Callable from any thread."""
        self._fault(kind, detail)

    def _drain(self, timeout: float) -> None:
        """Wait for anything to happen (or the tick), running submitted commands."""
        try:
            call = self._wake.get(timeout=timeout) if timeout > 0 else self._wake.get_nowait()
        except queue.Empty:
            return
        while True:
            if call is not None:
                call()
            try:
                call = self._wake.get_nowait()
            except queue.Empty:
                return

    def _wait(self, seconds: float) -> None:
        """A mechanical or cool-down wait that still stops promptly."""
        if seconds > 0:
            self._stop.wait(seconds)

    def run(self) -> None:
        """Sort items until stop(); the current item is always finished first."""
        self._thread = threading.current_thread()
        while not self._stop.is_set():
            self.step(wait=True)
        self._set_state(State.IDLE, "stopped")

    def step(self, *, wait: bool = False) -> bool:
        """One turn of the loop: sort the item on the flap if there is one (True), else
        idle (waiting up to loop.tick_s for something to happen when `wait`)."""
        self.heartbeat = time.monotonic()
        tick = self.cfg.loop.tick_s if wait else 0.0
        if self._counted_on_flap:
            if self.sensor.present:
                self._fault("jam", "an item counted before the restart still lies on the flap")
                self._wait_until_clear()
            if not self.sensor.present:
                self._counted_on_flap = False
                self.recorder.cleared()
            return False
        if self._paused:
            self._set_state(State.PAUSED)
            self._drain(tick)
            return False
        if not self.sensor.present:
            self._set_state(State.IDLE)
            self._drain(tick)
            return False
        self._cycle()
        return True

    def _attempt(self, what: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
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
        shot = self._frame_info() if frame is not None else None
        prediction = None
        if frame is not None:
            self._set_state(State.CLASSIFYING)
            prediction, error = self._attempt(
                "classifier", lambda: self.classifier.classify_array(np.asarray(frame)))
        bin_name, uncertain, forced = self._decide(prediction)
        room, redirected_from = self._room_for(bin_name)
        if room is None:
            return  # paused or stopping with the item on the flap: it is sorted later
        bin_name = room
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
            frame_time=shot.time if shot else None,
            exposure_us=shot.exposure_us if shot else None,
            analogue_gain=shot.analogue_gain if shot else None,
            predicted_bin=prediction.bin if prediction else None,
            redirected_from=redirected_from,
        )
        event.photo = frame is not None and self.photos is not None and self.photos.wants(event)
        # Journalled as pending before the flap moves: a crash from here on is resolved
        # on restart by whether the item is still on the flap (see store.py).
        pending = self.recorder.begin(event)
        self._set_state(State.SORTING, bin_name)
        commanded: list[float] = []
        self._edges = edges = list[bool]()
        try:
            self.flap.sort(bin_name, on_commanded=lambda: commanded.append(time.monotonic()))
        finally:
            self._edges = None
        event.decision_ms = round(((commanded[0] if commanded else time.monotonic()) - edge)
                                  * 1000, 2)
        event.cycle_ms = round((time.monotonic() - edge) * 1000, 2)
        # Each clear after the first is another item that fell onto the tipped flap and
        # slid straight through: it is in that compartment, so it is counted there, in the
        # same transaction as the sorted item (a crash between the two would lose it).
        passed = [SortEvent(
            time=time.time(), bin=bin_name, label=None, label_en=None, confidence=None,
            uncertain=False, failed=True, forced=False, cycle_ms=0.0, decision_ms=0.0,
            model=bundle.name, model_version=bundle.version,
            error="double drop: passed unsorted") for _ in range(max(0, edges.count(False) - 1))]
        self._emit(self.recorder.commit(pending, also=passed), frame)
        for extra in passed:
            self._fault("double_drop", f"an item passed unsorted into {bin_name}")
            self._emit(extra)
        left = False in edges
        self._set_state(State.CLEARING)
        if left and self.sensor.present:
            pass  # the first item left and another already waits: it gets its own cycle
        elif not self.sensor.wait_for_clear(cfg.sensor.jam_s):
            self._fault("jam", f"chute still blocked {cfg.sensor.jam_s:g} s after sorting")
            self._wait_until_clear()
        if self.sensor.present and not left:
            return  # stopped while jammed: the next start finds it counted, not cleared
        self.recorder.cleared()
        if self.gate:
            self.gate.open_gate()
        if cfg.loop.cooldown_s > 0:
            self._set_state(State.COOLDOWN)
            self._wait(cfg.loop.cooldown_s)

    def _wait_until_clear(self) -> None:
        self._set_state(State.FAULT, "jam")
        while not self._stop.is_set() and not self.sensor.wait_for_clear(self.cfg.loop.tick_s):
            self.heartbeat = time.monotonic()
        if not self.sensor.present:
            log.info("jam cleared")

    def hold_until_clear(self) -> None:
        """At start: the last item was counted but never seen to leave, and something lies
        on the flap: it is that item, jammed. Wait for the chute to clear instead of sorting
        (and counting) it again."""
        self._counted_on_flap = True

    def _frame_info(self) -> FrameInfo | None:
        camera = self.camera
        return camera.last_frame if isinstance(camera, DescribesFrames) else None

    def _room_for(self, bin_name: str) -> tuple[str | None, str | None]:
        """(the bin to tip into, the full one it replaces) under fill.when_full; (None, None)
        when the item must stay on the flap: the bin paused, or stops while holding it.
        Never a full compartment."""
        fill = self.fill
        if fill is None or not fill.is_full(bin_name):
            return bin_name, None
        policy = self.cfg.fill.when_full
        fallback = self.cfg.model.fallback_bin
        if policy == "fallback_bin" and fallback != bin_name and not fill.is_full(fallback):
            log.info("%s is full: the item goes to %s", bin_name, fallback)
            return fallback, bin_name
        if policy == "pause":
            self._paused = True
            self._fault("full", f"{bin_name} is full: the bin is paused with the item on the "
                                "flap; empty the compartment, then resume")
            return None, None
        # hold, and fallback_bin when the fallback compartment is full too.
        self._set_state(State.FAULT, f"full: {bin_name}")
        log.warning("%s is full: the item waits on the flap until it is emptied", bin_name)
        while fill.is_full(bin_name) and not self._stop.is_set() and not self._paused:
            self._drain(self.cfg.loop.tick_s)
            self.heartbeat = time.monotonic()
        if fill.is_full(bin_name):
            return None, None
        self._set_state(State.SORTING, bin_name)
        return bin_name, None

    def _emit(self, event: SortEvent, frame: np.ndarray | None = None) -> None:
        if self.fill is not None:
            self.fill.added(event)
        if self.photos is not None:
            # Handed over before the event's listeners run: the photo log numbers nothing,
            # it files the frame under the seq the store just gave.
            self.photos.keep(event, frame)
        for cb in self.on_event:
            cb(event)

    def _decide(self, prediction: Prediction | None) -> tuple[str, bool, bool]:
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
