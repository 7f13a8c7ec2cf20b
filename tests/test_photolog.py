"""The photo log keeps what photos.keep says, within photos.max_mb and photos.keep_days;
photos are the first thing to go when the disk fills, counts never are; and handing a photo
over never holds up the sorting loop."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bin_controller import assembly, photolog
from bin_controller.bins import BINS
from bin_controller.config import PhotosSection, config_from_dict
from bin_controller.domain import SortEvent
from bin_controller.photolog import MB, PhotoLog, comment_seq
from bin_controller.sitelog import ACCEPTED, DATASET, ORDINARY, WAITING, Review, SiteLog
from hardware_sim import items as kinds
from hardware_sim.mechanics import SimItem
from hardware_sim.simulate import Faults, Simulation, sim_config
from tests.test_review_cli import APPLE, BOTTLE, CAN, UnsureOfBottles

DAY = 86400.0



# ------------------------------------------------------------------ helpers


def sim_items(plan: list[kinds.ItemKind], *, seed: int = 1, size: int = kinds.FRAME,
              first: int = 1) -> list[SimItem]:
    rng = np.random.default_rng(seed)
    return [SimItem(first + i, k.name, k.bin, kinds.render(k, rng, size), label_en=k.name_en)
            for i, k in enumerate(plan)]


def bin_config(state: Path, **sections: dict):
    return sim_config(config_from_dict({"bin": {"state_dir": str(state)}, **sections}),
                      fast=True)


def rows(sitelog: SiteLog) -> dict[int, tuple[str | None, str | None, bool, bool]]:
    """seq -> (photo, predicted bin, uncertain, failed) for every row of the log."""
    return {s: (p, b, bool(u), bool(f)) for s, p, b, u, f in sitelog.db.execute(
        "SELECT seq, photo, predicted_bin, uncertain, failed FROM items")}


def files(folder: Path) -> dict[int, Path]:
    """The photos on disk, by the seq their file name carries."""
    return {int(p.stem): p for p in folder.rglob("*.jpg")}


def frame(seed: int, size: int = 64) -> np.ndarray:
    """Noise: every photo of it takes about the same number of bytes."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def event(seq: int, *, uncertain: bool = False, failed: bool = False,
          when: float | None = None) -> SortEvent:
    e = SortEvent(time=time.time() if when is None else when,
                  bin="other" if uncertain or failed else "recyclable",
                  label=None if failed else CAN.name, label_en=None if failed else CAN.name_en,
                  confidence=None if failed else (0.3 if uncertain else 0.99),
                  uncertain=uncertain, failed=failed, forced=False, cycle_ms=1.0,
                  decision_ms=1.0, model="demo", model_version="1", seq=seq,
                  predicted_bin=None if failed else "recyclable")
    return e


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


class Disk:
    """The free space the photo log sees (the `disk_free` seam)."""

    def __init__(self, free: int = 10**12) -> None:
        self.free = free

    def __call__(self, folder: Path) -> int:
        return self.free


@contextlib.contextmanager
def photo_log(folder: Path, disk: Disk | None = None, **cfg):
    sitelog = SiteLog(folder)
    log = PhotoLog(PhotosSection(**cfg), folder / "photos", sitelog, disk_free=disk or Disk())
    log.start()
    try:
        yield log
    finally:
        log.close()
        sitelog.close()


def keep(log: PhotoLog, e: SortEvent, image: np.ndarray | None) -> None:
    """As the loop does: decide, then hand the committed item over."""
    e.photo = image is not None and log.wants(e)
    log.keep(e, image)
    assert log.flush()


def accept(sitelog: SiteLog, *seqs: int) -> None:
    sitelog.review([Review(s, ACCEPTED, CAN.name, "recyclable", "recyclable") for s in seqs],
                   source="test")


def on_disk(log: PhotoLog) -> set[int]:
    return set(files(log.folder))


# ------------------------------------------------------------------ photos.keep


