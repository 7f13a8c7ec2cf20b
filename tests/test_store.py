"""Counts that survive anything: the SQLite store, and a service killed mid-run."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from bin_controller.domain import SortEvent
from bin_controller.payloads import event_message
from bin_controller.store import Store
from tests.broker import Broker, Listener
from tests.conftest import REPO


def event(bin_name="other", label="x") -> SortEvent:
    return SortEvent(time=time.time(), bin=bin_name, label=label, label_en=label,
                     confidence=0.9, uncertain=False, failed=False, forced=False,
                     cycle_ms=1.0, decision_ms=1.0, model="m", model_version="1")


def test_record_counts_journals_and_queues_in_one_go(tmp_path):
    s = Store(tmp_path, message=event_message)
    e = s.record(event("kitchen"))
    assert e.seq == 1 and s.counts()["kitchen"] == 1
    assert [j.seq for j in s.journal()] == [1]
    (_oid, topic, payload, qos), = s.outbox_batch()
    assert topic == "event" and qos == 1 and json.loads(payload)["seq"] == 1
    s.close()
    again = Store(tmp_path, message=event_message)  # reopened: everything is still there
    assert again.counts()["kitchen"] == 1 and again.last_seq() == 1
    assert again.record(event()).seq == 2


def test_pending_item_is_resolved_by_the_flap(tmp_path):
    s = Store(tmp_path, message=event_message)
    s.begin(event("hazardous"))  # decided, then the power went
    assert s.counts()["hazardous"] == 0
    assert s.recover(item_still_present=False)[0].seq == 1  # gone: it was sorted
    assert s.counts()["hazardous"] == 1 and s.outbox_size() == 1
    s.begin(event("kitchen"))
    assert s.recover(item_still_present=True) == []  # still there: it will be sorted again
    assert s.counts()["kitchen"] == 0 and s.pending() == []
    assert s.record(event("kitchen")).seq == 2  # no gap for the item that was not sorted
    s.record(event("kitchen"))
    assert s.counts() == {"recyclable": 0, "kitchen": 2, "hazardous": 1, "other": 0}


def test_committing_twice_never_counts_twice(tmp_path):
    s = Store(tmp_path, message=event_message)
    p = s.begin(event())
    s.commit(p)
    s.commit(p)
    assert s.counts()["other"] == 1 and s.outbox_size() == 1


def test_outbox_bound_drops_oldest_and_counts_stay_exact(tmp_path):
    s = Store(tmp_path, outbox_max=100, journal_keep=100, message=event_message)
    for _ in range(130):
        s.record(event())
    assert s.outbox_size() == 100 and s.dropped_messages == 30
    seqs = [json.loads(p)["seq"] for _, _, p, _ in s.outbox_batch(limit=1000)]
    assert seqs == list(range(31, 131))
    assert s.counts()["other"] == 130
    assert len(s.journal(1000)) == 100  # retention


def test_unwritable_state_folder_is_a_clear_error(tmp_path):
    from bin_controller.errors import SmartbinError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SmartbinError, match="cannot open the count database"):
        Store(blocker / "state")


def _simulate(state, port, *args):
    return [sys.executable, "-m", "bin_controller", "simulate", "--fast", "--quiet",
            "--state-dir", str(state), "--mqtt", f"127.0.0.1:{port}", "--bin-id", "k1",
            *args]


def _landed(state) -> int:
    world = state / "sim-world" / "world.json"
    return len(json.loads(world.read_text())["landed"]) if world.is_file() else 0


def _wait_landed(state, n: int, proc, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while _landed(state) < n and proc.poll() is None:
        assert time.monotonic() < end, f"fewer than {n} items landed in {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_mid_run_loses_nothing_and_counts_nothing_twice(tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    listener = Listener(broker.port, topic="smartbin/k1/#", client_id="kill-dashboard")
    state = tmp_path / "state"
    rng = random.Random(7)
    try:
        for run in range(3):
            proc = subprocess.Popen(_simulate(state, broker.port, "--items", "400",
                                              "--pace", "0.01", "--seed", str(run)),
                                    cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            # Killed after a random number of items landed (not after a fixed time, which
            # on a loaded machine may be before the first item).
            _wait_landed(state, _landed(state) + rng.randint(8, 25), proc)
            time.sleep(rng.uniform(0.0, 0.05))  # anywhere in a cycle
            assert proc.poll() is None, "the run ended before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        done = subprocess.run(_simulate(state, broker.port, "--items", "10", "--seed", "9"),
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        world = json.loads((state / "sim-world" / "world.json").read_text())
        landed = [entry["uid"] for entry in world["landed"]]
        assert len(landed) == len(set(landed)), "an item landed twice"
        assert world["platform"] == []
        db = sqlite3.connect(state / "smartbin.db")
        total = db.execute("SELECT SUM(n) FROM counts").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()
        by_bin = dict(db.execute("SELECT bin, n FROM counts").fetchall())
        db.close()
        assert pending == (0,)
        assert total == len(landed) > 30  # every landed item counted once
        for b, n in by_bin.items():
            assert n == sum(1 for e in world["landed"] if e["compartment"] == b)

        def seqs(li):
            return sorted({json.loads(p)["seq"] for p in li.payloads("smartbin/k1/event")})

        assert listener.wait_for(lambda li: len(seqs(li)) == total, timeout=30), \
            (len(seqs(listener)), total)
        assert seqs(listener) == list(range(1, total + 1))
        assert listener.wait_for(lambda li: json.loads(
            li.retained.get("smartbin/k1/counts", b"{}")).get("total") == total)
    finally:
        listener.close()
        broker.stop()


def test_sidecar_follows_the_database(tmp_path):
    """smartbin.db.id: the database's id, last seq and counts, for rebuilding a lost file."""
    s = Store(tmp_path)
    side = json.loads((tmp_path / "smartbin.db.id").read_text())
    assert side["seq"] == 0 and side["reserved"] > 0  # seqs reserved ahead while running
    for _ in range(3):
        s.record(event("kitchen"))
    s.close()
    side = json.loads((tmp_path / "smartbin.db.id").read_text())
    db = sqlite3.connect(tmp_path / "smartbin.db")
    db_id = db.execute("SELECT value FROM meta WHERE key='db_id'").fetchone()[0]
    db.close()
    assert side["db_id"] == db_id
    assert side["seq"] == side["reserved"] == 3 and side["counts"]["kitchen"] == 3
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no leftovers


