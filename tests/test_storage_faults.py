"""Storage faults never stop the bin and never lose a count: a full disk, a corrupt,
truncated or vanished database. A full disk is made by SQLite itself: `PRAGMA
max_page_count` on the store's connection makes writes fail with SQLITE_FULL ("database or
disk is full"); raising it again is space coming back."""

from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bin_controller import store as store_module
from bin_controller.bins import BINS
from bin_controller.errors import StoreError
from bin_controller.payloads import event_message
from bin_controller.store import Store
from bin_controller.store_recovery import check_store, inspect
from tests.test_store import event

DB = "smartbin.db"


# ---------------------------------------------------------------------------- helpers


def fill_disk(store: Store) -> None:
    """From now on, any write that needs a new page fails as on a full disk (the file
    compacted first, so no free page is left to fill)."""
    store.db.execute("VACUUM")
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")


def free_disk(store: Store) -> None:
    store.db.execute("PRAGMA max_page_count=1073741823")


def ack_all(store: Store) -> None:
    """As a connected broker would: the outbox is empty, nothing of it left to free."""
    for oid, *_ in store.outbox_batch(limit=100_000):
        store.acked(oid)


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def db_rows(state: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(state / DB)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def big(bin_name: str = "other"):
    """An item with a long label: a few fill a page, so a full disk shows at once."""
    return event(bin_name, label="x" * 400)


def outbox_seqs(store: Store) -> list[int]:
    return [json.loads(p)["seq"] for _, _, p, _ in store.outbox_batch(limit=100_000)]


def filled(state: Path, n: int, seed: int = 0) -> dict[str, int]:
    """A closed store that counted n items, some still waiting in the outbox."""
    rng = random.Random(seed)
    s = Store(state, message=event_message)
    for _ in range(n):
        s.commit(s.begin(event(rng.choice(BINS))))
    counts = s.counts()
    s.close()
    return counts


def pages_of(path: Path, table: str, kind: str = "leaf") -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name=? AND pagetype=? ORDER BY pageno",
            (table, kind))]
    finally:
        db.close()


def garble_page(path: Path, page: int, seed: int = 1) -> None:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    with path.open("r+b") as f:
        f.seek((page - 1) * size)
        f.write(random.Random(seed).randbytes(size))


def asides(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if ".corrupt-" in p.name)


class Faults(list[tuple[str, str]]):
    def __call__(self, kind: str, detail: str) -> None:
        self.append((kind, detail))

    def kinds(self) -> list[str]:
        return [k for k, _ in self]


# ---------------------------------------------------------------------------- a full disk


@pytest.fixture(scope="module")
def demo():
    from bin_controller.vision.classifier import Classifier

    return Classifier("demo")


def test_disk_full_mid_run_keeps_sorting_and_loses_no_count(tmp_path, demo):
    """The real loop on the simulator: the disk fills after item 6 and space comes back
    after item 40. Every item is sorted and counted once, with seqs 1..N and its event."""
    from bin_controller.config import config_from_dict
    from hardware_sim.simulate import run_simulation
    from hardware_sim.sources import GeneratedSource
    from tests.test_simulator import assert_consistent

    state = tmp_path / "state"
    store = Store(state, message=event_message)
    seen = {"done": 0}

    def on_item(item) -> None:
        seen["done"] += 1
        if 6 <= seen["done"] < 40:
            ack_all(store)  # a broker takes every event as it comes
        if seen["done"] == 6:
            fill_disk(store)
        if seen["done"] == 40:
            seen["held"] = store.held
            seen["first_held"] = store.last_seq() - store.held + 1
            seen["total"] = store.snapshot()["total"]
            free_disk(store)

    items = GeneratedSource(21).items(46)
    result = run_simulation(config_from_dict({}), items, demo, fast=True, recorder=store,
                            on_item=on_item)
    assert_consistent(result, 46)
    assert seen["held"] > 0  # the disk really was full: counted in memory
    assert seen["total"] == 40  # and shown
    assert result.loop.fault_counts.get("disk_full") == 1
    assert "counting in memory" in result.loop.faults[-1].detail
    wait_for(lambda: store.held == 0)
    # The events of the items held in memory were queued, in order, with the rest.
    assert outbox_seqs(store) == list(range(seen["first_held"], 47))
    assert store.dropped_messages == 0
    store.close()
    assert [r[0] for r in db_rows(state, "SELECT seq FROM journal ORDER BY seq")] == \
        list(range(1, 47))
    counts = dict(db_rows(state, "SELECT bin, n FROM counts"))
    for b in BINS:
        assert counts[b] == sum(1 for i in result.items if i.compartment == b)
    assert db_rows(state, "SELECT COUNT(*) FROM pending") == [(0,)]