@pytest.mark.parametrize("keep_what", ["all", "uncertain", "none"])
def test_keep_all_uncertain_none(tmp_path, demo, keep_what):
    """Confident cans, uncertain bottles and apples the classifier fails on, sorted by the
    real loop; which photos exist follows photos.keep, and every item is logged."""
    plan = [CAN, BOTTLE, APPLE, CAN, BOTTLE, APPLE, CAN]
    items = sim_items(plan)
    with Simulation(bin_config(tmp_path, photos={"keep": keep_what}),
                    classifier=UnsureOfBottles(demo)) as sim:
        result = sim.drop(items, faults=Faults(classifier_fail={3: 5, 6: 5}))
        photos = sim.bin.photos
        assert photos is not None and photos.flush()
        logged = rows(photos.sitelog)
        last = photos.last
    events = {e.seq: e for e in result.events}
    assert sorted(events) == list(range(1, 8)) and sorted(logged) == list(range(1, 8))
    kept = files(tmp_path / "photos")
    for item in items:
        e = item.events[0]
        waiting = item.true_class != CAN.name
        wanted = keep_what == "all" or (keep_what == "uncertain" and waiting)
        assert e.photo is wanted, item.id
        assert (e.seq in kept) is wanted and (logged[e.seq][0] is not None) is wanted
        if item.true_class == BOTTLE.name:
            assert e.uncertain and e.bin == "other" and e.predicted_bin == "recyclable"
        elif item.true_class == APPLE.name:
            assert e.failed and e.predicted_bin is None
        else:
            assert e.predicted_bin == e.bin == "recyclable" and not e.uncertain
        assert logged[e.seq][1:] == (e.predicted_bin, e.uncertain, e.failed)
    for seq, path in kept.items():
        with Image.open(path) as img:
            img.load()
        assert comment_seq(path.read_bytes()) == seq  # the photo says which item it is
    if keep_what == "none":
        assert kept == {} and last is None
    else:
        assert last is not None and last.seq == 7 and comment_seq(last.jpeg) == 7


# ------------------------------------------------------------------ photos.max_mb


def test_max_mb_takes_confident_unreviewed_photos_oldest_first(tmp_path, caplog):
    size = len(photolog.encode_jpeg(Image.fromarray(frame(0)), 85, 1))
    with photo_log(tmp_path, max_mb=4.5 * size / MB) as log:
        keep(log, event(1, uncertain=True), frame(1))
        for seq in (2, 3, 4):
            keep(log, event(seq), frame(seq))
        accept(log.sitelog, 3)  # reviewed: the site dataset
        assert on_disk(log) == {1, 2, 3, 4}
        keep(log, event(5), frame(5))
        assert on_disk(log) == {1, 3, 4, 5}  # the oldest confident, unreviewed one went
        keep(log, event(6), frame(6))
        keep(log, event(7, uncertain=True), frame(7))
        keep(log, event(8, failed=True), frame(8))
        assert on_disk(log) == {1, 3, 7, 8}  # only waiting and reviewed photos are left
        assert log.dropped == 0 and log.deleted == 4
        with caplog.at_level(logging.WARNING, "bin_controller.photolog"):
            keep(log, event(9), frame(9))
            keep(log, event(10, uncertain=True), frame(10))
        assert on_disk(log) == {1, 3, 7, 8}  # nothing waiting for a review is deleted
        assert log.dropped == 2
        assert [r.getMessage() for r in caplog.records if "max_mb" in r.getMessage()] == [
            f"photos: photos.max_mb ({log.cfg.max_mb:g}) is reached by photos waiting for a "
            "review and reviewed ones; new photos are not kept until some are reviewed "
            "(smartbin review) or photos.max_mb is raised"]
        logged = rows(log.sitelog)
        assert sorted(logged) == list(range(1, 11))  # every item is still logged
        assert {s for s, r in logged.items() if r[0]} == {1, 3, 7, 8}
        assert log.bytes == sum(p.stat().st_size for p in files(log.folder).values())
        assert log.bytes <= log.cfg.max_mb * MB


# ------------------------------------------------------------------ photos.keep_days


