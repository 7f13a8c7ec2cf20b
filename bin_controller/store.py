"""Counts, journal and MQTT outbox in one SQLite database (WAL) in the state folder.

An item is noted as *pending* when its bin is decided, before the flap moves, and
*committed* (numbered, journalled, counted, its message queued) in one transaction once the
flap has moved.
After a crash or power cut a pending item is resolved by looking at the flap: if the item
is gone it was sorted and is committed now; if it still lies there it was not, and the
loop will sort it again. So an item is never lost and never counted twice.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bin_controller.bins import BINS
from bin_controller.domain import SortEvent
from bin_controller.errors import SmartbinError
from bin_controller.parts import Pending

if TYPE_CHECKING:
    from bin_controller.payloads import OutboxMessage

log = logging.getLogger(__name__)

DB_NAME = "smartbin.db"
SCHEMA_VERSION = 1
EVENT_FIELDS = [f.name for f in fields(SortEvent) if f.name != "seq"]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counts (bin TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    {", ".join(f"{name}" for name in EVENT_FIELDS)}
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{name}" for name in EVENT_FIELDS)}
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


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

    def __init__(self, state_dir: str | Path, *, synchronous: str = "FULL",
                 journal_keep: int = 100_000, outbox_max: int = 100_000,
                 message: Callable[[SortEvent], OutboxMessage] | None = None) -> None:
        self.path = Path(state_dir) / DB_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed item survives a power cut, not only a killed process.
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            add_missing_columns(self.db)
        except (sqlite3.Error, OSError) as exc:
            raise SmartbinError(f"{self.path}: cannot open the count database: {exc}; set "
                                "bin.state_dir (or --state-dir) to a writable folder") from exc
        self.journal_keep = journal_keep
        self.outbox_max = outbox_max
        self.message = message
        self._lock = threading.RLock()
        self.dropped_messages = 0
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            c.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0')")
            for b in BINS:
                c.execute("INSERT OR IGNORE INTO counts VALUES (?, 0)", (b,))

    # ------------------------------------------------------------------ transactions

    class _Tx:
        def __init__(self, store: Store) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            self.store.db.execute("BEGIN IMMEDIATE")
            return self.store.db

        def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> None:
            try:
                self.store.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _tx(self) -> _Tx:
        return Store._Tx(self)

    # ------------------------------------------------------------------ the cycle

    def begin(self, event: SortEvent) -> Pending:
        """Note the decided item as pending, before the flap moves."""
        row = asdict(event)
        with self._tx() as c:
            cur = c.execute(f"INSERT INTO pending ({', '.join(EVENT_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(EVENT_FIELDS))})",
                            [row[k] for k in EVENT_FIELDS])
        return Pending(event, cur.lastrowid)

    def commit(self, pending: Pending) -> SortEvent:
        """Count the item, journal it with the next sequence number and queue its message:
        one transaction. Numbers are given here, so a pending item that turns out not to
        have been sorted leaves no gap."""
        with self._tx() as c:
            self._commit(c, pending.event, pending.id)
        return pending.event

    def record(self, event: SortEvent) -> SortEvent:
        """Count an item that was never pending (it slid through unsorted)."""
        with self._tx() as c:
            self._commit(c, event, None)
        return event

    def _commit(self, c: sqlite3.Connection, event: SortEvent, pending_id: int | None) -> None:
        if pending_id is not None:
            gone = c.execute("DELETE FROM pending WHERE id=?", (pending_id,))
            if gone.rowcount != 1:
                return  # already resolved (recovered): counting it again would double count
        seq = int(c.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0]) + 1
        c.execute("UPDATE meta SET value=? WHERE key='seq'", (str(seq),))
        event.seq = seq
        row = asdict(event)
        c.execute(f"INSERT INTO journal (seq, {', '.join(EVENT_FIELDS)}) VALUES "
                  f"(?, {', '.join('?' * len(EVENT_FIELDS))})",
                  (seq, *[row[k] for k in EVENT_FIELDS]))
        c.execute("UPDATE counts SET n = n + 1 WHERE bin=?", (event.bin,))
        if self.message is not None:
            m = self.message(event)
            self._queue(c, m.topic, m.payload, m.qos)
        if self.journal_keep:
            c.execute("DELETE FROM journal WHERE seq <= ?", (seq - self.journal_keep,))

    def _queue(self, c: sqlite3.Connection, topic: str, payload: str, qos: int) -> None:
        c.execute("INSERT INTO outbox (topic, payload, qos, created) VALUES (?, ?, ?, ?)",
                  (topic, payload, qos, time.time()))
        n = c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        if n > self.outbox_max:
            # Full: the oldest event messages go. Counts stay exact (they are published
            # retained from the counts table); only the per-item history is thinned.
            excess = n - self.outbox_max
            c.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id "
                      "LIMIT ?)", (excess,))
            self.dropped_messages += excess
            log.warning("outbox full (%d): dropped the %d oldest messages", self.outbox_max,
                        excess)

    def pending(self) -> list[Pending]:
        with self._lock:
            rows = self.db.execute(f"SELECT id, {', '.join(EVENT_FIELDS)} FROM pending "
                                   "ORDER BY id").fetchall()
        return [Pending(SortEvent(**dict(zip(EVENT_FIELDS, r[1:], strict=True))), r[0])
                for r in rows]

    def recover(self, item_still_present: bool) -> list[SortEvent]:
        """Resolve items that were mid-cycle when the service died (see module doc)."""
        resolved = []
        for pending in self.pending():
            with self._tx() as c:
                if item_still_present:
                    c.execute("DELETE FROM pending WHERE id=?", (pending.id,))
                    log.info("an item decided before the restart is still on the flap; it "
                             "will be sorted again")
                else:
                    self._commit(c, pending.event, pending.id)
                    log.info("item #%d was sorted before the restart; counted now",
                             pending.event.seq)
                    resolved.append(pending.event)
        return resolved

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = dict(self.db.execute("SELECT bin, n FROM counts").fetchall())
        return {b: int(rows.get(b, 0)) for b in BINS}

    def last_seq(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    def journal(self, limit: int = 100) -> list[SortEvent]:
        with self._lock:
            rows = self.db.execute(f"SELECT seq, {', '.join(EVENT_FIELDS)} FROM journal "
                                   "ORDER BY seq DESC LIMIT ?",
                                   (limit,)).fetchall()
        return [SortEvent(**dict(zip(EVENT_FIELDS, r[1:], strict=True)), seq=r[0])
                for r in reversed(rows)]

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
            self.db.execute("DELETE FROM outbox WHERE id=?", (message_id,))

    def reset_counts(self) -> dict[str, int]:
        with self._tx() as c:
            before = dict(c.execute("SELECT bin, n FROM counts").fetchall())
            c.execute("UPDATE counts SET n = 0")
        return before

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def snapshot(self) -> dict[str, Any]:
        counts = self.counts()
        return {**counts, "total": sum(counts.values())}