def test_full_disk_frees_old_journal_rows_first_then_old_messages(tmp_path):
    faults = Faults()
    s = Store(tmp_path, message=event_message, on_fault=faults)
    for _ in range(400):
        s.record(event("kitchen"))
    ack_all(s)
    for _ in range(100):  # unsent: the outbox holds 100 messages
        s.record(event("kitchen"))
    fill_disk(s)
    while not s.dropped_messages:
        s.record(event("other"))
        assert s.last_seq() < 2000, "never freed the outbox"
    journal = s.journal(10_000)
    # The journal went down to its floor before any message was dropped.
    assert len(journal) <= store_module.JOURNAL_FLOOR + 60
    assert journal[-1].seq == s.last_seq()
    assert faults.kinds() == ["disk_full"]
    assert "old journal rows" in faults[0][1]
    total = s.last_seq()
    assert s.snapshot()["total"] == total
    s.close()
    again = Store(tmp_path)
    assert again.snapshot()["total"] == total  # nothing counted in memory was lost
    again.close()


def test_items_held_in_memory_are_written_in_order_when_space_returns(tmp_path):
    faults = Faults()
    s = Store(tmp_path, message=event_message, on_fault=faults)
    for _ in range(5):
        s.commit(s.begin(event("kitchen")))
    fill_disk(s)
    mixed = ["recyclable", "hazardous", "other"] * 10
    for name in mixed:
        s.commit(s.begin(big(name)))
        ack_all(s)  # a broker takes each event: nothing of the outbox left to free
    s.record(big("other"))  # an item that slid through, counted too
    held = s.held
    assert held > 10
    assert faults.kinds() == ["disk_full"]
    assert "nothing more of its own to delete" in faults[0][1]
    assert "counting in memory" in faults[0][1]
    shown = s.counts()
    assert shown == {"recyclable": 10, "kitchen": 5, "hazardous": 10, "other": 11}
    assert s.snapshot()["total"] == 36
    assert s.last_seq() == 36 and s.last_event().seq == 36
    free_disk(s)
    # No further item comes: the store writes the backlog by itself.
    wait_for(lambda: s.held == 0)
    assert [e.seq for e in s.journal(1000)] == list(range(1, 37))
    assert [e.bin for e in s.journal(1000)][5:] == [*mixed, "other"]
    assert outbox_seqs(s) == list(range(37 - held, 37))  # their events, in order
    assert s.pending() == []
    s.close()
    again = Store(tmp_path)
    assert again.counts() == shown and again.last_seq() == 36
    assert again.record(event()).seq == 37
    again.close()


def test_reset_while_items_are_held_counts_nothing_twice(tmp_path):
    s = Store(tmp_path)
    s.record(event("kitchen"))
    fill_disk(s)
    for _ in range(20):
        s.record(big("kitchen"))
    assert s.held > 0
    s.reset_counts()  # it only updates rows in place: written even on a full disk
    assert s.counts() == dict.fromkeys(BINS, 0)
    s.record(big("other"))
    free_disk(s)
    wait_for(lambda: s.held == 0)
    assert s.counts() == {**dict.fromkeys(BINS, 0), "other": 1}
    assert [e.seq for e in s.journal(1000)] == list(range(1, 23))
    s.close()
    assert Store(tmp_path).counts()["other"] == 1


def test_committing_twice_while_held_counts_once(tmp_path):
    s = Store(tmp_path)
    s.record(event())
    p = s.begin(event("hazardous"))
    fill_disk(s)
    for _ in range(20):
        s.record(big())
    assert s.held > 0
    s.commit(p)
    s.commit(p)
    assert s.counts()["hazardous"] == 1
    free_disk(s)
    wait_for(lambda: s.held == 0)
    assert s.counts()["hazardous"] == 1 and s.pending() == []
    s.close()


