"""What the dashboard remembers for its charts: every item event, every fault and samples of
each bin's contamination rate, in a SQLite file of its own, so a restart of the dashboard
keeps them.

Events arrive at least once (a bin resends its outbox after an outage), so an item is stored
once per (bin id, seq). The file is the dashboard's own: deleting it only empties the charts.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from bin_controller.bins import BINS
from bin_controller.errors import SmartbinError

# One contamination sample per bin at most this often (a review burst moves it many times).
SAMPLE_EVERY_S = 60.0
KEEP_DAYS = 90
MAX_HOURS = 24 * KEEP_DAYS
TOP_LABELS = 12

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    bin_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, label TEXT,
    bin TEXT, uncertain INTEGER NOT NULL, failed INTEGER NOT NULL, confidence REAL,
    PRIMARY KEY (bin_id, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_time ON events (bin_id, time);
CREATE TABLE IF NOT EXISTS faults (
    bin_id TEXT NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL,
    UNIQUE (bin_id, time, kind, detail));
CREATE TABLE IF NOT EXISTS samples (
    bin_id TEXT NOT NULL, time REAL NOT NULL, contamination REAL, reviewed_fraction REAL);
CREATE INDEX IF NOT EXISTS samples_time ON samples (bin_id, time);
"""


class History:
    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # the charts may lose a second
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SmartbinError(f"--history {path}: cannot open the dashboard's history "
                                f"database: {exc}; give another file with --history") from exc
        # bin id -> (rowid, time, rate) of its newest sample written by this run
        self._last_sample: dict[str, tuple[int, float, float | None]] = {}
        self._prune()

    def close(self) -> None:
        self.db.close()

    def _prune(self) -> None:
        before = self.clock() - KEEP_DAYS * 86400
        for table in ("events", "faults", "samples"):
            self.db.execute(f"DELETE FROM {table} WHERE time < ?", (before,))

    # ------------------------------------------------------------------ writing

    def add_event(self, bin_id: str, item: dict[str, Any]) -> bool:
        """An item from its `event` (checked by fleet.item); False when (bin id, seq) is
        already stored."""
        if item.get("seq") is None:
            return False
        when = item.get("time") or self.clock()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (bin_id, item["seq"], when, item.get("label_en") or item.get("label"),
             item.get("bin"), int(bool(item.get("uncertain"))), int(bool(item.get("failed"))),
             item.get("confidence")))
        return cur.rowcount == 1

    def add_fault(self, bin_id: str, fault: dict[str, Any]) -> bool:
        cur = self.db.execute("INSERT OR IGNORE INTO faults VALUES (?, ?, ?, ?)",
                              (bin_id, fault.get("time") or self.clock(), fault["kind"],
                               fault.get("detail") or ""))
        return cur.rowcount == 1

    def add_sample(self, bin_id: str, contamination: dict[str, Any] | None) -> bool:
        """The bin's contamination rate now, when it changed: at most one row a minute per
        bin (a change within the minute updates that minute's row, so the newest value is
        always kept)."""
        if contamination is None:
            return False
        rate = contamination.get("rate")
        reviewed = contamination.get("reviewed_fraction")
        now = self.clock()
        last = self._last_sample.get(bin_id)
        if last is not None and last[2] == rate:
            return False
        if last is not None and now - last[1] < SAMPLE_EVERY_S:
            self.db.execute("UPDATE samples SET contamination = ?, reviewed_fraction = ? "
                            "WHERE rowid = ?", (rate, reviewed, last[0]))
            self._last_sample[bin_id] = (last[0], last[1], rate)
            return True
        cur = self.db.execute("INSERT INTO samples VALUES (?, ?, ?, ?)",
                              (bin_id, now, rate, reviewed))
        self._last_sample[bin_id] = (int(cur.lastrowid or 0), now, rate)
        return True

    # ------------------------------------------------------------------ charts

    def charts(self, bin_id: str, *, hours: int) -> dict[str, Any]:
        """Everything the bin page draws, for the last `hours` hours: items per hour by
        compartment, composition by label, uncertain rate per hour, contamination
        samples, the fault log."""
        hours = max(1, min(hours, MAX_HOURS))
        now = self.clock()
        since = (now // 3600 - hours + 1) * 3600
        per_hour: dict[int, dict[str, int]] = {}
        uncertain: dict[int, int] = {}
        for hour, bin_name, n, unsure in self.db.execute(
                "SELECT CAST(time / 3600 AS INTEGER) * 3600, bin, COUNT(*), "
                "SUM(uncertain OR failed) FROM events WHERE bin_id = ? AND time >= ? "
                "GROUP BY 1, 2", (bin_id, since)):
            row = per_hour.setdefault(hour, dict.fromkeys(BINS, 0))
            if bin_name in row:
                row[bin_name] += n
            uncertain[hour] = uncertain.get(hour, 0) + unsure
        hours_list = [int(since + 3600 * i) for i in range(hours)]
        totals = [sum(per_hour.get(h, {}).values()) for h in hours_list]
        labels = self.db.execute(
            "SELECT COALESCE(label, '(none)'), bin, COUNT(*) FROM events "
            "WHERE bin_id = ? AND time >= ? GROUP BY 1, 2 ORDER BY 3 DESC, 1 LIMIT ?",
            (bin_id, since, TOP_LABELS)).fetchall()
        samples = self.db.execute(
            "SELECT time, contamination FROM samples WHERE bin_id = ? AND time >= ? "
            "ORDER BY time", (bin_id, since)).fetchall()
        return {
            "hours": hours_list,
            "per_hour": {b: [per_hour.get(h, {}).get(b, 0) for h in hours_list] for b in BINS},
            "uncertain_rate": [uncertain.get(h, 0) / t if t else None
                               for h, t in zip(hours_list, totals, strict=True)],
            "composition": [{"label": label, "bin": b, "count": n} for label, b, n in labels],
            "contamination": {"time": [t for t, _ in samples], "rate": [r for _, r in samples]},
            "faults": self.faults(bin_id, limit=100)}

    def faults(self, bin_id: str, *, limit: int) -> list[dict[str, Any]]:
        return [{"time": t, "kind": k, "detail": d} for t, k, d in self.db.execute(
            "SELECT time, kind, detail FROM faults WHERE bin_id = ? ORDER BY time DESC LIMIT ?",
            (bin_id, limit))]

    def event_count(self, bin_id: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM events WHERE bin_id = ?",
                                   (bin_id,)).fetchone()[0])
