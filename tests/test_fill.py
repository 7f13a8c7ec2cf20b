"""Fill levels: the tracker against a fake sensor, and the simulated bin with compartments
that fill, sensors that see them, an operator who empties them and each fill.when_full."""

from __future__ import annotations

import json
import logging
import time

import pytest

from bin_controller import fill as fill_module
from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.domain import SortEvent, State
from bin_controller.fill import FILL_FILE, FillTracker
from bin_controller.vision.classifier import Classifier
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import GeneratedSource
from tests.test_cli import smartbin

# ---------------------------------------------------------------------------- the tracker

EMPTY_M, FULL_M = 0.6, 0.1


class FakeSensor:
    def __init__(self) -> None:
        self.value: float | None = EMPTY_M
        self.closed = False

    def at(self, pct: float) -> None:
        self.value = EMPTY_M - pct / 100.0 * (EMPTY_M - FULL_M)

    def distance_m(self) -> float | None:
        return self.value

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def no_settle(monkeypatch):
    """Readings right after an item count (the tests read the sensor on purpose)."""
    monkeypatch.setattr(fill_module, "SETTLE_S", 0.0)


def fill_cfg(**fill):
    base = {"capacity_l": dict.fromkeys(BINS, 10.0), "item_volume_l": dict.fromkeys(BINS, 1.0),
            "smoothing": 1, "empty_m": EMPTY_M, "full_m": FULL_M}
    return config_from_dict({"fill": {**base, **fill}}).fill


def item(bin_name: str) -> SortEvent:
    return SortEvent(time=time.time(), bin=bin_name, label=None, label_en=None,
                     confidence=None, uncertain=False, failed=False, forced=False, cycle_ms=0.0,
                     decision_ms=0.0, model="m", model_version="1")


def tracked(tmp_path, **fill):
    sensor = FakeSensor()
    tracker = FillTracker(fill_cfg(**fill), tmp_path, sensors={"kitchen": sensor})
    return tracker, sensor


def read(tracker, sensor, pct):
    sensor.at(pct)
    tracker.poll()
    return tracker.snapshot()["kitchen"]


def test_hysteresis(tmp_path, no_settle):
    tracker, sensor = tracked(tmp_path)
    full = []
    tracker.on_full.append(lambda b, pct: full.append(b))
    steps = [(50, "ok"), (79, "ok"), (80, "warn"), (76, "warn"), (74.5, "ok"), (94, "warn"),
             (95, "full"), (91, "full"), (89.5, "warn"), (95, "full")]
    for pct, state in steps:
        level = read(tracker, sensor, pct)
        assert level["state"] == state, (pct, level)
        assert level["pct"] == pytest.approx(pct, abs=0.2)
    assert full == ["kitchen", "kitchen"]
    assert tracker.snapshot()["kitchen"]["full_events"] == 2


def test_smoothing_by_median(tmp_path, no_settle):
    tracker, sensor = tracked(tmp_path, smoothing=3)
    read(tracker, sensor, 40)
    read(tracker, sensor, 40)
    level = read(tracker, sensor, 90)  # one echo off a falling item
    assert level["pct"] == pytest.approx(40, abs=0.2)
    assert level["sensor_pct"] == pytest.approx(40, abs=0.2)
    assert level["state"] == "ok"


def test_sheet_over_sensor_is_a_fault_not_full(tmp_path, no_settle):
    tracker, sensor = tracked(tmp_path)
    faults = []
    tracker.on_sensor_fault.append(lambda b, detail: faults.append((b, detail)))
    read(tracker, sensor, 10)
    for _ in range(3):  # a sheet: the sensor reads full, with nothing sorted in
        level = read(tracker, sensor, 100)
    assert level["sensor_fault"] and level["source"] == "estimate"
    assert level["state"] == "ok" and level["pct"] == pytest.approx(10, abs=0.2)
    assert not tracker.is_full("kitchen")
    assert len(faults) == 1 and faults[0][0] == "kitchen" and "covers" in faults[0][1]
    tracker.added(item("kitchen"))  # the estimate carries on meanwhile
    assert tracker.pct("kitchen") > 10
    level = read(tracker, sensor, 22)  # the sheet is lifted
    assert not level["sensor_fault"] and level["source"] == "sensor"
    assert level["pct"] == pytest.approx(22, abs=0.2)
    assert len(faults) == 1


def test_a_drop_is_an_emptying(tmp_path, no_settle):
    tracker, sensor = tracked(tmp_path)
    emptied = []
    tracker.on_emptied.append(emptied.append)
    read(tracker, sensor, 60)
    tracker.added(item("kitchen"))
    tracker.added(item("kitchen"))
    read(tracker, sensor, 80)
    level = read(tracker, sensor, 5)
    assert len(emptied) == 1
    e = emptied[0]
    assert (e.bin, e.source, e.items) == ("kitchen", "sensor", 2)
    assert e.pct_before == pytest.approx(80, abs=0.2)
    assert level["pct"] == pytest.approx(5, abs=0.2)
    assert level["items"] == 0 and level["emptied_events"] == 1