def test_unacknowledged_message_on_a_full_disk_is_kept_not_raised(tmp_path, monkeypatch):
    s = Store(tmp_path, message=event_message)
    s.record(event())
    (oid, *_), = s.outbox_batch()

    class Full:
        def execute(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(s, "db", Full())
    s.acked(oid)  # a paho callback: must not raise
    monkeypatch.undo()
    assert s.outbox_size() == 1
    s.close()


def test_full_disk_at_start_is_one_clear_store_error(tmp_path, monkeypatch):
    real = store_module.connect

    def full_connect(path, synchronous, **kw):
        db = real(path, synchronous, **kw)
        db.execute("PRAGMA max_page_count=1")
        return db

    monkeypatch.setattr(store_module, "connect", full_connect)
    with pytest.raises(StoreError, match=r"the disk is full.*free some space"):
        Store(tmp_path / "state")


def test_corrupt_database_on_a_full_disk_stays_put_until_it_can_be_rebuilt(tmp_path,
                                                                          monkeypatch):
    counts = filled(tmp_path, 150)
    path = tmp_path / DB
    garble_page(path, pages_of(path, "journal")[0])
    damaged = path.read_bytes()
    real = store_module.connect

    def full_connect(path, synchronous, **kw):
        db = real(path, synchronous, **kw)
        db.execute("PRAGMA max_page_count=1")
        return db

    monkeypatch.setattr(store_module, "connect", full_connect)
    with pytest.raises(StoreError, match="the disk is full"):
        Store(tmp_path)
    assert path.read_bytes() == damaged and asides(tmp_path) == []  # nothing moved
    assert not (tmp_path / f"{DB}.new").exists()
    monkeypatch.undo()  # space is back: the same old file is read, nothing lost
    s = Store(tmp_path)
    assert s.counts() == counts and s.recovery and "counts table" in s.recovery
    s.close()


def test_sound_database_opens_on_a_full_disk_and_counts_in_memory(tmp_path, monkeypatch):
    filled(tmp_path, 10)
    real = store_module.connect

    def full_connect(path, synchronous, **kw):
        db = real(path, synchronous, **kw)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages}")
        return db

    monkeypatch.setattr(store_module, "connect", full_connect)
    s = Store(tmp_path, message=event_message)
    for _ in range(20):
        s.record(big())
    assert s.held > 0 and s.snapshot()["total"] == 30
    s.close()  # still full: what could not be written is logged, not raised


# ---------------------------------------------------------------------------- corruption


def test_corrupt_journal_pages_keep_exact_counts_and_seq(tmp_path, caplog):
    counts = filled(tmp_path, 300)
    path = tmp_path / DB
    leaves = pages_of(path, "journal")
    for i, page in enumerate(leaves[:3]):
        garble_page(path, page, seed=i)
    faults = Faults()
    with caplog.at_level(logging.WARNING):
        s = Store(tmp_path, message=event_message, on_fault=faults)
    assert s.counts() == counts
    assert s.record(event()).seq == 301  # no seq reused, none skipped
    assert faults.kinds() == ["store_recovered"]
    assert "counts table of the old file" in faults[0][1]
    assert len(asides(tmp_path)) == 1
    s.close()
    assert Store.inspect(tmp_path).startswith("ok, 301 items")
    assert "rebuilt" in inspect(tmp_path)


def test_damaged_header_of_a_crashed_database_is_moved_aside_with_its_wal(tmp_path):
    running = tmp_path / "running"
    s = Store(running, message=event_message)
    for _ in range(10):
        s.record(event("hazardous"))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for f in running.iterdir():  # the files as a power cut leaves them
        shutil.copy(f, crashed / f.name)
    s.close()
    assert (crashed / f"{DB}-wal").stat().st_size > 0
    with (crashed / DB).open("r+b") as f:
        f.write(b"SQLite format 4\x00")
    faults = Faults()
    again = Store(crashed, on_fault=faults)
    assert "header" in faults[0][1]
    names = asides(crashed)
    assert len(names) == 3 and names[1:] == [names[0] + "-shm", names[0] + "-wal"]
    # The sidecar was saved at open (seq 0) and reserved seqs ahead: counts from it,
    # and the next seq above any the lost file can have given.
    assert again.record(event()).seq > 10
    again.close()