def test_keep_days_prunes_old_confident_photos_at_start(tmp_path):
    old = time.time() - 40 * DAY
    with photo_log(tmp_path, keep_days=30) as log:
        keep(log, event(1, when=old), frame(1))  # confident, old: goes
        keep(log, event(2, uncertain=True, when=old), frame(2))  # waits for a review
        keep(log, event(3, when=old), frame(3))  # reviewed below
        keep(log, event(4, when=old), None)  # no photo, nothing to review: forgotten
        keep(log, event(5, when=old), None)  # no photo but reviewed: stays
        keep(log, event(6), frame(6))  # recent
        accept(log.sitelog, 3, 5)
        assert on_disk(log) == {1, 2, 3, 6}
        logged_before = log.sitelog.contamination()["items"]
    with photo_log(tmp_path, keep_days=30) as log:  # a restart prunes
        assert on_disk(log) == {2, 3, 6}
        assert sorted(rows(log.sitelog)) == [2, 3, 5, 6]
        assert log.deleted == 1 and log.bytes == sum(
            p.stat().st_size for p in files(log.folder).values())
        # The reviewed fraction's whole is every item ever logged, pruned or not.
        assert log.sitelog.contamination()["items"] == logged_before == 6
    day = time.strftime("%Y-%m-%d", time.localtime(old))
    assert (tmp_path / "photos" / day).is_dir()  # still holds the waiting and reviewed


def test_keep_days_prunes_while_running(tmp_path, monkeypatch):
    monkeypatch.setattr(photolog, "PRUNE_EVERY_S", 0.0)
    old = time.time() - 2 * DAY
    with photo_log(tmp_path, keep_days=1) as log:
        keep(log, event(1, when=old), frame(1))
        keep(log, event(2, when=old, failed=True), frame(2))
        keep(log, event(3), frame(3))
        assert on_disk(log) == {2, 3}
        assert sorted(rows(log.sitelog)) == [2, 3]
    day = tmp_path / "photos" / time.strftime("%Y-%m-%d", time.localtime(old))
    assert sorted(p.name for p in day.iterdir()) == ["00000002.jpg"]


# ------------------------------------------------------------------ a full disk (the seam)


def test_a_disk_filling_takes_ordinary_then_waiting_then_reviewed(tmp_path, monkeypatch):
    monkeypatch.setattr(photolog, "DELETE_BATCH", 1)  # to see the order photo by photo
    disk = Disk()
    reserve = 1.0
    with photo_log(tmp_path, disk, min_free_mb=reserve) as log:
        for seq in (1, 2, 3):
            keep(log, event(seq), frame(seq))
        for seq in (4, 5, 6):
            keep(log, event(seq, uncertain=True), frame(seq))
        for seq in (7, 8, 9):
            keep(log, event(seq), frame(seq))
        accept(log.sitelog, 7, 8, 9)
        sizes = {s: log.sitelog.item(s).bytes for s in range(1, 10)}
        new = len(photolog.encode_jpeg(Image.fromarray(frame(10)), 85, 10))
        # Short by the three confident photos and a little more: one waiting photo goes.
        disk.free = int(reserve * MB) + new - (sizes[1] + sizes[2] + sizes[3]) - 1
        keep(log, event(10), frame(10))
        assert on_disk(log) == {5, 6, 7, 8, 9, 10}
        # Short by the new confident photo, the waiting ones, the oldest reviewed one and
        # a little more: the reviewed go last, oldest first (#7, #8).
        sizes[10] = log.sitelog.item(10).bytes
        new = len(photolog.encode_jpeg(Image.fromarray(frame(11)), 85, 11))
        disk.free = int(reserve * MB) + new - (sizes[10] + sizes[5] + sizes[6] + sizes[7]) - 1
        keep(log, event(11, uncertain=True), frame(11))
        assert on_disk(log) == {9, 11}
        assert log.dropped == 0
        # Nothing left to delete: the photo is not written, the item is still logged.
        disk.free = 0
        keep(log, event(12), frame(12))
        assert on_disk(log) == set() and log.dropped == 1
        assert sorted(rows(log.sitelog)) == list(range(1, 13))
        assert log.bytes == 0


def test_a_full_disk_never_costs_a_count(tmp_path, demo, monkeypatch):
    """The real loop and store: from item 8 on the photo log sees a disk with less than
    photos.min_free_mb free. Photos go and are not written; every item is counted."""
    disk = Disk()
    monkeypatch.setattr(assembly, "PhotoLog", functools.partial(PhotoLog, disk_free=disk))
    plan = [CAN, BOTTLE, APPLE] * 6
    items = sim_items(plan)
    with Simulation(bin_config(tmp_path), classifier=UnsureOfBottles(demo)) as sim:
        photos, store = sim.bin.photos, sim.bin.store
        assert photos is not None and store is not None
        sim.drop(items[:7])
        assert photos.flush() and len(on_disk(photos)) == 7
        disk.free = 0
        result = sim.drop(items[7:])
        assert photos.flush()
        counts = store.snapshot()
        logged = rows(photos.sitelog)
        faults = dict(sim.loop.fault_counts)
    assert counts["total"] == len(items) == len(result.events)
    for b in BINS:
        assert counts[b] == sum(1 for i in items if i.compartment == b)
    assert sorted(logged) == list(range(1, len(items) + 1))
    assert files(tmp_path / "photos") == {}
    assert photos.dropped == len(items) - 7 and photos.deleted == 7
    assert faults.get("disk_full", 0) >= 1


