"""The site log: every item the bin sorted, its photo, and what a reviewer said about it.

A SQLite database of its own (`sitelog.db` in the state folder), apart from the count
database: the photo writer and the review commands write here on threads of their own, so
they never hold the lock the sorting cycle commits under, and a damaged count database that
is rebuilt never takes the reviews with it. Counts stay in the count database (what
physically happened); this log says which of those items were wrong.

Tables: `items` (one row per item: what the bin decided and where it went, and the photo
file when one is kept), `reviews` (the verdict per item: accepted, or corrected to a label
and its bin; with the compartment the item reached, so a review stands on its own), and
`labels` (labels a reviewer introduced that the model does not know yet, with their bin).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bin_controller.bins import BINS
from bin_controller.domain import SortEvent
from bin_controller.errors import StoreError

log = logging.getLogger(__name__)

SITELOG_NAME = "sitelog.db"
# Pages the WAL may hold before it is checkpointed (and cut back to, after).
WAL_PAGES = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    label TEXT,
    label_en TEXT,
    confidence REAL,
    predicted_bin TEXT,
    bin TEXT NOT NULL,
    uncertain INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    forced INTEGER NOT NULL,
    model TEXT,
    model_version TEXT,
    photo TEXT,
    bytes INTEGER,
    sha256 TEXT
);
CREATE INDEX IF NOT EXISTS items_photo_time ON items (time) WHERE photo IS NOT NULL;
CREATE TABLE IF NOT EXISTS reviews (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    verdict TEXT NOT NULL,
    label TEXT,
    bin TEXT NOT NULL,
    reached TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    name TEXT PRIMARY KEY,
    bin TEXT NOT NULL,
    time REAL NOT NULL
);
"""

ACCEPTED = "accepted"
CORRECTED = "corrected"

# Why a photo is kept, in the order the photos go when space is short: confident items
# nobody reviewed, then items waiting for a review, then the reviewed (the site dataset).
ORDINARY, WAITING, DATASET = "ordinary", "waiting", "dataset"
PHOTO_CLASSES = (ORDINARY, WAITING, DATASET)

_CLASS_WHERE = {
    ORDINARY: "i.uncertain = 0 AND i.failed = 0 AND r.seq IS NULL",
    WAITING: "(i.uncertain = 1 OR i.failed = 1) AND r.seq IS NULL",
    DATASET: "r.seq IS NOT NULL",
}


@dataclass(frozen=True)
class Item:
    """One row of the log, with its review when it has one."""

    seq: int
    time: float
    label: str | None
    label_en: str | None
    confidence: float | None
    predicted_bin: str | None  # the bin the model's label belongs to
    bin: str  # the compartment the item reached
    uncertain: bool
    failed: bool
    forced: bool
    model: str | None
    model_version: str | None
    photo: str | None  # file relative to the photos folder, None when none is kept
    bytes: int | None
    sha256: str | None
    verdict: str | None = None
    true_label: str | None = None
    true_bin: str | None = None
    reviewed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        review = None if self.verdict is None else {
            "verdict": self.verdict, "label": self.true_label, "bin": self.true_bin,
            "time": self.reviewed_at}
        return {"seq": self.seq, "time": self.time, "label": self.label,
                "label_en": self.label_en, "confidence": self.confidence,
                "bin": self.predicted_bin, "compartment": self.bin, "uncertain": self.uncertain,
                "failed": self.failed, "forced": self.forced, "model": self.model,
                "model_version": self.model_version, "photo": self.photo is not None,
                "review": review}


@dataclass(frozen=True)
class Review:
    seq: int
    verdict: str
    label: str | None  # the true label (None: accepted an item the model could not name)
    bin: str  # the true bin
    reached: str  # the compartment the item reached


_ITEM_COLUMNS = ("i.seq, i.time, i.label, i.label_en, i.confidence, i.predicted_bin, i.bin, "
                 "i.uncertain, i.failed, i.forced, i.model, i.model_version, i.photo, "
                 "i.bytes, i.sha256, r.verdict, r.label, r.bin, r.time")
_FROM = "items i LEFT JOIN reviews r ON r.seq = i.seq"


def _item(row: Sequence[Any]) -> Item:
    values = list(row)
    for i in (7, 8, 9):
        values[i] = bool(values[i])
    return Item(*values)


