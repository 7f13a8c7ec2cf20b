"""The real sorting loop on gpiozero's mock pins, with real inference, end to end."""

from __future__ import annotations

import json
import time

import pytest

from bin_controller.config import config_from_dict
from bin_controller.domain import State
from bin_controller.vision.classifier import Classifier
from hardware_sim.simulate import Faults, run_simulation
from hardware_sim.sources import GeneratedSource
from tests.test_cli import smartbin


@pytest.fixture(scope="module")
def demo() -> Classifier:
    return Classifier("demo")


def cfg(**sections):
    return config_from_dict(sections)


def assert_consistent(result, n):
    """Every item counted exactly once and in the compartment the decision named."""
    seqs = [e.seq for e in result.events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(result.items) == n
    for item in result.items:
        assert len(item.events) == 1, item.id
        assert item.compartment == item.events[0].bin, item.id
    assert len(result.events) == n
    assert not result.timed_out


def test_every_item_lands_where_decided(demo):
    items = GeneratedSource(1).items(60)
    result = run_simulation(cfg(), items, demo, fast=True)
    assert_consistent(result, 60)
    report = result.report()
    assert sum(report["routed"].values()) == 60
    assert report["bin_accuracy"] >= 0.9
    assert report["faults"] == {}
    assert {"p50", "p95"} == set(report["cycle_ms"])


@pytest.mark.parametrize("sensor", [
    {"type": "beam", "beam_broken_level": "high"},
    {"type": "pir"},
    {"type": "ultrasonic", "settle_s": 0.05},
])
def test_other_sensors(demo, sensor):
    items = GeneratedSource(2).items(4)
    result = run_simulation(cfg(sensor=sensor), items, demo, fast=True)
    assert_consistent(result, 4)


def test_real_time_mechanics(demo):
    """Servo speed and fall times on: the observer still sees every item land right."""
    items = GeneratedSource(3).items(3)
    result = run_simulation(cfg(), items, demo)
    assert_consistent(result, 3)
    # settle + move + hold + move back, at the default timings
    assert min(e.cycle_ms for e in result.events) >= 1000


def test_flap_returning_too_early_misroutes(demo):
    """The compartment is read off the servo when the item lands, not from the decision."""
    items = [i for i in GeneratedSource(4).items(20) if i.true_bin == "recyclable"][:2]
    config = cfg(flap={"hold_s": 0.0, "move_s": 0.05}, sensor={"settle_s": 0.0},
                 simulator={"fall_s": 0.0, "slide_s": 0.3, "servo_deg_per_s": 2000,
                            "tip_deg": 5})
    result = run_simulation(config, items, demo)
    for item in result.items:
        assert item.events[0].bin == "recyclable"
        assert item.compartment != "recyclable"  # the flap was back near rest


def test_jam_is_a_fault_and_the_bin_recovers(demo):
    items = GeneratedSource(5).items(4)
    states = []
    result = run_simulation(cfg(sensor={"jam_s": 0.2}, flap={"move_s": 0.0, "hold_s": 0.0}),
                            items, demo, fast=True,
                            faults=Faults(jam={2}, jam_clear_s=0.2),
                            on_loop=lambda loop: loop.on_state.append(
                                lambda s, d: states.append((s, d))))
    assert result.loop.fault_counts == {"jam": 1}
    assert (State.FAULT, "jam") in states
    assert result.items[1].compartment == "removed"
    assert [i.compartment == i.events[0].bin for i in result.items] == [True, False, True, True]
    assert len(result.events) == 4


def test_camera_failure_retried_then_fallback(demo):
    items = GeneratedSource(6).items(3)
    result = run_simulation(cfg(model={"retries": 2, "fallback_bin": "hazardous"}), items,
                            demo, fast=True, faults=Faults(camera_fail={1: 2, 2: 3}))
    assert_consistent(result, 3)
    first, second, third = (i.events[0] for i in result.items)
    assert not first.failed and first.label  # two failures, third attempt worked
    assert second.failed and second.bin == "hazardous" and "camera" in second.error.lower()
    assert not third.failed
    assert result.loop.fault_counts == {"camera": 1}


def test_classifier_error_goes_to_fallback(demo):
    class Broken:
        bundle = demo.bundle
        calls = 0

        def classify_array(self, frame):
            Broken.calls += 1
            raise RuntimeError("interpreter exploded")

    items = GeneratedSource(7).items(2)
    result = run_simulation(cfg(model={"retries": 1}), items, Broken(), fast=True)
    assert_consistent(result, 2)
    assert Broken.calls == 4
    assert all(e.failed and e.bin == "other" for e in result.events)
    assert result.loop.fault_counts == {"classifier": 2}


def test_slow_classifier_still_sorts(demo):
    items = GeneratedSource(8).items(3)
    result = run_simulation(cfg(), items, demo, fast=True,
                            faults=Faults(slow_classifier_s={2: 0.3}))
    assert_consistent(result, 3)
    assert result.items[1].events[0].decision_ms >= 300
    assert result.items[0].events[0].decision_ms < 300


def test_double_drop_with_gate_sorts_both(demo):
    items = GeneratedSource(9).items(4)
    result = run_simulation(cfg(gate={"enabled": True}), items, demo, fast=True,
                            faults=Faults(double_drop={1}))
    assert_consistent(result, 4)
    assert not any(i.passed_unsorted for i in result.items)
    assert all(e.label for e in result.events)
    assert result.loop.fault_counts == {}


def test_double_drop_without_gate_is_counted_where_it_fell(demo):
    items = GeneratedSource(10).items(3)
    result = run_simulation(cfg(), items, demo, fast=True, faults=Faults(double_drop={1}))
    assert_consistent(result, 3)
    second = result.items[1]
    assert second.passed_unsorted and second.events[0].failed
    assert second.compartment == result.items[0].compartment
    assert result.loop.fault_counts == {"double_drop": 1}


def test_low_confidence_goes_to_fallback_marked_uncertain(demo):
    items = GeneratedSource(11).items(3)
    result = run_simulation(cfg(model={"confidence_threshold": 1.0}), items, demo, fast=True)
    assert_consistent(result, 3)
    assert all(e.uncertain and e.bin == "other" and e.label for e in result.events)


def test_sort_next_pause_resume_and_calibrate(demo):
    items = GeneratedSource(12).items(2)
    control = {}

    def on_loop(loop):
        control["loop"] = loop
        loop.sort_next("hazardous")

    result = run_simulation(cfg(), items, demo, fast=True, on_loop=on_loop)
    first, second = result.events
    assert first.bin == "hazardous" and first.forced
    assert not second.forced
    assert result.items[0].compartment == "hazardous"
    loop = control["loop"]
    with pytest.raises(ValueError, match="unknown bin"):
        loop.sort_next("compost")


def test_pause_holds_the_item_until_resume(demo):
    from bin_controller.memory_recorder import MemoryRecorder
    from hardware_sim.simulate import Simulation, sim_config

    config = sim_config(cfg(), fast=True)
    recorder = MemoryRecorder()
    with Simulation(config, classifier=demo, recorder=recorder) as simulation:
        loop, sim = simulation.loop, simulation.world
        loop.pause()
        _wait(lambda: loop.state == State.PAUSED)
        angle = loop.calibrate(bin_name="kitchen")
        assert angle == -20.0
        pulses = [s.state for s in sim.pin_factory.pin(config.flap.pin).states]
        # -20 degrees on a -90..90 servo over 0.5..2.5 ms at 50 Hz: 1.2777 ms, duty 0.0639
        assert any(abs(p - 0.0012777 * 50) < 1e-4 for p in pulses)
        with pytest.raises(ValueError):
            loop.calibrate(angle=200)
        item = GeneratedSource(13).items(1)[0]
        sim.drop(item)
        time.sleep(0.3)
        assert item.compartment is None and recorder.events == []
        loop.resume()
        _wait(lambda: item.compartment is not None)
        assert recorder.events[0].bin == item.compartment


def _wait(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_simulate_command_report(tmp_path):
    report = tmp_path / "r.json"
    r = smartbin("simulate", "--fast", "--items", "12", "--seed", "3", "--report", str(report),
                 "--double-drop", "4", "--camera-fail", "6:5")
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    assert set(data) >= {"items", "routed", "correct", "bin_accuracy", "uncertain", "faults",
                         "cycle_ms"}
    assert sum(data["routed"].values()) == 12 == len(data["items"])
    assert data["faults"] == {"double_drop": 1, "camera": 1}
    assert data["correct"] == sum(1 for i in data["items"] if i["compartment"] == i["true_bin"])
    assert "landed" in r.stdout and "cycle p50" in r.stdout