def test_a_fresh_tracker_adopts_its_first_reading(tmp_path, no_settle):
    tracker, sensor = tracked(tmp_path)
    faults = []
    tracker.on_sensor_fault.append(lambda b, d: faults.append(b))
    level = read(tracker, sensor, 70)  # fitted to a compartment already 70 % full
    assert level["pct"] == pytest.approx(70, abs=0.2) and not level["sensor_fault"]
    assert faults == []


def test_state_survives_a_restart(tmp_path):
    cfg = fill_cfg()
    tracker = FillTracker(cfg, tmp_path)
    while not tracker.is_full("kitchen"):
        tracker.added(item("kitchen"))
    items = tracker.snapshot()["kitchen"]["items"]
    tracker.close()
    again = FillTracker(cfg, tmp_path)
    assert again.is_full("kitchen") and not again.is_full("other")
    level = again.snapshot()["kitchen"]
    assert level["items"] == items and level["full_events"] == 1
    event = again.emptied("kitchen")
    assert event.source == "command" and event.items == items and event.pct_before >= 95
    assert not again.is_full("kitchen")
    assert not FillTracker(cfg, tmp_path).is_full("kitchen")


def test_a_damaged_state_file_starts_afresh(tmp_path, caplog):
    (tmp_path / FILL_FILE).write_text("{ not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bin_controller.fill"):
        tracker = FillTracker(fill_cfg(), tmp_path)
    assert any(FILL_FILE in r.getMessage() for r in caplog.records)
    assert all(tracker.pct(b) == 0 for b in BINS)
    tracker.added(item("kitchen"))
    assert json.loads((tmp_path / FILL_FILE).read_text())["kitchen"]["items"] == 1


# ---------------------------------------------------------------------------- simulated bin


@pytest.fixture(scope="module")
def demo() -> Classifier:
    return Classifier("demo")


def sim_cfg(tmp_path, world=False, **fill):
    raw = {"bin": {"state_dir": str(tmp_path)},
           "fill": {"capacity_l": dict.fromkeys(BINS, 2.0), **fill}}
    return sim_config(config_from_dict(raw), True, tmp_path / "world" if world else None)


def run(cfg, demo, n, seed=0, **options):
    states: list[tuple[State, str]] = []
    with Simulation(cfg, classifier=demo, **options) as sim:
        sim.loop.on_state.append(lambda s, detail: states.append((s, detail)))
        result = sim.drop(GeneratedSource(seed).items(n))
        emptier = list(sim.emptier.emptied) if sim.emptier else []
    return result, states, emptier


def assert_nothing_onto_full(result, n):
    report = result.report()
    assert not result.timed_out
    assert report["counted"] == n and len(result.events) == n
    for i in result.items:
        assert len(i.events) == 1 and i.compartment == i.events[0].bin, i.id
    assert {b: report["fill"][b]["sorted_onto_full"] for b in BINS} == dict.fromkeys(BINS, 0)
    return report


def test_fallback_bin(tmp_path, demo):
    # "other" (the fallback) is small, so that it is full too at times: then items wait.
    cfg = sim_cfg(tmp_path, when_full="fallback_bin",
                  capacity_l={"recyclable": 2.0, "kitchen": 2.0, "hazardous": 2.0, "other": 1.0})
    result, states, emptied = run(cfg, demo, 60, empty_after_s=0.3)
    report = assert_nothing_onto_full(result, 60)
    redirected = [e for e in result.events if e.redirected_from]
    assert redirected
    for e in redirected:
        assert e.bin == "other" and e.redirected_from != "other" and e.predicted_bin != "other"
    assert any(s == State.FAULT and d.startswith("full:") for s, d in states)
    assert sum(report["fill"][b]["full_events"] for b in BINS) > 0 and emptied
    assert report["fill"]["other"]["redirected_from"] == 0


def test_pause(tmp_path, demo):
    cfg = sim_cfg(tmp_path, when_full="pause")
    result, states, emptied = run(cfg, demo, 40, empty_after_s=0.3)
    assert_nothing_onto_full(result, 40)
    assert any(s == State.PAUSED for s, _ in states)  # with the item on the flap
    assert emptied
    assert not [e for e in result.events if e.redirected_from]
    pauses = [f for f in result.loop.faults if "paused" in f.detail]
    assert pauses and all(f.kind == "full" for f in pauses)


def test_hold(tmp_path, demo):
    cfg = sim_cfg(tmp_path, when_full="hold")
    result, states, emptied = run(cfg, demo, 40, empty_after_s=0.3)
    assert_nothing_onto_full(result, 40)
    held = {d.split(": ", 1)[1] for s, d in states if s == State.FAULT and d.startswith("full:")}
    assert held and emptied
    # Each held item went, after the emptying, into the compartment it was meant for.
    assert not [e for e in result.events if e.redirected_from]
    assert all(e.bin == e.predicted_bin for e in result.events if not e.uncertain)