# ------------------------------------------------------------------ the store's spare hook


def test_the_store_deletes_photos_before_journal_rows(tmp_path, demo):
    """SQLite finds the count database's disk full (Simulation.fill_disk): the store asks
    the photo log first, which gives its photos in the order ordinary, waiting, reviewed;
    only then does the store thin its own journal. No count is lost."""
    plan = [CAN, BOTTLE, CAN, CAN] * 28  # 112: past the journal's floor of 100 rows
    items = sim_items(plan)
    calls: list[dict] = []
    with Simulation(bin_config(tmp_path), classifier=UnsureOfBottles(demo)) as sim:
        photos, store = sim.bin.photos, sim.bin.store
        assert photos is not None and store is not None
        sim.drop(items[:100])
        assert photos.flush()
        reviewed = [s for s, r in rows(photos.sitelog).items() if not r[2]][:10]
        accept(photos.sitelog, *reviewed)
        spare = store.spare
        assert spare is not None

        def watched() -> int:
            left = {kind: len(photos.sitelog.photos(kind, limit=1000))
                    for kind in (ORDINARY, WAITING, DATASET)}
            first, n = store.db.execute("SELECT MIN(seq), COUNT(*) FROM journal").fetchone()
            freed = spare()
            calls.append({"left": left, "first": first, "rows": n, "freed": freed})
            return freed

        store.spare = watched
        result = sim.drop(items[100:], faults=Faults(disk_full={1: 12}))
        assert photos.flush()
        wait_for(lambda: store.held == 0)  # written once space is back
        counts = store.snapshot()
        first_row = store.db.execute("SELECT MIN(seq) FROM journal").fetchone()[0]
        journal_max = store.db.execute("SELECT MAX(seq) FROM journal").fetchone()[0]
    assert counts["total"] == len(items) and journal_max == len(items)
    for b in BINS:
        assert counts[b] == sum(1 for i in items if i.compartment == b)
    assert len(result.events) == len(items)  # every event, across both drops
    giving = [c for c in calls if c["freed"] > 0]
    assert giving, "the store never asked the photo log"
    for c in giving:
        assert c["first"] == 1  # no journal row was deleted while a photo was left
    # The classes went in order: none of a later class while one of an earlier was left.
    for before, after in itertools.pairwise(calls):
        if after["left"][WAITING] < before["left"][WAITING]:
            assert before["left"][ORDINARY] == 0
        if after["left"][DATASET] < before["left"][DATASET]:
            assert before["left"][ORDINARY] == before["left"][WAITING] == 0
    assert calls[0]["left"][DATASET] == 10
    assert first_row > 1  # then, photos gone, the store thinned its journal


def test_photos_spared_for_the_store_are_reported_by_the_store_outside_its_lock(tmp_path, demo):
    """The photo log gives space from inside the store's write, under the store's lock. A
    fault published from there would take paho's lock while paho's own thread, acking a
    message, waits for the store's: a deadlock the soak met. So nothing is reported while
    sparing; the store's own disk_full fault, sent once its lock is free, names the photos."""
    items = sim_items([CAN, BOTTLE, CAN, CAN] * 8)
    reported: list[tuple[str, str, bool]] = []
    sparing = threading.Event()
    with Simulation(bin_config(tmp_path), classifier=UnsureOfBottles(demo)) as sim:
        photos, store = sim.bin.photos, sim.bin.store
        assert photos is not None and store is not None
        sim.drop(items[:20])
        assert photos.flush()
        spare = store.spare
        assert spare is not None

        def watched() -> int:
            sparing.set()
            try:
                return spare()
            finally:
                sparing.clear()

        store.spare = watched
        sim.bin.loop.on_fault.append(
            lambda fault: reported.append((fault.kind, fault.detail, sparing.is_set())))
        sim.drop(items[20:], faults=Faults(disk_full={1: 6}))
        assert photos.flush()
        wait_for(lambda: store.held == 0)
        assert store.snapshot()["total"] == len(items)
    disk_full = [r for r in reported if r[0] == "disk_full"]
    assert disk_full, reported
    assert not any(inside for _, _, inside in reported)
    assert any("MB of photos" in detail for _, detail, _ in disk_full), disk_full


