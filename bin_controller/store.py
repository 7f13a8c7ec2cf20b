"""Counts, journal and MQTT outbox in one SQLite database (WAL) in the state folder.

An item is noted as *pending* when its bin is decided, before the flap moves, and
*committed* (numbered, journalled, counted, its message queued) in one transaction once the
flap has moved.
After a crash or power cut a pending item is resolved by looking at the flap: if the item
is gone it was sorted and is committed now; if it still lies there it was not, and the
loop will sort it again. So an item is never lost and never counted twice.

Storage faults never stop the bin. When the disk is full the store deletes what it owns
and can spare (old journal rows beyond JOURNAL_FLOOR, then the oldest unsent event
messages) and tries again; if it is still full, committed items are numbered and counted
in memory and written, in order, as soon as a write succeeds again (on the next item or
within HELD_RETRY_S). Items held in memory do not survive the process: those noted as
pending before the disk filled are recovered at restart, the rest are logged as lost at
close. A damaged or vanished database is moved aside at open and the counts
rebuilt (see store_recovery.py). Both are reported through `on_fault(kind, detail)`:
`disk_full`, `store_error` (any other failed write) and `store_recovered`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bin_controller.bins import BINS
from bin_controller.domain import SortEvent
from bin_controller.errors import StoreError
from bin_controller.parts import Pending
from bin_controller.store_recovery import (
    DB_NAME,
    EVENT_FIELDS,
    SIDECAR_EVERY,
    Rebuilt,
    Salvage,
    Sidecar,
    SidecarState,
    check_database,
    format_base,
    fsync_dir,
    has_content,
    header_problem,
    inspect,
    is_corruption,
    is_disk_full,
    move_aside,
    parse_seq,
    rebuild,
    salvage,
    with_companions,
)

if TYPE_CHECKING:
    from bin_controller.payloads import OutboxMessage

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["DB_NAME", "EVENT_FIELDS", "Store", "connect", "inspect"]

SCHEMA_VERSION = 1
# Journal rows a full disk never takes: the latest items stay readable, and a journal
# tail at least as long as SIDECAR_EVERY keeps a rebuild after corruption exact.
JOURNAL_FLOOR = max(100, SIDECAR_EVERY)
# Unsent event messages deleted per attempt when the journal has nothing more to give
# (about 0.4 MB): the counts stay exact, only the per-item history is thinned.
OUTBOX_FREE_CHUNK = 1000
# Size a WAL file is cut back to after a checkpoint (SQLite's own checkpoint comes at 1000
# pages, about 4 MB).
WAL_LIMIT_BYTES = 4 * 1024 * 1024
# Seconds between attempts to write items held in memory when no new item comes.
HELD_RETRY_S = 1.0
# Items written per transaction when a backlog held in memory is written.
FLUSH_CHUNK = 500
# The same storage fault is reported again at most this often (a disk that stays full
# makes the store free space every few hundred items).
FAULT_REPEAT_S = 600.0

EVENT_COLUMNS = ", ".join(EVENT_FIELDS)
EVENT_PLACEHOLDERS = ", ".join("?" * len(EVENT_FIELDS))
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counts (bin TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    {EVENT_COLUMNS}
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {EVENT_COLUMNS}
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL
);
"""
TABLES = frozenset({"meta", "counts", "journal", "pending", "outbox"})