def test_lost_counts_table_is_rebuilt_from_sidecar_and_journal(tmp_path):
    filled(tmp_path, 250)  # the sidecar was saved at close: 250 items
    s = Store(tmp_path, message=event_message)
    added = dict.fromkeys(BINS, 0)
    for i in range(30):  # counted after the sidecar's last refresh
        name = BINS[i % 4]
        s.record(event(name))
        added[name] += 1
    expected = s.counts()
    s.db.close()  # killed: no refresh on close
    path = tmp_path / DB
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    garble_page(path, pages_of(path, "counts")[0])
    faults = Faults()
    s = Store(tmp_path, on_fault=faults)
    assert s.counts() == expected
    assert "smartbin.db.id" in faults[0][1] and "30 journal rows after it" in faults[0][1]
    assert s.record(event()).seq == 281
    s.close()


def test_lost_counts_table_without_sidecar_is_rebuilt_from_the_journal(tmp_path):
    counts = filled(tmp_path, 120)
    (tmp_path / f"{DB}.id").unlink()
    path = tmp_path / DB
    garble_page(path, pages_of(path, "counts")[0])
    faults = Faults()
    s = Store(tmp_path, on_fault=faults)
    assert s.counts() == counts and s.last_seq() == 120
    assert "the journal of the old file (120 rows)" in faults[0][1]
    s.close()


def test_garbage_after_the_header_keeps_the_counts_from_the_sidecar(tmp_path):
    counts = filled(tmp_path, 40)
    path = tmp_path / DB
    data = bytearray(path.read_bytes())
    data[100:] = random.Random(3).randbytes(len(data) - 100)
    path.write_bytes(bytes(data))
    faults = Faults()
    s = Store(tmp_path, on_fault=faults)
    assert s.counts() == counts
    assert s.record(event()).seq == 41  # closed cleanly: the sidecar knew the exact seq
    assert "smartbin.db.id" in faults[0][1] and "moved aside" in faults[0][1]
    assert len(asides(tmp_path)) == 1
    s.close()


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_truncated_or_vanished_database_is_never_silently_zeroed(tmp_path, how):
    counts = filled(tmp_path, 25)
    path = tmp_path / DB
    if how == "truncated":
        path.write_bytes(b"")
    else:
        path.unlink()
    assert inspect(tmp_path).startswith("missing:")
    with pytest.raises(StoreError, match=r"missing.*had counted 25 items"):
        check_store(tmp_path)
    faults = Faults()
    s = Store(tmp_path, message=event_message, on_fault=faults)
    assert s.counts() == counts and sum(counts.values()) == 25
    assert s.record(event()).seq == 26
    assert faults.kinds() == ["store_recovered"]
    assert ("is empty" if how == "truncated" else "is missing") in faults[0][1]
    assert len(asides(tmp_path)) == (1 if how == "truncated" else 0)
    s.close()


def test_sidecar_reserves_seqs_so_a_killed_bin_never_reuses_one(tmp_path):
    s = Store(tmp_path, message=event_message)
    for _ in range(130):
        s.record(event())
    s.sidecar.flush()  # the refresh at item 100 (written in the background) landed
    s.db.close()  # killed: no refresh on close
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"{DB}{suffix}").unlink(missing_ok=True)
    s = Store(tmp_path)
    # Items 101..130 are lost with the file; seqs up to 200 may have been published.
    assert s.counts()["other"] == 100
    assert s.record(event()).seq > 130
    s.close()


def test_bad_sidecar_is_ignored_and_rewritten(tmp_path):
    counts = filled(tmp_path, 5)
    side = tmp_path / f"{DB}.id"
    side.write_text("{not json")
    s = Store(tmp_path)
    assert s.counts() == counts
    s.close()
    assert json.loads(side.read_text())["seq"] == 5


def test_database_behind_its_sidecar_does_not_reuse_seqs(tmp_path):
    """A database restored from an old copy: the counts are the copy's, the seqs go on."""
    filled(tmp_path, 10)
    backup = tmp_path / "backup.db"
    shutil.copy(tmp_path / DB, backup)
    s = Store(tmp_path)
    for _ in range(20):
        s.record(event())
    s.close()
    shutil.copy(backup, tmp_path / DB)
    s = Store(tmp_path)
    assert s.record(event()).seq > 30
    s.close()