def test_spare_never_claims_space_it_did_not_free(tmp_path):
    """On a full disk the site log may refuse to note a deleted photo: the file is gone but
    its row still names it. Asked again, the photo log must not count those bytes again (the
    store would keep asking instead of freeing its own) and must end at 0."""
    with photo_log(tmp_path) as log:
        for seq in (1, 2, 3):
            keep(log, event(seq), frame(seq))
        total = log.bytes
        set_photo = log.sitelog.set_photo

        def full(seq, photo, *rest):
            if photo is None:
                raise sqlite3.OperationalError("database or disk is full")
            return set_photo(seq, photo, *rest)

        log.sitelog.set_photo = full
        assert log.spare() == total and on_disk(log) == set()
        wal = Path(f"{log.sitelog.path}-wal").stat().st_size
        # Then the site log's WAL, once; then nothing.
        assert [log.spare() for _ in range(3)] == [wal, 0, 0]
        assert log.bytes == 0 and log.deleted == 3
        log.sitelog.set_photo = set_photo  # space is back: the rows are put right
        log.spare()
        assert {s for s, r in rows(log.sitelog).items() if r[0]} == set()
        assert log.bytes == 0 and log.stats()["photos_deleted"] == 3


# ------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs: room for the count database's WAL (SQLite lets it grow to about 4 MB
    before a checkpoint) and a few photos; a 3 MB one fills with the WAL alone."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_disk_filling_up(small_disk, demo):
    """150 items with large photos on a 5 MB disk: it fills many times over. Every item is
    counted, no photo is half written, and photos go before any journal row."""
    state = small_disk / "state"
    plan = [kinds.KINDS[i % len(kinds.KINDS)] for i in range(150)]
    items = sim_items(plan, size=400, seed=2)
    firsts: list[int] = []
    cfg = bin_config(state, photos={"min_free_mb": 0.0, "quality": 95})
    with Simulation(cfg, classifier=demo) as sim:
        photos, store = sim.bin.photos, sim.bin.store
        assert photos is not None and store is not None
        spare = store.spare
        assert spare is not None

        def watched() -> int:
            firsts.append(store.db.execute("SELECT MIN(seq) FROM journal").fetchone()[0])
            return spare()

        store.spare = watched
        result = sim.drop(items)
        assert photos.flush()
        wait_for(lambda: store.held == 0)
        counts = store.snapshot()
        journal = [r[0] for r in store.db.execute("SELECT seq FROM journal ORDER BY seq")]
        logged = {s: (p, n, h) for s, p, n, h in photos.sitelog.db.execute(
            "SELECT seq, photo, bytes, sha256 FROM items")}
        deleted = photos.deleted + photos.dropped
    assert not result.timed_out and len(result.events) == len(items)
    assert counts["total"] == len(items)
    for b in BINS:
        assert counts[b] == sum(1 for i in items if i.compartment == b)
    assert journal == list(range(1, len(items) + 1))  # no journal row was deleted
    # The store itself found the disk full (its WAL grows into the space photos took)
    # and was given photos, never a journal row.
    assert firsts and all(first == 1 for first in firsts)
    assert deleted > 0
    kept = files(state / "photos")
    assert not list((state / "photos").rglob("*.tmp"))
    assert set(kept) == {s for s, (p, _, _) in logged.items() if p}
    for seq, path in kept.items():
        data = path.read_bytes()
        _, size, digest = logged[seq]
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
        with Image.open(path) as img:
            img.load()  # whole
    # Counted again from the disk after the restart: nothing was held in memory.
    again = sqlite3.connect(state / "smartbin.db")
    try:
        assert again.execute("SELECT SUM(n) FROM counts").fetchone()[0] == len(items)
    finally:
        again.close()


# ------------------------------------------------------------------ an older site log