def connect(path: Path, synchronous: str, *, wal: bool = True) -> sqlite3.Connection:
    """The store's connection (a seam: tests make the disk "full" with max_page_count)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # Damaged text reads as U+FFFD instead of failing the read it is part of.
    db.text_factory = _decode
    try:
        db.execute("PRAGMA busy_timeout=5000")
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed item survives a power cut, not only a killed process.
        db.execute(f"PRAGMA synchronous={synchronous}")
        # A checkpointed WAL is cut back to this size instead of keeping its largest size
        # for ever: space on a nearly full disk.
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
    except BaseException:
        db.close()
        raise
    return db


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


@dataclass(slots=True)
class _Held:
    """A committed item not yet written: numbered and counted in memory."""

    event: SortEvent
    pending_id: int | None
    counted: bool = True  # False once a reset zeroed the counts it was part of


def add_missing_columns(db: sqlite3.Connection) -> list[str]:
    """Bring a database written by an older smartbin up to SortEvent's fields: CREATE TABLE
    IF NOT EXISTS leaves old tables as they were, so a field added since (the frame's time
    and exposure) gets its column here; old rows read back as None, its default."""
    added = []
    for table in ("journal", "pending"):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name in EVENT_FIELDS:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name}")
                added.append(f"{table}.{name}")
    if added:
        log.info("count database: added column(s) %s", ", ".join(added))
    return added


class Store:
    """Thread-safe; every write is one transaction with the configured durability."""

    inspect = staticmethod(inspect)

    def __init__(self, state_dir: str | Path, *, synchronous: str = "FULL",
                 journal_keep: int = 100_000, outbox_max: int = 100_000,
                 message: Callable[[SortEvent], OutboxMessage] | None = None,
                 on_fault: Callable[[str, str], None] | None = None) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.journal_keep = journal_keep
        self.outbox_max = outbox_max
        self.message = message
        # Called with (kind, detail) outside the store's lock; None: the store logs it.
        self.on_fault = on_fault
        # Frees space others own on the same disk (the photo log) before the store deletes
        # anything of its own; returns the bytes freed, 0 when it has nothing left.
        self.spare: Callable[[], int] | None = None
        self.dropped_messages = 0
        self.recovery: str | None = None  # what was done at open to a damaged database
        self.sidecar = Sidecar(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._open_error(exc) from exc
        self._lock = threading.RLock()
        self._held: list[_Held] = []
        self._held_counts = dict.fromkeys(BINS, 0)
        self._held_ids: set[int] = set()
        self._stale_pending: list[int] = []  # resolved at start, not yet deleted
        self._faults: list[tuple[str, str]] = []  # reported once the lock is released
        self._trouble: str | None = None  # set while writes fail (items held in memory)
        self._reported: dict[str, float] = {}
        self._retry: threading.Thread | None = None
        self._closed = threading.Event()
        side = self.sidecar.read()
        self.db = self._open(synchronous, side)
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        self._db_id = str(meta["db_id"])
        self._seq = self._db_seq = self._last_seq(meta, side)
        self._sidecar_due = 0
        self._refresh_sidecar(now=True)
        self._dispatch()

    # ------------------------------------------------------------------ opening

    def _open(self, synchronous: str, side: SidecarState | None) -> sqlite3.Connection:
        """The checked database; a damaged or vanished one is moved aside and rebuilt."""
        if has_content(self.path):
            db, problem = self._open_existing(synchronous)
            if db is not None:
                if not (side is not None and side.counted and _blank(db)):
                    return db
                db.close()
                problem = (f"holds no items but {self.sidecar.path.name} says the bin had "
                           f"counted {side.total}")
        elif side is not None and side.counted:
            problem = (f"{'is empty' if self.path.exists() else 'is missing'} but "
                       f"{self.sidecar.path.name} says the bin had counted {side.total} items")
        else:
            return self._create(synchronous)
        return self._rebuild(synchronous, problem, side)

    def _open_existing(self, synchronous: str) -> tuple[sqlite3.Connection | None, str]:
        """(the database, "") when it is sound, else (None, what is wrong with it)."""
        try:
            problem = header_problem(self.path)
        except OSError as exc:
            raise self._open_error(exc) from exc
        if problem:
            return None, f"is damaged ({problem})"
        db: sqlite3.Connection | None = None
        try:
            db = connect(self.path, synchronous)
            problem = check_database(db)
            if not problem:
                self._complete_schema(db)
                return db, ""
        except (sqlite3.Error, ValueError) as exc:
            # ValueError: the sqlite3 module cannot decode a damaged schema's error text.
            if not is_corruption(exc):
                _close_quietly(db)
                raise self._open_error(exc) from exc
            problem = str(exc)[:300]
        _close_quietly(db)
        return None, f"is damaged ({problem})"

    def _complete_schema(self, db: sqlite3.Connection) -> None:
        """Add what a database lacks (tables, keys, bins); writes nothing when complete, so
        a sound database opens even on a full disk."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        keys = {r[0] for r in db.execute("SELECT key FROM meta")} if "meta" in tables else set()
        bins = {r[0] for r in db.execute("SELECT bin FROM counts")} if "counts" in tables \
            else set()
        if (tables >= TABLES and {"schema", "seq", "db_id"} <= keys and set(BINS) <= bins
                and not _missing_columns(db)):
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            add_missing_columns(db)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0')")
            # A database from before this mark counts as cleared (nothing to hold at start).
            db.execute("INSERT OR IGNORE INTO meta SELECT 'cleared', value FROM meta "
                       "WHERE key = 'seq'")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('db_id', ?)", (uuid.uuid4().hex,))
            db.executemany("INSERT OR IGNORE INTO counts VALUES (?, 0)", [(b,) for b in BINS])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _create(self, synchronous: str) -> sqlite3.Connection:
        """The database at self.path, made complete (a new one is created)."""
        db: sqlite3.Connection | None = None
        try:
            db = connect(self.path, synchronous)
            self._complete_schema(db)
        except sqlite3.Error as exc:
            _close_quietly(db)
            raise self._open_error(exc) from exc
        return db

    def _build(self, path: Path, rebuilt: Rebuilt, old: Salvage) -> None:
        """A complete database at `path` holding what was rebuilt. Made beside the damaged
        one, without a WAL (one file to rename), so that when it cannot be made (a full
        disk) nothing was moved and the next start tries again with the same old file."""
        for leftover in with_companions(path):
            leftover.unlink(missing_ok=True)
        db: sqlite3.Connection | None = None
        try:
            db = connect(path, "FULL", wal=False)
            self._complete_schema(db)
            self._fill(db, rebuilt, old)
            db.close()
        except sqlite3.Error as exc:
            _close_quietly(db)
            with contextlib.suppress(OSError):
                path.unlink()
            raise self._open_error(exc) from exc

    def _fill(self, db: sqlite3.Connection, rebuilt: Rebuilt, old: Salvage) -> None:
        """Counts, seq and what could be read of the old file's rows, in one transaction."""
        keep = old.journal[-self.journal_keep:] if self.journal_keep else old.journal
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE counts SET n = ? WHERE bin = ?",
                           [(n, b) for b, n in rebuilt.counts.items()])
            db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(rebuilt.seq),))
            # Whether the last item left the flap is not known after a rebuild: an item
            # found there is sorted (a possible double count beats a certain loss).
            db.execute("INSERT OR REPLACE INTO meta VALUES ('cleared', ?)", (str(rebuilt.seq),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)",
                       (format_base(rebuilt.seq, rebuilt.counts),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('recovered', ?)",
                       (f"{time.strftime('%Y-%m-%d %H:%M:%S')} from {rebuilt.source}",))
            db.executemany(f"INSERT OR IGNORE INTO journal (seq, {EVENT_COLUMNS}) VALUES "
                           f"(?, {EVENT_PLACEHOLDERS})", keep)
            db.executemany(f"INSERT INTO pending ({EVENT_COLUMNS}) VALUES "
                           f"({EVENT_PLACEHOLDERS})", old.pending)
            db.executemany("INSERT INTO outbox (topic, payload, qos, created) VALUES "
                           "(?, ?, ?, ?)", old.outbox[-self.outbox_max:])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _rebuild(self, synchronous: str, problem: str,
                 side: SidecarState | None) -> sqlite3.Connection:
        old = salvage(self.path) if has_content(self.path) else Salvage()
        rebuilt = rebuild(old, side)
        fresh = self.path.with_name(self.path.name + ".new")
        try:
            self._build(fresh, rebuilt, old)
            aside = move_aside(self.path)
            os.replace(fresh, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            raise self._open_error(exc) from exc
        db = self._create(synchronous)
        where = f"moved aside to {aside.name}" if aside else "nothing to move aside"
        self.recovery = (f"{self.path} {problem}: {where}; counts rebuilt from "
                         f"{rebuilt.source}: {rebuilt.total} items, next seq {rebuilt.seq + 1}")
        if rebuilt.source.startswith("nothing"):
            log.error("%s: the counts could not be rebuilt; they start again from zero",
                      self.path)
        self._report("store_recovered", self.recovery)
        return db

    def _last_seq(self, meta: dict[str, Any], side: SidecarState | None) -> int:
        """The last seq given, never below one the sidecar or the journal has seen (a
        database restored from a backup must not make a seq be used twice)."""
        seq = parse_seq(meta.get("seq")) or 0
        top = self.db.execute("SELECT MAX(seq) FROM journal").fetchone()[0]
        seq = max(seq, top if isinstance(top, int) else 0)
        if side is not None and side.seq > seq:
            log.warning("%s is behind %s (seq %d < %d); seqs continue after %d",
                        self.path, self.sidecar.path.name, seq, side.seq, side.reserved)
            seq = side.reserved
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(seq),))
        return seq

    def _open_error(self, exc: BaseException) -> StoreError:
        if is_disk_full(exc):
            return StoreError(f"{self.path}: the disk is full, the count database cannot be "
                              f"opened; free some space on it or set bin.state_dir (or "
                              "--state-dir) to a folder on another disk")
        return StoreError(f"{self.path}: cannot open the count database: {exc}; set "
                          "bin.state_dir (or --state-dir) to a writable folder")

    # ------------------------------------------------------------------ transactions

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (a full disk among them).
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        return result

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run `fn` in a transaction; on a full disk free space of our own and try again.
        None when it cannot be written (the fault is reported)."""
        freed = [0, 0, 0]  # journal rows, event messages, photo bytes
        full = False
        while True:
            try:
                result = self._transaction(fn)
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    full = True
                    step = self._free_space()
                    if any(step):
                        freed = [a + b for a, b in zip(freed, step, strict=True)]
                        continue
                self._failed(exc, full, freed)
                return None
            if full:
                self._fault("disk_full", f"{self.path}: the disk is full; deleted "
                            f"{_freed(freed)} to keep counting")
            if self._trouble:
                self._back()
            return result

    def _free_space(self) -> tuple[int, int, int]:
        """Make room: photos first (`spare`), then what the store owns and can spare:
        journal rows beyond the floor, then the oldest unsent event messages. (journal rows,
        messages, photo bytes) deleted."""
        if self.spare is not None:
            try:
                photo_bytes = self.spare()
            except Exception:  # the photos' trouble must not stop the counting
                log.exception("freeing photo space failed")
                photo_bytes = 0
            if photo_bytes > 0:
                return 0, 0, photo_bytes

        def delete(c: sqlite3.Connection) -> tuple[int, int]:
            rows = c.execute("DELETE FROM journal WHERE seq <= ?",
                             (self._db_seq - JOURNAL_FLOOR,)).rowcount
            if rows > 0:
                return rows, 0
            messages = c.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
                                 "ORDER BY id LIMIT ?)", (OUTBOX_FREE_CHUNK,)).rowcount
            return 0, max(messages, 0)

        try:
            rows, messages = self._transaction(delete)
        except sqlite3.Error as exc:
            log.debug("freeing space failed: %s", exc)
            rows = messages = 0
        with contextlib.suppress(sqlite3.Error):
            # Empties the WAL file too, when the disk allows it: space on a real disk. Tried
            # even when nothing could be deleted: a WAL grown on a nearly full disk may be all
            # the space there is to give back.
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if messages:
            self.dropped_messages += messages
            log.warning("disk full: dropped the %d oldest unsent event messages", messages)
        return max(rows, 0), messages, 0

    def _failed(self, exc: sqlite3.Error, full: bool, freed: list[int]) -> None:
        self._trouble = "disk_full" if full else "store_error"
        if full:
            gave = f"deleted {_freed(freed)}, still full" if any(freed) else \
                "nothing more of its own to delete"
            self._fault("disk_full", f"{self.path}: the disk is full ({gave}); counting in "
                        f"memory ({len(self._held)} items held) until space is back",
                        key="disk_full held")
        else:
            self._fault("store_error", f"{self.path}: {exc}; counting in memory "
                        f"({len(self._held)} items held) until it can be written again")

    def _fault(self, kind: str, detail: str, *, key: str | None = None) -> None:
        """Report, unless the same situation (`key`) was reported within FAULT_REPEAT_S."""
        now = time.monotonic()
        last = self._reported.get(key or kind)
        if last is not None and now - last < FAULT_REPEAT_S:
            log.debug("%s again: %s", kind, detail)
            return
        self._reported[key or kind] = now
        self._report(kind, detail)

    def _back(self) -> None:
        log.warning("%s can be written again (after %s)", self.path, self._trouble)
        self._trouble = None

    def _report(self, kind: str, detail: str) -> None:
        self._faults.append((kind, detail))

    def _dispatch(self) -> None:
        """Hand reported faults on, outside the lock: the listener publishes on MQTT, and
        paho calls the store back (acked) holding its own lock."""
        if not self._faults:
            return
        with self._lock:
            faults, self._faults = self._faults, []
        for kind, detail in faults:
            if self.on_fault is not None:
                self.on_fault(kind, detail)
            else:
                log.warning("store fault %s: %s", kind, detail)

    # ------------------------------------------------------------------ the cycle

    def begin(self, event: SortEvent) -> Pending:
        """Note the decided item as pending, before the flap moves. On a full disk the
        item is not noted (id None) and is counted in memory when committed."""
        row = asdict(event)
        values = [row[k] for k in EVENT_FIELDS]
        with self._lock:
            pending_id = self._write(lambda c: c.execute(
                f"INSERT INTO pending ({EVENT_COLUMNS}) VALUES ({EVENT_PLACEHOLDERS})",
                values).lastrowid)
        self._dispatch()
        return Pending(event, pending_id)

    def commit(self, pending: Pending, *, also: Sequence[SortEvent] = ()) -> SortEvent:
        """Count the item, journal it with the next sequence number and queue its message,
        with the items that slid through beside it (`also`): one transaction. Numbers are
        given here, so a pending item that turns out not to have been sorted leaves no gap."""
        with self._lock:
            if pending.id is None or self._still_pending(pending.id):
                self._count([(pending.event, pending.id), *((e, None) for e in also)])
        self._dispatch()
        return pending.event

    def record(self, event: SortEvent) -> SortEvent:
        """Count an item that was never pending (it slid through unsorted)."""
        with self._lock:
            self._count([(event, None)])
        self._dispatch()
        return event

    def queue(self, message: OutboxMessage) -> bool:
        """Put a message (a fault) in the outbox on its own; False when it cannot be."""
        with self._lock:
            def put(c: sqlite3.Connection) -> bool:
                self._queue(c, message.topic, message.payload, message.qos)
                return True

            written = self._write(put)
        self._dispatch()
        return written is True

    def cleared(self) -> None:
        """The chute is clear of every item counted so far (see `uncleared`)."""
        with self._lock:
            seq = self._seq
            self._write(lambda c: c.execute(
                "INSERT OR REPLACE INTO meta VALUES ('cleared', ?)", (str(seq),)))
        self._dispatch()

    def uncleared(self) -> bool:
        """Whether the last item counted was never seen to leave the flap: after a crash
        during a jam, an item found on the flap at start is that one, already counted."""
        with self._lock:
            try:
                row = self.db.execute("SELECT value FROM meta WHERE key='cleared'").fetchone()
            except sqlite3.Error:
                return False
        cleared = parse_seq(row[0]) if row else None
        return cleared is not None and cleared < self._db_seq

    def _still_pending(self, pending_id: int) -> bool:
        """False once the item was committed (or resolved at start): counting it again
        would double count."""
        if pending_id in self._held_ids:
            return False
        try:
            return self.db.execute("SELECT 1 FROM pending WHERE id=?",
                                   (pending_id,)).fetchone() is not None
        except sqlite3.Error:
            return True  # unreadable: counting it is better than losing it

    def _count(self, items: list[tuple[SortEvent, int | None]]) -> None:
        """Number and count the items in memory, then write everything held, in order (the
        items together: _flush writes up to FLUSH_CHUNK held items per transaction)."""
        for event, pending_id in items:
            self._seq += 1
            event.seq = self._seq
            self._held.append(_Held(event, pending_id))
            self._held_counts[event.bin] = self._held_counts.get(event.bin, 0) + 1
            if pending_id is not None:
                self._held_ids.add(pending_id)
        if not self._flush():
            self._start_retry()

    def _flush(self) -> bool:
        """Write the items held in memory, oldest first; False while they cannot be."""
        backlog = len(self._held)
        while self._held or self._stale_pending:
            chunk = self._held[:FLUSH_CHUNK]
            if self._write(partial(self._write_items, chunk)) is None:
                return False
            self._written(chunk)
        if backlog > 1:
            log.warning("%s: wrote the %d items counted in memory (last seq %d)", self.path,
                        backlog, self._db_seq)
        if self._db_seq >= self._sidecar_due:
            self._refresh_sidecar()
        return True

    def _write_items(self, chunk: list[_Held], c: sqlite3.Connection) -> bool:
        for pending_id in self._stale_pending:
            c.execute("DELETE FROM pending WHERE id=?", (pending_id,))
        added: dict[str, int] = {}
        for held in chunk:
            event = held.event
            if held.pending_id is not None:
                c.execute("DELETE FROM pending WHERE id=?", (held.pending_id,))
            row = asdict(event)
            c.execute(f"INSERT INTO journal (seq, {EVENT_COLUMNS}) VALUES "
                      f"(?, {EVENT_PLACEHOLDERS})", (event.seq, *[row[k] for k in EVENT_FIELDS]))
            if held.counted:
                added[event.bin] = added.get(event.bin, 0) + 1
            if self.message is not None:
                m = self.message(event)
                self._queue(c, m.topic, m.payload, m.qos)
        for bin_name, n in added.items():
            c.execute("UPDATE counts SET n = n + ? WHERE bin=?", (n, bin_name))
        if chunk:
            seq = chunk[-1].event.seq
            c.execute("UPDATE meta SET value=? WHERE key='seq'", (str(seq),))
            if self.journal_keep:
                c.execute("DELETE FROM journal WHERE seq <= ?", (seq - self.journal_keep,))
        return True

    def _written(self, chunk: list[_Held]) -> None:
        del self._held[:len(chunk)]
        self._stale_pending.clear()
        for held in chunk:
            if held.counted:
                self._held_counts[held.event.bin] -= 1
            if held.pending_id is not None:
                self._held_ids.discard(held.pending_id)
        if chunk:
            self._db_seq = chunk[-1].event.seq

    def _queue(self, c: sqlite3.Connection, topic: str, payload: str, qos: int) -> None:
        new_id = c.execute("INSERT INTO outbox (topic, payload, qos, created) VALUES "
                           "(?, ?, ?, ?)", (topic, payload, qos, time.time())).lastrowid
        # Full: the oldest messages go. Ids only grow (AUTOINCREMENT), so keeping the newest
        # outbox_max ids bounds the outbox with one indexed range delete, where counting the
        # rows on every item cost O(n) during a long outage. Counts stay exact (they are
        # published retained from the counts table); only the per-item history is thinned.
        if new_id is None or new_id <= self.outbox_max:
            return
        excess = c.execute("DELETE FROM outbox WHERE id <= ?",
                           (new_id - self.outbox_max,)).rowcount
        if excess > 0:
            self.dropped_messages += excess
            log.warning("outbox full (%d): dropped the %d oldest messages", self.outbox_max,
                        excess)

    def _start_retry(self) -> None:
        """Held items are written within HELD_RETRY_S of space coming back, even when no
        further item comes to trigger it."""
        if self._retry is None and not self._closed.is_set():
            self._retry = threading.Thread(target=self._retry_held, name="store-retry",
                                           daemon=True)
            self._retry.start()

    def _retry_held(self) -> None:
        while not self._closed.wait(HELD_RETRY_S):
            with self._lock:
                if self._closed.is_set():
                    return
                done = self._flush()
                if done:
                    self._retry = None
            self._dispatch()
            if done:
                return

    def pending(self) -> list[Pending]:
        with self._lock:
            rows = self.db.execute(f"SELECT id, {EVENT_COLUMNS} FROM pending "
                                   "ORDER BY id").fetchall()
        return [Pending(_event(r[1:]), r[0])
                for r in rows]

    def recover(self, item_still_present: bool) -> list[SortEvent]:
        """Resolve items that were mid-cycle when the service died (see module doc)."""
        resolved = []
        for pending in self.pending():
            if item_still_present:
                with self._lock:
                    if self._write(partial(_delete_pending, pending.id)) is None \
                            and pending.id is not None:
                        self._stale_pending.append(pending.id)  # deleted with the next write
                log.info("an item decided before the restart is still on the flap; it "
                         "will be sorted again")
            else:
                self.commit(pending)
                log.info("item #%d was sorted before the restart; counted now",
                         pending.event.seq)
                resolved.append(pending.event)
        self._dispatch()
        return resolved

    # ------------------------------------------------------------------ reading

    @property
    def held(self) -> int:
        """Items counted in memory, waiting for the database to take writes again."""
        with self._lock:
            return len(self._held)

    def counts(self) -> dict[str, int]:
        """The counts, with the items held in memory."""
        with self._lock:
            rows = dict(self.db.execute("SELECT bin, n FROM counts").fetchall())
            return {b: int(rows.get(b, 0)) + self._held_counts[b] for b in BINS}

    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def journal(self, limit: int = 100) -> list[SortEvent]:
        """The latest items, oldest first (those held in memory last)."""
        with self._lock:
            rows = self.db.execute(f"SELECT seq, {EVENT_COLUMNS} FROM journal "
                                   "ORDER BY seq DESC LIMIT ?",
                                   (limit,)).fetchall()
            held = [h.event for h in self._held[-limit:]] if limit > 0 else []
        events = [_event(r[1:], seq=r[0])
                  for r in reversed(rows)]
        return (events + held)[-limit:] if limit > 0 else []

    def last_event(self) -> SortEvent | None:
        events = self.journal(1)
        return events[0] if events else None

    def outbox_batch(self, after_id: int = 0, limit: int = 100) -> list[tuple[int, str, str, int]]:
        with self._lock:
            return self.db.execute("SELECT id, topic, payload, qos FROM outbox WHERE id > ? "
                                   "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def outbox_size(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def acked(self, message_id: int) -> None:
        with self._lock:
            try:
                self.db.execute("DELETE FROM outbox WHERE id=?", (message_id,))
            except sqlite3.Error as exc:
                # The row stays and is sent again after a reconnect: at least once.
                log.debug("outbox message %d not deleted: %s", message_id, exc)

    def reset_counts(self) -> dict[str, int]:
        """Zero the counts (the bins were emptied), items held in memory included."""
        with self._lock:
            before = self.counts()
            zero = dict.fromkeys(BINS, 0)
            base = format_base(self._seq, zero)

            def reset(c: sqlite3.Connection) -> bool:
                c.execute("UPDATE counts SET n = 0")
                # The journal after this seq rebuilds the counts if the file is damaged.
                c.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)", (base,))
                return True

            if self._write(reset) is None:
                raise StoreError(f"{self.path}: the counts cannot be reset now: the database "
                                 f"cannot be written ({self._trouble}); try again later")
            for held in self._held:
                held.counted = False
            self._held_counts = zero
            self._refresh_sidecar(now=True)
        self._dispatch()
        return before

    def close(self) -> None:
        self._closed.set()
        retry = self._retry
        if retry is not None:
            retry.join(timeout=5)
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._flush()
            if self._held:
                lost = {b: n for b, n in self._held_counts.items() if n}
                log.error("%s: %d items counted in memory could not be written (%s); their "
                          "counts are lost: %s", self.path, len(self._held), self._trouble,
                          lost)
            self._refresh_sidecar(final=True)
            self.db.close()
        self._dispatch()

    def snapshot(self) -> dict[str, Any]:
        counts = self.counts()
        return {**counts, "total": sum(counts.values())}

    # ------------------------------------------------------------------ the sidecar

    def _refresh_sidecar(self, *, now: bool = False, final: bool = False) -> None:
        """Write the database's id, last seq and counts next to it (see store_recovery):
        in the background on the way, at once on open, reset and close."""
        try:
            rows = dict(self.db.execute("SELECT bin, n FROM counts").fetchall())
        except sqlite3.Error:
            return
        # Twice the refresh interval ahead: the next refresh is on disk well before the
        # seqs this one reserves run out.
        ahead = 0 if final else 2 * SIDECAR_EVERY
        state = SidecarState(self._db_id, self._db_seq, max(self._seq, self._db_seq) + ahead,
                             {b: int(rows.get(b, 0)) for b in BINS}, time.time())
        self._sidecar_due = self._db_seq + SIDECAR_EVERY
        if now or final:
            self.sidecar.flush()
            self.sidecar.write(state)
        else:
            self.sidecar.write_later(state)


def _delete_pending(pending_id: int | None, c: sqlite3.Connection) -> bool:
    c.execute("DELETE FROM pending WHERE id=?", (pending_id,))
    return True


def _missing_columns(db: sqlite3.Connection) -> bool:
    return any(set(EVENT_FIELDS) - {row[1] for row in db.execute(f"PRAGMA table_info({t})")}
               for t in ("journal", "pending"))


def _blank(db: sqlite3.Connection) -> bool:
    """A database that never counted anything (new, or made again after a loss)."""
    seq = db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()
    total = db.execute("SELECT COALESCE(SUM(n), 0) FROM counts").fetchone()[0]
    return (seq is None or parse_seq(seq[0]) == 0) and total == 0


def _freed(freed: list[int]) -> str:
    parts = [f"{freed[2] / 1e6:.1f} MB of photos"] if freed[2] else []
    if freed[0] or not any(freed):
        parts.append(f"{freed[0]} old journal rows")
    if freed[1]:
        parts.append(f"{freed[1]} oldest unsent event messages")
    return " and ".join(parts)


def _close_quietly(db: sqlite3.Connection | None) -> None:
    if db is not None:
        with contextlib.suppress(sqlite3.Error):
            db.close()


_FLAGS = [f.name for f in fields(SortEvent) if f.type in (bool, "bool")]


def _event(values: Sequence[object], seq: int = 0) -> SortEvent:
    """A SortEvent from a journal or pending row: SQLite hands flags back as 0/1, and a
    consumer of the `last` message must see the same true/false as in the `event`."""
    row = dict(zip(EVENT_FIELDS, values, strict=True))
    for name in _FLAGS:
        row[name] = bool(row[name])
    return SortEvent(**row, seq=seq)  # type: ignore[arg-type]