class SiteLog:
    """Thread-safe: the photo writer, command threads and the CLI share one connection
    each, and SQLite (WAL) lets the service and a CLI in another process use it at once."""

    def __init__(self, state_dir: str | Path, *, last_seq: int | None = None) -> None:
        self.path = Path(state_dir) / SITELOG_NAME
        self._lock = threading.RLock()
        self.set_aside: Path | None = None  # where an old log that was ahead went
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if last_seq is not None:
                self._set_aside_if_ahead(last_seq)
            self.db = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the site log: {exc}; set "
                             "bin.state_dir (or --state-dir) to a writable folder") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a power cut may lose the last few photo rows (the files are found
            # again at start); a review is committed FULL on its own (see _write).
            db.execute("PRAGMA synchronous=NORMAL")
            # Two small writes per item: a WAL left to SQLite's default would grow to 4 MB
            # before its first checkpoint, space a nearly full disk needs for the counts.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside_if_ahead(self, last_seq: int) -> None:
        """A log holding seqs the count database has not given yet belongs to an older count
        database (the state folder was partly wiped): its seqs would be given again to new
        items and pair them with old photos and reviews. It is moved aside, not deleted."""
        if not self.path.exists():
            return
        db = sqlite3.connect(self.path)
        try:
            top = db.execute("SELECT MAX(seq) FROM items").fetchone()[0]
        except sqlite3.Error:
            top = None
        finally:
            db.close()
        if isinstance(top, int) and top > last_seq:
            aside = self.path.with_name(f"{self.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}.db")
            log.warning("%s holds items up to #%d but the count database is at #%d: moved "
                        "aside to %s; a new site log starts", self.path, top, last_seq,
                        aside.name)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self.set_aside = aside

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.db.close()

    def shrink(self) -> int:
        """Checkpoint the WAL and cut it to nothing (a full disk); the bytes given back."""
        wal = Path(f"{self.path}-wal")
        with self._lock:
            before = _file_size(wal)
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return max(0, before - _file_size(wal))

    def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        with self._lock:
            return self.db.execute(sql, tuple(params)).rowcount

    # ------------------------------------------------------------------ items and photos

    def add_item(self, event: SortEvent) -> None:
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                added = db.execute(
                    "INSERT OR IGNORE INTO items (seq, time, label, label_en, confidence, "
                    "predicted_bin, bin, uncertain, failed, forced, model, model_version) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (event.seq, event.time, event.label, event.label_en, event.confidence,
                     event.predicted_bin, event.bin, int(event.uncertain), int(event.failed),
                     int(event.forced), event.model, event.model_version)).rowcount
                # Items ever logged: the reviewed fraction's whole, which pruning old rows
                # must not shrink.
                db.execute("INSERT INTO meta VALUES ('logged', ?) ON CONFLICT (key) DO UPDATE "
                           "SET value = CAST(value AS INTEGER) + ?", (added, added))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def set_photo(self, seq: int, photo: str | None, size: int | None = None,
                  sha256: str | None = None) -> None:
        self._write("UPDATE items SET photo = ?, bytes = ?, sha256 = ? WHERE seq = ?",
                    (photo, size, sha256, seq))

    def photo_bytes(self) -> int:
        with self._lock:
            return int(self.db.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM items WHERE photo IS NOT NULL"
            ).fetchone()[0])

    def photos(self, kind: str, *, limit: int, before: float | None = None) -> list[Item]:
        """Photos of one class (ORDINARY, WAITING, DATASET), oldest first."""
        where = _CLASS_WHERE[kind]
        params: list[Any] = []
        if before is not None:
            where += " AND i.time < ?"
            params.append(before)
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM {_FROM} WHERE i.photo IS NOT NULL AND {where} "
                "ORDER BY i.seq LIMIT ?", (*params, limit)).fetchall()
        return [_item(r) for r in rows]

    def all_photos(self) -> list[tuple[int, str]]:
        with self._lock:
            return [(int(s), str(p)) for s, p in self.db.execute(
                "SELECT seq, photo FROM items WHERE photo IS NOT NULL ORDER BY seq")]

    def forget_old_rows(self, before: float) -> int:
        """Rows with no photo and no review, older than `before`: nothing left to review."""
        return self._write("DELETE FROM items WHERE time < ? AND photo IS NULL AND seq NOT IN "
                           "(SELECT seq FROM reviews)", (before,))

    # ------------------------------------------------------------------ reading

    def item(self, seq: int) -> Item | None:
        with self._lock:
            row = self.db.execute(f"SELECT {_ITEM_COLUMNS} FROM {_FROM} WHERE i.seq = ?",
                                  (seq,)).fetchone()
        return _item(row) if row else None

    def items(self, seqs: Sequence[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        with self._lock:
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                marks = ", ".join("?" * len(chunk))
                for row in self.db.execute(f"SELECT {_ITEM_COLUMNS} FROM {_FROM} WHERE "
                                           f"i.seq IN ({marks})", tuple(chunk)):
                    item = _item(row)
                    out[item.seq] = item
        return out

    def query(self, *, uncertain: bool = False, failed: bool = False,
              unreviewed: bool = False, label: str | None = None, bin_name: str | None = None,
              with_photo: bool = False, before: int | None = None,
              limit: int = 20) -> tuple[list[Item], int]:
        """Items matching every filter, newest first, `limit` from below `before` (a seq);
        and how many match in all."""
        where, params = ["1"], []
        if uncertain and failed:
            where.append("(i.uncertain = 1 OR i.failed = 1)")
        elif uncertain:
            where.append("i.uncertain = 1")
        elif failed:
            where.append("i.failed = 1")
        if unreviewed:
            where.append("r.seq IS NULL")
        if label is not None:
            where.append("(i.label = ? OR i.label_en = ? OR r.label = ?)")
            params += [label, label, label]
        if bin_name is not None:
            where.append("(i.bin = ? OR i.predicted_bin = ?)")
            params += [bin_name, bin_name]
        if with_photo:
            where.append("i.photo IS NOT NULL")
        clause = " AND ".join(where)
        with self._lock:
            total = int(self.db.execute(f"SELECT COUNT(*) FROM {_FROM} WHERE {clause}",
                                        params).fetchone()[0])
            page = params + ([before] if before is not None else []) + [limit]
            rows = self.db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM {_FROM} WHERE {clause}"
                + (" AND i.seq < ?" if before is not None else "")
                + " ORDER BY i.seq DESC LIMIT ?", page).fetchall()
        return [_item(r) for r in rows], total

    def reviewed(self) -> list[Item]:
        """Every reviewed item with its photo, oldest first (the site dataset)."""
        with self._lock:
            rows = self.db.execute(f"SELECT {_ITEM_COLUMNS} FROM {_FROM} WHERE r.seq IS NOT "
                                   "NULL ORDER BY i.seq").fetchall()
        return [_item(r) for r in rows]

    # ------------------------------------------------------------------ reviews

    def review(self, reviews: Sequence[Review], *, source: str,
               new_labels: Sequence[tuple[str, str]] = ()) -> None:
        """Record verdicts (and the labels they introduce), all or none, durably."""
        now = time.time()
        with self._lock:
            db = self.db
            db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("INSERT OR IGNORE INTO labels VALUES (?, ?, ?)",
                                   [(name, b, now) for name, b in new_labels])
                    db.executemany(
                        "INSERT OR REPLACE INTO reviews VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(r.seq, now, r.verdict, r.label, r.bin, r.reached, source)
                         for r in reviews])
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            finally:
                db.execute("PRAGMA synchronous=NORMAL")

    def site_labels(self) -> dict[str, str]:
        """Labels reviewers introduced: name -> bin."""
        with self._lock:
            return {str(n): str(b) for n, b in self.db.execute("SELECT name, bin FROM labels")}

    def contamination(self) -> dict[str, Any]:
        """Per compartment and in total: reviewed items that reached it, how many of them
        belong elsewhere, and that rate; with the reviewed fraction of the logged items."""
        with self._lock:
            rows = self.db.execute("SELECT reached, COUNT(*), SUM(bin != reached) FROM "
                                   "reviews GROUP BY reached").fetchall()
            row = self.db.execute("SELECT value FROM meta WHERE key = 'logged'").fetchone()
        per = {b: {"reviewed": 0, "wrong": 0} for b in BINS}
        for reached, n, wrong in rows:
            if reached in per:
                per[reached] = {"reviewed": int(n), "wrong": int(wrong or 0)}
        out: dict[str, Any] = {b: {**v, "rate": _rate(v["wrong"], v["reviewed"])}
                               for b, v in per.items()}
        reviewed = sum(v["reviewed"] for v in per.values())
        wrong = sum(v["wrong"] for v in per.values())
        out["total"] = {"reviewed": reviewed, "wrong": wrong, "rate": _rate(wrong, reviewed)}
        items = int(row[0]) if row else 0
        out["reviewed_fraction"] = _rate(reviewed, items)
        out["items"] = items
        return out

    def data_version(self) -> int:
        """Changes when another connection (a CLI review) wrote to the log."""
        with self._lock:
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