@pytest.mark.parametrize("code", [sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY,
                                  sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN])
def test_machine_trouble_is_a_store_error_never_a_rebuild(tmp_path, monkeypatch, code):
    """An I/O error, a lock or permissions say nothing about the file: it stays put."""
    filled(tmp_path, 3)

    def failing(path, synchronous, **kw):
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = code
        raise exc

    monkeypatch.setattr(store_module, "connect", failing)
    with pytest.raises(StoreError, match="cannot open the count database: disk I/O error"):
        Store(tmp_path)
    assert asides(tmp_path) == []
    monkeypatch.undo()
    s = Store(tmp_path)  # the machine is fine again: the same file, untouched
    assert s.recovery is None and s.last_seq() == 3 and asides(tmp_path) == []
    s.close()


def test_inspect_changes_nothing(tmp_path):
    assert inspect(tmp_path).startswith("new:")
    filled(tmp_path, 12)
    path = tmp_path / DB

    def snapshot():
        return {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    before = snapshot()
    line = inspect(tmp_path)
    assert line.startswith("ok, 12 items") and snapshot() == before
    assert check_store(tmp_path) == line
    garble_page(path, pages_of(path, "journal")[0])
    before = snapshot()
    line = inspect(tmp_path)
    assert line.startswith("corrupt:") and "counts table of the old file" in line
    assert snapshot() == before
    with pytest.raises(StoreError, match=r"^corrupt:"):
        check_store(tmp_path)


# ---------------------------------------------------------------------------- any damage


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("template")
    filled(state, 60)
    s = Store(state, message=event_message)
    for name in BINS:  # mid-cycle when the power went
        s.begin(event(name, label="y" * 50))
    s.close()
    return state


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1,
                                                                             max_size=64)),
                       min_size=1, max_size=8),
       cut=st.none() | st.floats(0, 1))
def test_any_damage_opens_or_is_a_store_error(template, tmp_path_factory, damage, cut):
    state = tmp_path_factory.mktemp("damaged")
    for f in template.iterdir():
        shutil.copy(f, state / f.name)
    path = state / DB
    data = bytearray(path.read_bytes())
    for where, garbage in damage:
        at = int(where * len(data))
        data[at:at + len(garbage)] = garbage
    if cut is not None:
        data = data[:int(cut * len(data))]
    path.write_bytes(bytes(data))
    try:
        s = Store(state, message=event_message)
    except StoreError:
        return
    counts = s.counts()
    assert set(counts) == set(BINS) and all(n >= 0 for n in counts.values())
    for recovered in s.recover(item_still_present=False):
        assert recovered.seq > 60  # never a seq used before
    assert s.record(event()).seq > 60
    assert s.last_event() is not None and s.journal(1000)
    after = s.counts()
    s.close()
    again = Store(state)
    assert again.counts() == after
    again.close()
    assert inspect(state).startswith("ok")


def test_damaged_database_from_an_older_smartbin_is_rebuilt_too(tmp_path):
    """A file written before the frame columns existed: its journal is still read."""
    from bin_controller.store import EVENT_FIELDS

    old_fields = [f for f in EVENT_FIELDS
                  if f not in ("frame_time", "exposure_us", "analogue_gain")]
    path = tmp_path / DB
    db = sqlite3.connect(path)
    db.executescript(f"""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE counts (bin TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE journal (seq INTEGER PRIMARY KEY, {", ".join(old_fields)});
        INSERT INTO meta VALUES ('schema', '1'), ('seq', '7');
        INSERT INTO counts VALUES ('hazardous', 7);
    """)
    for seq in range(1, 8):
        row = {**event("hazardous").to_dict(), "uncertain": 0, "failed": 0, "forced": 0}
        db.execute(f"INSERT INTO journal (seq, {', '.join(old_fields)}) VALUES "
                   f"(?, {', '.join('?' * len(old_fields))})",
                   (seq, *[row[f] for f in old_fields]))
    db.commit()
    db.close()
    garble_page(path, pages_of(path, "counts")[0])
    faults = Faults()
    s = Store(tmp_path, on_fault=faults)
    assert s.counts()["hazardous"] == 7 and s.last_seq() == 7
    assert "the journal of the old file (7 rows)" in faults[0][1]
    assert s.journal(1)[0].frame_time is None
    s.close()