def test_a_site_log_ahead_of_the_counts_is_moved_aside_with_its_photos(tmp_path, demo):
    first = sim_items([CAN, BOTTLE, CAN, CAN, APPLE], seed=4)
    with Simulation(bin_config(tmp_path), classifier=demo) as sim:
        sim.drop(first)
    old_photos = {s: p.read_bytes() for s, p in files(tmp_path / "photos").items()}
    assert sorted(old_photos) == [1, 2, 3, 4, 5]
    for p in tmp_path.glob("smartbin.db*"):  # the count database is lost; the log is not
        p.unlink()
    second = sim_items([APPLE, APPLE], seed=5)
    with Simulation(bin_config(tmp_path), classifier=demo) as sim:
        photos = sim.bin.photos
        assert photos is not None and photos.sitelog.set_aside is not None
        assert photos.last is None  # not the old #5's picture
        sim.drop(second)
        assert photos.flush()
        assert sorted(rows(photos.sitelog)) == [1, 2]
        assert photos.last is not None and photos.last.seq == 2
    aside_logs = list(tmp_path.glob("sitelog-*.db"))
    aside_photos = [p for p in tmp_path.glob("photos-*") if p.is_dir()]
    assert len(aside_logs) == 1 and len(aside_photos) == 1
    old = sqlite3.connect(aside_logs[0])
    try:
        assert [r[0] for r in old.execute("SELECT seq FROM items ORDER BY seq")] == \
            [1, 2, 3, 4, 5]
    finally:
        old.close()
    assert {s: p.read_bytes() for s, p in files(aside_photos[0]).items()} == old_photos
    new = files(tmp_path / "photos")
    assert sorted(new) == [1, 2] and new[1].read_bytes() != old_photos[1]


# ------------------------------------------------------------------ the loop never waits


def test_a_stuck_writer_never_holds_up_the_loop(tmp_path, demo, monkeypatch):
    """The photo writer hangs on its first item: the loop sorts and counts on, frames past
    MAX_QUEUED_FRAMES are dropped, and once the writer is free every item is logged."""
    release = threading.Event()

    class StuckSiteLog(SiteLog):
        def add_item(self, event: SortEvent) -> None:
            release.wait(60)
            super().add_item(event)

    monkeypatch.setattr(assembly, "SiteLog", StuckSiteLog)
    extra = 6
    n = photolog.MAX_QUEUED_FRAMES + extra
    items = sim_items([CAN, APPLE, BOTTLE] * (n // 3 + 1))[:n]
    try:
        with Simulation(bin_config(tmp_path), classifier=demo) as sim:
            photos, store = sim.bin.photos, sim.bin.store
            assert photos is not None and store is not None
            result = sim.drop(items, item_timeout_s=20)
            assert not result.timed_out
            assert store.snapshot()["total"] == n  # counted while the writer hung
            assert all(e.photo for e in result.events)
            assert photos.dropped == extra
            release.set()
            assert photos.flush()
            logged = rows(photos.sitelog)
    finally:
        release.set()
    assert sorted(logged) == list(range(1, n + 1))
    assert sorted(files(tmp_path / "photos")) == list(range(1, photolog.MAX_QUEUED_FRAMES + 1))


def test_photo_file_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails midway (a full disk) leaves no file, whole or half."""
    real_replace = os.replace

    def full(src, dst):
        raise OSError(28, "No space left on device")

    with photo_log(tmp_path, Disk()) as log:
        monkeypatch.setattr(photolog.os, "replace", full)
        keep(log, event(1), frame(1))
        monkeypatch.setattr(photolog.os, "replace", real_replace)
        assert list((tmp_path / "photos").rglob("*.jp*")) == []
        assert log.dropped == 1 and rows(log.sitelog)[1][0] is None


# ------------------------------------------------------------------ the benchmark


@pytest.mark.parametrize("keep_what", ["all", "none"])
def test_bench_cycle_with_and_without_photos(keep_what):
    from tests.test_cli import smartbin

    r = smartbin("bench", "cycle", "--items", "6", "--photos", keep_what)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"SQLite store, photos.keep = {keep_what}" in lines[0]
    assert any(line.startswith("sensor edge -> item counted   p50") for line in lines)
    assert any(line.startswith("photo hand-off (in the loop)  p50") for line in lines)
    writer = next(line for line in lines if line.startswith("photo writer"))
    if keep_what == "all":
        assert "per photo (encode, write, log row); 6 photos" in writer
    else:
        assert writer.endswith("no photos written")