def test_sheet_over_the_fill_sensor(tmp_path, demo):
    cfg = sim_cfg(tmp_path, sensor="ultrasonic", capacity_l=dict.fromkeys(BINS, 40.0))
    with Simulation(cfg, classifier=demo, empty_after_s=600) as sim:
        time.sleep(0.5)  # the sensors' first readings: all compartments empty
        sim.world.cover_sensor("hazardous")
        deadline = time.monotonic() + 10
        while "fill_sensor" not in sim.loop.fault_counts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.fill is not None and sim.fill.snapshot()["hazardous"]["sensor_fault"]
        result = sim.drop(GeneratedSource(3).items(16))
    report = assert_nothing_onto_full(result, 16)
    assert report["faults"].get("fill_sensor") == 1 and "full" not in report["faults"]
    assert report["fill"]["sensor_faults"] == 1
    assert report["fill"]["hazardous"]["sensor_faults"] == 1
    assert all(report["fill"][b]["full_events"] == 0 for b in BINS)
    assert not [e for e in result.events if e.redirected_from]


def test_the_sensor_sees_the_emptying(tmp_path, demo):
    cfg = sim_cfg(tmp_path, sensor="ultrasonic", when_full="hold")
    result, _, emptied = run(cfg, demo, 30, empty_after_s=0.2)
    report = assert_nothing_onto_full(result, 30)
    assert emptied
    assert sum(report["fill"][b]["emptied_events"] for b in BINS) > 0


def test_restart_with_a_full_compartment(tmp_path, demo):
    caps = {"recyclable": 40.0, "kitchen": 2.0, "hazardous": 40.0, "other": 40.0}
    cfg = sim_cfg(tmp_path, world=True, capacity_l=caps)
    kitchen = [i for i in GeneratedSource(5).items(60) if i.true_bin == "kitchen"]
    with Simulation(cfg, classifier=demo, emptier=False) as sim:
        first = sim.drop(kitchen[:8])
        assert sim.fill is not None and sim.fill.is_full("kitchen")
    assert not first.timed_out
    again = kitchen[8:12]
    for n, i in enumerate(again, start=100):
        i.id = n
    with Simulation(cfg, classifier=demo, emptier=False) as sim:
        assert sim.fill is not None and sim.fill.is_full("kitchen")
        assert sim.world.compartments.pct("kitchen") >= 95 * 0.7
        second = sim.drop(again)
        assert sim.world.compartments.sorted_onto_full["kitchen"] == 0
    assert not second.timed_out and len(second.events) == 4
    for e in second.events:
        if e.predicted_bin == "kitchen":
            assert (e.bin, e.redirected_from) == ("other", "kitchen")


# ---------------------------------------------------------------------------- command line


def test_200_items_into_2_litre_compartments(tmp_path):
    report_file = tmp_path / "report.json"
    r = smartbin("simulate", "--capacity-l", "2", "--items", "200", "--fast", "--report",
                 str(report_file))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(report_file.read_text(encoding="utf-8"))
    fill = report["fill"]
    assert report["counted"] == 200
    for b in BINS:
        assert fill[b]["sorted_onto_full"] == 0, b
        assert set(fill[b]) >= {"final_pct", "full_events", "emptied_events"}
    assert sum(fill[b]["full_events"] for b in BINS) >= 10
    assert sum(fill[b]["emptied_events"] for b in BINS) >= 10
    assert fill["sensor_faults"] == 0
    assert "fill: recyclable" in r.stdout and "emptied" in r.stdout


@pytest.mark.parametrize("fill, key", [
    ('sensor = "ultrasonic"\ntrigger_pins = { recyclable = 18, kitchen = 6, hazardous = 16, '
     'other = 20 }', "flap.pin"),
    ('sensor = "ultrasonic"\necho_pins = { recyclable = 22, kitchen = 25, hazardous = 26, '
     'other = 17 }', "sensor.pin"),
    ('sensor = "vl53l0x"\ni2c_addresses = { recyclable = 0x30, kitchen = 0x31, hazardous = '
     '0x32, other = 0x78 }', "fill.i2c_addresses.other"),
    ("full_m = 0.7\nempty_m = 0.6", "fill.full_m"),
])
@pytest.mark.parametrize("command", ["simulate", "check"])
def test_bad_fill_config_in_one_line(tmp_path, fill, key, command):
    config = tmp_path / "bin.toml"
    config.write_text(f"[fill]\n{fill}\n", encoding="utf-8")
    args = ["--items", "1", "--fast"] if command == "simulate" else []
    r = smartbin(command, "--config", str(config), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    # check reports each of its checks on a line of its own ("FAIL config: ...").
    start = "smartbin: error:" if command == "simulate" else "FAIL config:"
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr
    assert key in lines[0] and "Traceback" not in r.stderr + r.stdout


def test_cover_sensor_needs_a_sensor(tmp_path):
    r = smartbin("simulate", "--items", "3", "--fast", "--cover-sensor", "kitchen:2")
    assert r.returncode == 2 and "--fill-sensor ultrasonic" in r.stderr
    assert "Traceback" not in r.stderr
    r = smartbin("simulate", "--items", "3", "--fast", "--cover-sensor", "attic:2")
    assert r.returncode == 2 and "BIN:ITEM" in r.stderr
