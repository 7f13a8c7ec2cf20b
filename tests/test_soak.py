"""`smartbin bench soak`: its plan, its checks, the simulator hooks it needs, a short run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bin_controller.bins import BINS
from bin_controller.config import load_config
from hardware_sim import soak
from hardware_sim.mechanics import PIN_HISTORY, SimBin, SimItem
from hardware_sim.simulate import Simulation, sim_config
from tests.broker import mosquitto_binary
from tests.test_cli import smartbin

# ---------------------------------------------------------------------- the plan


@settings(max_examples=60, deadline=None)
@given(items=st.integers(1, 6000), seed=st.integers(0, 2**31 - 1),
       kills=st.none() | st.integers(0, 6), disk_full=st.booleans())
def test_plan_keeps_kills_clear_of_jams_double_drops_and_the_full_disk(items, seed, kills,
                                                                        disk_full):
    plan = soak.make_plan(items, seed, faults=True, disk_full=disk_full, kills=kills)
    assert plan == soak.make_plan(items, seed, faults=True, disk_full=disk_full, kills=kills)
    assert len(plan.kills) <= (max(2, items // soak.ITEMS_PER_KILL) if kills is None else kills)
    assert plan.kills == sorted(set(plan.kills))
    assert all(2 <= k < items - soak.KILL_WINDOW for k in plan.kills)
    near = {n for k in plan.kills for n in range(k - 1, k + soak.KILL_WINDOW + 1)}
    seconds = [n + 1 for n in plan.double_drop]
    assert near.isdisjoint(plan.jam + plan.double_drop + seconds)
    for start, length in plan.disk_full:
        assert near.isdisjoint(range(start, start + length + 1))
        assert start > 1 and start + length <= items
    faulty = plan.jam + plan.double_drop + seconds + [*plan.camera_fail, *plan.classifier_fail]
    assert len(faulty) == len(set(faulty)), "an item with two faults"
    assert all(1 <= n <= items for n in faulty + plan.broker_restarts)
    assert all(1 <= v <= soak.MAX_FAILED_CALLS
               for v in [*plan.camera_fail.values(), *plan.classifier_fail.values()])


def test_plan_without_faults_is_empty_and_survives_a_round_trip(tmp_path):
    assert soak.make_plan(5000, 1, faults=False).summary() == dict.fromkeys(
        soak.make_plan(5000, 1, faults=False).summary(), 0)
    plan = soak.make_plan(5000, 1, faults=True, disk_full=True)
    assert plan.summary()["jams"] > 0 and plan.summary()["disk_full_items"] > 0
    plan.save(tmp_path / "plan.json")
    assert soak.Plan.load(tmp_path / "plan.json") == plan


def test_items_are_the_same_whichever_process_drops_them():
    a, b = soak.make_item(4, 17), soak.make_item(4, 17)
    assert (a.true_class, a.id) == (b.true_class, 17) and np.array_equal(a.image, b.image)
    assert a.uid != b.uid  # two drops are two physical items


# ---------------------------------------------------------------------- the checks


def _records(n=12):
    """A consistent soak of n items: the world, the database and the events agree."""
    world, events = [], {}
    for seq in range(1, n + 1):
        b = BINS[seq % 4]
        true = BINS[(seq + (seq % 5 == 0)) % 4]  # every fifth item in the wrong compartment
        world.append({"uid": f"u{seq}", "compartment": b, "true_bin": true})
        events[seq] = b
    counts = {b: sum(1 for e in world if e["compartment"] == b) for b in BINS}
    return dict(items=n, world=world, on_flap=0,
                database={"counts": counts, "pending": 0, "outbox": 0, "seq": n},
                events=events, duplicates=3, conflicts=0, counts_total=n,
                rss_first_kb=80_000, rss_end_kb=80_000 + 9 * 1024, crashes=0)


def test_consistent_records_pass_every_check():
    r = soak.evaluate(**_records())
    assert r["ok"] and all(r["checks"].values())
    assert sum(r["contamination"]["world"].values()) == 2
    assert r["contamination"]["world"] == r["contamination"]["events"]


def test_a_missing_seq_fails_delivery():
    rec = _records()
    del rec["events"][7]
    r = soak.evaluate(**rec)
    assert not r["ok"] and not r["checks"]["every_seq_delivered"]
    assert r["events"]["missing"] == [7]


def test_a_count_too_many_fails_the_count_checks():
    rec = _records()
    rec["database"]["counts"]["other"] += 1
    r = soak.evaluate(**rec)
    assert not r["checks"]["counts_equal_items_dropped"]
    assert not r["checks"]["per_compartment_equal_world"]
    assert not r["checks"]["retained_counts_equal"]


def test_an_event_naming_another_compartment_fails_contamination():
    rec = _records()
    seq = 5  # a contaminated item: its event now names its true bin instead
    rec["events"][seq] = rec["world"][seq - 1]["true_bin"]
    r = soak.evaluate(**rec)
    assert not r["checks"]["contamination_consistent"]
    assert r["events"]["disagreeing_with_world"] == 1


def test_jammed_items_taken_off_by_hand_count_where_they_were_sent():
    rec = _records()
    rec["world"][2]["compartment"] = "removed"  # counted in events[3], then taken off
    r = soak.evaluate(**rec)
    assert r["ok"], r["checks"]
    assert r["world"]["removed_by_hand_counted_in"][rec["events"][3]] == 1
    rec["database"]["counts"][rec["events"][3]] -= 1  # ... but not counted after all
    assert not soak.evaluate(**rec)["checks"]["per_compartment_equal_world"]


def test_memory_growth_over_the_limit_and_crashes_fail():
    rec = _records()
    rec["rss_end_kb"] = rec["rss_first_kb"] + 11 * 1024
    assert not soak.evaluate(**rec)["checks"]["memory_within_limit"]
    rec = _records()
    rec["crashes"] = 1
    assert not soak.evaluate(**rec)["checks"]["no_crashes"]
    rec = _records()
    assert not soak.evaluate(**rec, disk_full_planned=True)["checks"]["disk_full_reported"]
    assert soak.evaluate(**rec, disk_full_planned=True,
                         faults_reported={"disk_full": 1})["ok"]


def test_items_on_the_flap_or_pending_at_the_end_fail():
    rec = _records()
    rec["database"]["pending"] = 1
    assert not soak.evaluate(**rec)["checks"]["counts_equal_items_dropped"]
    rec = _records()
    rec["on_flap"] = 1
    assert not soak.evaluate(**rec)["checks"]["counts_equal_items_dropped"]


# ---------------------------------------------------------------------- simulator hooks


def _landed_world(tmp_path: Path, n: int) -> tuple[Simulation, list[SimItem]]:
    """A simulation with a kept world in which n items have landed."""
    cfg = sim_config(load_config(None, {"bin": {"state_dir": str(tmp_path)}}), fast=True,
                     world=tmp_path / "world")
    simulation = Simulation(cfg).__enter__()
    items = [soak.make_item(0, i) for i in range(1, n + 1)]
    assert not simulation.drop(items).timed_out
    return simulation, items


def test_world_hands_over_its_landed_record_in_order(tmp_path):
    simulation, items = _landed_world(tmp_path, 3)
    kept: list[dict] = []
    try:
        assert simulation.world.hand_over_landed(kept.extend) == 3
        assert simulation.world.hand_over_landed(kept.extend) == 0
    finally:
        simulation.__exit__(None, None, None)
    assert [e["uid"] for e in kept] == [i.uid for i in items]
    assert kept[0] == {"uid": items[0].uid, "compartment": items[0].compartment,
                       "true_bin": items[0].true_bin}
    world = json.loads((tmp_path / "world" / "world.json").read_text())
    assert world["landed"] == []
    assert not list((tmp_path / "world" / "items").glob("*.npy"))  # photos gone too


def test_world_keeps_its_record_when_the_hand_over_fails(tmp_path):
    simulation, _ = _landed_world(tmp_path, 2)

    def broken(entries):
        raise OSError("disk full")

    try:
        with pytest.raises(OSError):
            simulation.world.hand_over_landed(broken)
    finally:
        simulation.__exit__(None, None, None)
    again = SimBin(simulation.world.cfg, world=tmp_path / "world")  # a restarted process
    assert len(again.landed_before) == 2
    again.close()


def test_mock_pins_forget_old_states(tmp_path):
    # Five state changes per item (three on the flap's pin): a long simulation must not
    # keep them all.
    simulation, _ = _landed_world(tmp_path, 100)
    try:
        pins = simulation.bin.pin_factory.pins.values()
        assert pins and all(len(p.states) <= 2 * PIN_HISTORY + 1 for p in pins)
        assert max(len(p.states) for p in pins) >= PIN_HISTORY  # recent ones are kept
    finally:
        simulation.__exit__(None, None, None)


def test_full_disk_holds_the_database_at_its_size_until_freed(tmp_path):
    cfg = sim_config(load_config(None, {"bin": {"state_dir": str(tmp_path)}}), fast=True)
    with Simulation(cfg) as simulation:
        db = simulation.bin.store.db
        before = db.execute("PRAGMA max_page_count").fetchone()[0]
        simulation.fill_disk()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        assert db.execute("PRAGMA max_page_count").fetchone()[0] == pages < before
        simulation.free_disk()
        assert db.execute("PRAGMA max_page_count").fetchone()[0] == before


def test_simulate_classifier_fail_option(tmp_path):
    report = tmp_path / "r.json"
    r = smartbin("simulate", "--fast", "--quiet", "--items", "4", "--seed", "2",
                 "--classifier-fail", "2:3,3:1", "--report", str(report))
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    failed = [i["n"] for i in data["items"] if i["failed"]]
    assert failed == [2]  # three failed calls beat the two retries; one does not
    assert data["faults"] == {"classifier": 1}
    assert data["items"][1]["bin"] == "other"  # the fallback bin


# ---------------------------------------------------------------------- the command


def test_soak_refuses_bad_options(tmp_path):
    r = smartbin("bench", "soak", "--items", "0")
    assert r.returncode == 2 and "--items 0" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "smartbin.db").write_text("")
    r = smartbin("bench", "soak", "--items", "5", "--state-dir", str(tmp_path / "old"))
    assert r.returncode == 2 and "empty or new folder" in r.stderr


@pytest.mark.slow
def test_short_soak_with_faults_kills_a_broker_restart_and_a_full_disk(tmp_path):
    mosquitto_binary()  # skips without mosquitto (fails in CI)
    report = tmp_path / "soak.json"
    r = smartbin("bench", "soak", "--items", "3000", "--faults", "--kills", "2",
                 "--broker-restarts", "1", "--disk-full", "--seed", "2",
                 "--state-dir", str(tmp_path / "s"), "--report", str(report))
    data = json.loads(report.read_text())
    assert r.returncode == 0, (r.stdout, r.stderr, data["checks"])
    assert data["ok"] and all(data["checks"].values())
    assert data["items_dropped"] == data["counted"]["total"] == 3000
    assert data["events"]["received"] == 3000 and data["events"]["missing_count"] == 0
    assert data["checks"]["disk_full_reported"]
    assert data["injected"]["kills"] == 2 and data["injected"]["broker_restarts"] == 1
    assert [p["end"] for p in data["processes"]] == ["killed", "killed", "done"]
    assert data["injected"]["jams"] > 0 and data["injected"]["camera_failures"] > 0
    assert data["injected"]["classifier_failures"] > 0
    assert "items dropped 3,000; counted 3,000" in r.stdout
