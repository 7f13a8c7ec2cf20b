"""The sorting loop's decisions and cycle with small fake parts: no threads, no simulator,
no model. Each test turns the loop by hand with `step()`."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from bin_controller.config import config_from_dict
from bin_controller.domain import SortEvent, State
from bin_controller.errors import BusyError, CameraError, CommandError
from bin_controller.memory_recorder import MemoryRecorder
from bin_controller.parts import Pending
from bin_controller.sorter import SortingLoop
from bin_controller.vision.bundle import Label
from bin_controller.vision.classifier import Prediction

FRAME = np.zeros((224, 304, 3), np.uint8)


class FakeSensor:
    """An item lies on the flap while `present`; `clears_after` waits before a jam clears."""

    def __init__(self) -> None:
        self.present = False
        self.callbacks: list[Callable[[bool, float], None]] = []
        self.clears_after: int | None = None  # wait_for_clear calls before a jam clears

    def on_change(self, callback: Callable[[bool, float], None]) -> None:
        self.callbacks.append(callback)

    def set(self, present: bool) -> None:
        self.present = present
        for cb in self.callbacks:
            cb(present, 0.0)

    def wait_for_clear(self, timeout: float | None) -> bool:
        if self.present and self.clears_after is not None:
            self.clears_after -= 1
            if self.clears_after <= 0:
                self.set(False)
        return not self.present

    def close(self) -> None:
        pass


class FakeCamera:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    def capture(self) -> np.ndarray:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise CameraError("no frame")
        return FRAME

    def close(self) -> None:
        pass


def prediction(label: str, bin_name: str, bin_confidence: float) -> Prediction:
    lab = Label(label, label, bin_name)
    return Prediction(lab, 0, bin_confidence, [(lab, bin_confidence)], 1.0,
                      np.array([bin_confidence]), bin_name, bin_confidence)


class FakeClassifier:
    def __init__(self, *answers: Prediction | Exception, name: str = "fake") -> None:
        self.answers = list(answers)
        self.bundle = SimpleNamespace(name=name, version="1")
        self.backend = "fake"

    def classify_array(self, frame: np.ndarray) -> Prediction:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeFlap:
    """Tipping drops whatever lies on the flap, unless it is stuck; `during_tip` plays what
    happens meanwhile (a second item falling through)."""

    def __init__(self, sensor: FakeSensor, log: list[str]) -> None:
        self.sensor, self.log = sensor, log
        self.stuck = False
        self.during_tip: Callable[[], None] | None = None
        self.moves: list[float] = []

    def angle_for(self, bin_name: str) -> float:
        return {"recyclable": -60.0, "kitchen": -20.0, "hazardous": 20.0, "other": 60.0}[
            bin_name]

    def sort(self, bin_name: str, *, on_commanded: Callable[[], None] | None = None) -> None:
        self.log.append(f"sort {bin_name}")
        if on_commanded:
            on_commanded()
        if not self.stuck:
            self.sensor.set(False)
        if self.during_tip:
            self.during_tip()

    def move_to(self, angle: float, *, hold: bool = False) -> None:
        self.moves.append(angle)

    def rest(self) -> None:
        self.moves.append(0.0)

    def close(self) -> None:
        pass


class FakeGate:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def close_gate(self) -> None:
        self.log.append("gate closed")

    def open_gate(self) -> None:
        self.log.append("gate open")

    def close(self) -> None:
        pass


class SpyRecorder(MemoryRecorder):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def begin(self, event: SortEvent) -> Pending:
        self.log.append(f"begin {event.bin}")
        return super().begin(event)

    def commit(self, pending: Pending, *, also=()) -> SortEvent:
        self.log.append(f"commit {pending.event.bin}" + (f" +{len(also)}" if also else ""))
        return super().commit(pending, also=also)

    def cleared(self) -> None:
        self.log.append("cleared")


class Rig:
    def __init__(self, *answers: Prediction | Exception, camera_failures: int = 0,
                 with_gate: bool = False, **config: dict) -> None:
        base = {"sensor": {"settle_s": 0.0, "jam_s": 0.1}, "loop": {"cooldown_s": 0.0},
                "flap": {"move_s": 0.0, "hold_s": 0.0}}
        for section, values in config.items():
            base[section] = {**base.get(section, {}), **values}
        self.cfg = config_from_dict(base)
        self.log: list[str] = []
        self.sensor = FakeSensor()
        self.camera = FakeCamera(camera_failures)
        self.classifier = FakeClassifier(*(answers or (prediction("can", "recyclable", 0.9),)))
        self.flap = FakeFlap(self.sensor, self.log)
        self.recorder = SpyRecorder(self.log)
        self.loop = SortingLoop(config=self.cfg, sensor=self.sensor, camera=self.camera,
                                classifier=self.classifier, flap=self.flap,
                                recorder=self.recorder,
                                gate=FakeGate(self.log) if with_gate else None)
        self.faults: list[str] = []
        self.loop.on_fault.append(lambda f: self.faults.append(f.kind))

    def drop(self) -> bool:
        self.sensor.set(True)
        return self.loop.step()

    @property
    def events(self) -> list[SortEvent]:
        return self.recorder.events


def test_an_item_is_classified_sorted_and_counted():
    rig = Rig(prediction("banana", "kitchen", 0.93))
    assert rig.loop.step() is False and rig.events == []  # nothing on the flap
    assert rig.drop() is True
    (event,) = rig.events
    assert (event.seq, event.bin, event.label, event.bin_confidence) == (1, "kitchen",
                                                                         "banana", 0.93)
    assert not (event.uncertain or event.failed or event.forced)
    assert event.model == "fake" and event.decision_ms >= 0
    assert rig.log == ["begin kitchen", "sort kitchen", "commit kitchen", "cleared"]
    assert rig.loop.step() is False and rig.loop.state == State.IDLE


def test_below_the_threshold_goes_to_the_fallback_bin_marked_uncertain():
    rig = Rig(prediction("banana", "kitchen", 0.49),
              model={"confidence_threshold": 0.5, "fallback_bin": "hazardous"})
    rig.drop()
    (event,) = rig.events
    assert event.bin == "hazardous" and event.uncertain and not event.failed
    assert event.label == "banana"  # what the model thought is kept for review


def test_camera_errors_are_retried_then_the_item_fails_to_the_fallback_bin():
    rig = Rig(camera_failures=2, model={"retries": 2})
    rig.drop()
    assert rig.camera.calls == 3 and rig.events[0].bin == "recyclable"
    assert rig.faults == []

    rig = Rig(camera_failures=3, model={"retries": 2, "fallback_bin": "other"})
    rig.drop()
    (event,) = rig.events
    assert event.failed and event.bin == "other" and event.label is None
    assert "no frame" in (event.error or "") and rig.faults == ["camera"]


def test_a_classifier_error_fails_the_item():
    rig = Rig(RuntimeError("interpreter broke"), model={"retries": 1})
    rig.drop()
    (event,) = rig.events
    assert event.failed and event.bin == "other" and rig.faults == ["classifier"]


def test_sort_next_forces_one_item_only():
    rig = Rig(prediction("can", "recyclable", 0.99))
    rig.loop.sort_next("hazardous")
    rig.drop()
    rig.drop()
    assert [(e.bin, e.forced) for e in rig.events] == [("hazardous", True),
                                                        ("recyclable", False)]
    with pytest.raises(CommandError, match="unknown bin"):
        rig.loop.sort_next("compost")


def test_a_paused_bin_leaves_the_item_until_resumed():
    rig = Rig()
    rig.loop.pause()
    assert rig.drop() is False and rig.loop.state == State.PAUSED and rig.events == []
    rig.loop.resume()
    assert rig.loop.step() is True and len(rig.events) == 1


def test_a_second_item_through_the_tipped_flap_is_counted_where_it_fell():
    rig = Rig(prediction("can", "recyclable", 0.9))
    rig.flap.during_tip = lambda: (rig.sensor.set(True), rig.sensor.set(False))
    rig.drop()
    first, second = rig.events
    assert (first.seq, first.bin, first.failed) == (1, "recyclable", False)
    assert (second.seq, second.bin, second.failed) == (2, "recyclable", True)
    assert "double drop" in (second.error or "") and rig.faults == ["double_drop"]
    # counted with the sorted item, all or none: a crash between two commits would lose it
    assert "commit recyclable +1" in rig.log


def test_a_jam_is_a_fault_until_the_chute_clears():
    rig = Rig()
    rig.flap.stuck = True
    rig.sensor.clears_after = 3
    states: list[State] = []
    rig.loop.on_state.append(lambda s, d: states.append(s))
    rig.drop()
    assert rig.faults == ["jam"] and State.FAULT in states
    assert len(rig.events) == 1  # counted where it was sent
    assert not rig.sensor.present


def test_an_item_gone_before_it_settled_is_a_glitch_not_an_item():
    rig = Rig(sensor={"settle_s": 0.01})
    rig.sensor.set(True)
    rig.sensor.clears_after = 1  # gone during the settle wait
    rig.loop.step()
    assert rig.events == [] and rig.camera.calls == 0


def test_the_gate_closes_for_the_cycle():
    rig = Rig(with_gate=True, gate={"enabled": True})
    rig.drop()
    assert rig.log == ["gate closed", "begin recyclable", "sort recyclable",
                       "commit recyclable", "cleared", "gate open"]


def test_commands_run_directly_when_the_loop_is_not_turning():
    rig = Rig()
    new = FakeClassifier(prediction("glass", "recyclable", 0.8), name="taught")
    old = rig.loop.replace_classifier(new)
    assert old is rig.classifier and rig.loop.status()["model"] == "taught"
    assert rig.loop.calibrate(bin_name="kitchen") == -20.0
    assert rig.flap.moves == [-20.0, 0.0]
    with pytest.raises(CommandError):
        rig.loop.calibrate(bin_name="kitchen", angle=3)


def test_calibrate_refuses_while_an_item_is_being_sorted():
    rig = Rig()
    rig.loop.state = State.SORTING
    with pytest.raises(BusyError):
        rig.loop.calibrate(angle=10)


def test_a_command_answered_busy_never_happens_later():
    import threading

    rig = Rig()
    rig.loop._thread = threading.Thread()  # turning elsewhere and not taking commands
    moved: list[int] = []
    with pytest.raises(BusyError):
        rig.loop._submit(lambda: moved.append(1), timeout=0.05)
    rig.loop.step()  # the loop takes its queued commands now
    assert moved == []


def test_an_item_counted_before_a_restart_is_not_counted_again():
    rig = Rig()
    rig.sensor.set(True)  # found on the flap at start, already counted
    rig.sensor.clears_after = 3
    rig.loop.hold_until_clear()
    assert rig.loop.step() is False
    assert rig.events == [] and rig.faults == ["jam"] and rig.camera.calls == 0
    assert rig.log == ["cleared"] and not rig.sensor.present
    assert rig.drop() is True and len(rig.events) == 1  # the next item is sorted as usual


def test_stopped_during_a_jam_the_item_is_not_marked_cleared():
    rig = Rig()
    rig.flap.stuck = True
    rig.loop.on_state.append(lambda s, d: rig.loop.stop() if s == State.FAULT else None)
    rig.drop()
    assert len(rig.events) == 1 and "cleared" not in rig.log