def test_counted_but_not_cleared_survives_a_restart(tmp_path):
    s = Store(tmp_path, message=event_message)
    assert not s.uncleared()
    s.commit(s.begin(event("kitchen")))
    assert s.uncleared()  # counted, not yet seen to leave the flap
    s.close()
    s = Store(tmp_path, message=event_message)
    assert s.uncleared()
    s.cleared()
    s.close()
    s = Store(tmp_path, message=event_message)
    assert not s.uncleared()
    p = s.begin(event("kitchen"))
    s.commit(p, also=[event("kitchen"), event("kitchen")])  # two slid through beside it
    assert s.counts()["kitchen"] == 4 and [e.seq for e in s.journal()] == [1, 2, 3, 4]
    s.close()


def test_a_database_from_before_the_mark_holds_nothing(tmp_path):
    s = Store(tmp_path, message=event_message)
    s.commit(s.begin(event()))
    s.db.execute("DELETE FROM meta WHERE key='cleared'")  # as an older smartbin left it
    s.close()
    s = Store(tmp_path, message=event_message)
    assert not s.uncleared()
    s.close()


def test_a_jammed_item_found_after_a_restart_is_counted_once(tmp_path):
    """Stopped while an item, already counted, is jammed on the flap; the restarted bin
    finds it there: it waits for the operator instead of sorting it a second time."""
    from bin_controller.config import config_from_dict
    from bin_controller.domain import State
    from hardware_sim.simulate import Simulation, sim_config
    from hardware_sim.sources import GeneratedSource

    cfg = sim_config(config_from_dict({"bin": {"state_dir": str(tmp_path / "state")},
                                       "sensor": {"jam_s": 0.2},
                                       "flap": {"move_s": 0.0, "hold_s": 0.0}}),
                     fast=True, world=tmp_path / "world")
    item = GeneratedSource(5).items(1)[0]
    item.jam = True
    with Simulation(cfg) as sim:
        sim.world.remember(item)
        sim.world.drop(item)
        _until(lambda: sim.loop.state == State.FAULT)
        total = sim.bin.store.snapshot()["total"]
    assert total == 1
    with Simulation(cfg) as sim:
        assert [i.uid for i in sim.world.platform] == [item.uid]  # still there
        _until(lambda: sim.loop.state == State.FAULT)
        time.sleep(0.3)
        assert sim.bin.store.snapshot()["total"] == 1  # not sorted again
        sim.world.clear_jam()
        _until(lambda: not sim.world.platform)
        _until(lambda: sim.loop.state == State.IDLE, message=lambda: (
            sim.loop.state, sim.loop.state_detail, sim.bin.sensor.present))
        assert sim.bin.store.snapshot()["total"] == 1 and not sim.bin.store.uncleared()


def _until(predicate, timeout=10.0, message=lambda: "timed out"):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, message()
        time.sleep(0.01)


def test_flags_read_back_from_the_journal_are_booleans(tmp_path):
    s = Store(tmp_path, message=event_message)
    e = event("other")
    e.uncertain = True
    s.commit(s.begin(e))
    last = s.last_event()
    assert last.uncertain is True and last.failed is False and last.forced is False
    s.begin(event("kitchen"))
    (pending,) = s.pending()
    assert pending.event.uncertain is False
    s.close()
