"""A damaged count database: finding it, moving it aside and rebuilding the counts.

At open the store checks its database (the header, `PRAGMA quick_check`, the values it
needs). A corrupt file, or one that vanished or was emptied while the sidecar
`smartbin.db.id` says the bin had counted, is moved aside as `smartbin.db.corrupt-<time>`
(with its -wal and -shm) and a new database starts from what can still be read of it:

1. the counts table of the old file, else
2. the journal of the old file, added to the last known base (the sidecar's counts, or the
   last reset) — exact when the journal has every item after that base, else
3. the sidecar's counts alone (they lag by at most SIDECAR_EVERY items).

The next seq is above every seq the old database can have given (the old last seq, else the
sidecar's reservation), so no seq is ever used twice: MQTT consumers drop duplicates by seq.

The sidecar is a few hundred bytes of JSON written atomically next to the database: when
the database is created or opened, every SIDECAR_EVERY items, on reset and on close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bin_controller.bins import BINS
from bin_controller.domain import SortEvent
from bin_controller.errors import StoreError

log = logging.getLogger(__name__)

DB_NAME = "smartbin.db"
SIDECAR_SUFFIX = ".id"
EVENT_FIELDS = [f.name for f in fields(SortEvent) if f.name != "seq"]

# Items between two sidecar refreshes. Its counts lag the database by at most this many
# items, and it reserves twice as many seqs ahead, so a database lost between two
# refreshes never makes a seq be used twice. A refresh (a small file and two fsyncs, a
# few ms) is written by a thread of its own, so the loop never waits for it.
SIDECAR_EVERY = 100
# A sidecar bigger than this is not ours (it is about 200 bytes).
SIDECAR_MAX_BYTES = 64 * 1024
# Rows read from a damaged file per fetch: rows read before the damage are kept.
SALVAGE_BATCH = 256

# SQLite result codes that say something about the machine, not the file: these are
# reported as they are (StoreError), never "repaired" by moving the database aside.
ENVIRONMENT_CODES = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_NOLFS, sqlite3.SQLITE_AUTH,
})
HEADER_MAGIC = b"SQLite format 3\x00"


def error_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an error (None when Python raised it itself)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_disk_full(exc: BaseException) -> bool:
    return error_code(exc) == sqlite3.SQLITE_FULL


def is_corruption(exc: BaseException) -> bool:
    """True when an error while opening and checking our own database means the file is
    damaged (SQLITE_CORRUPT, NOTADB, a missing table, undecodable text...), False when it is
    the machine (permissions, a lock, a full disk, an I/O error)."""
    return error_code(exc) not in ENVIRONMENT_CODES


# ---------------------------------------------------------------------------- the sidecar


@dataclass(frozen=True)
class SidecarState:
    db_id: str
    seq: int  # the database's last seq when written
    reserved: int  # no seq above this was given before the next refresh
    counts: dict[str, int]
    time: float

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def counted(self) -> bool:
        """The bin had numbered items (a reset zeroes counts, never seqs)."""
        return self.seq > 0 or self.total > 0

    def saved(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))


class Sidecar:
    """`smartbin.db.id`: the database's id, last seq and counts, kept apart from it."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + SIDECAR_SUFFIX)
        # The latest state to write in the background, and the thread writing it.
        self._later: SidecarState | None = None
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None

    def write_later(self, state: SidecarState) -> None:
        """Write `state` off the caller's thread: two fsyncs cost several milliseconds,
        as much as a few items, and the sorting loop must not wait for them."""
        with self._cond:
            self._later = state
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending,
                                                name="store-sidecar", daemon=True)
                self._writer.start()
            self._cond.notify()

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                if self._later is None:
                    self._writer = None
                    return
                state, self._later = self._later, None
            self.write(state)

    def flush(self) -> None:
        """Wait until a background write has landed (before a final write, at close)."""
        while True:
            with self._cond:
                writer = self._writer
            if writer is None:
                return
            writer.join()

    def read(self) -> SidecarState | None:
        try:
            with self.path.open("rb") as f:
                raw = f.read(SIDECAR_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read (%s); ignored", self.path, exc)
            return None
        state = _parse_sidecar(raw)
        if state is None:
            log.warning("%s: not a valid count sidecar; ignored (rewritten from the database)",
                        self.path)
        return state

    def write(self, state: SidecarState) -> bool:
        """Replace the sidecar atomically (write, fsync, rename); False when it cannot."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"db_id": state.db_id, "seq": state.seq, "reserved": state.reserved,
                           "counts": state.counts, "time": state.time}).encode()
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            log.debug("%s: not refreshed: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True


def fsync_dir(folder: Path) -> None:
    """The rename itself survives a power cut only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count(value: object) -> int | None:
    """A non-negative integer (not a bool), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _parse_sidecar(raw: bytes) -> SidecarState | None:
    if len(raw) > SIDECAR_MAX_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("counts"), dict):
        return None
    seq, reserved = _count(data.get("seq")), _count(data.get("reserved"))
    counts = {b: _count(data["counts"].get(b, 0)) for b in BINS}
    moment = data.get("time")
    if (seq is None or reserved is None or reserved < seq or not isinstance(data.get("db_id"), str)
            or not isinstance(moment, int | float) or isinstance(moment, bool)
            or not math.isfinite(moment)):
        return None
    if any(n is None for n in counts.values()):
        return None
    return SidecarState(data["db_id"], seq, reserved, {b: n or 0 for b, n in counts.items()},
                        float(moment))


# ---------------------------------------------------------------------------- checking


def has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def header_problem(path: Path) -> str | None:
    """What is wrong with the 100-byte SQLite header (and the file's length), or None.
    SQLite would report some of these only as a read-only or unreadable file."""
    with path.open("rb") as f:
        head = f.read(100)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 100:
        return f"only {size} bytes long, shorter than a database header"
    if head[:16] != HEADER_MAGIC:
        return "not an SQLite database (its header is damaged)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return f"damaged header (page size {page})"
    if head[18] not in (1, 2) or head[19] not in (1, 2) or head[21:24] != b"\x40\x20\x20":
        return "damaged header (format bytes)"
    if page - head[20] < 480:
        return "damaged header (reserved space)"
    if size % page:
        return f"truncated: {size} bytes is not a whole number of {page}-byte pages"
    return None


def check_database(db: sqlite3.Connection) -> str | None:
    """What is wrong with an open database, or None. Reads every page once (quick_check),
    then the values the store relies on. Raises sqlite3.Error when it cannot even read."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:3])[:300]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" in tables:
        seq = db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()
        if seq is not None and parse_seq(seq[0]) is None:
            return f"damaged meta table (seq = {str(seq[0])[:40]!r})"
    if "counts" in tables:
        for bin_name, n in db.execute("SELECT bin, n FROM counts"):
            if bin_name in BINS and _count(n) is None:
                return f"damaged counts table ({bin_name} = {str(n)[:40]!r})"
    return None


def parse_seq(value: object) -> int | None:
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        return None
    return int(value)


# ---------------------------------------------------------------------------- salvage


def _event_types() -> dict[str, tuple[type, ...]]:
    """The Python types each journal column may hold, from SortEvent's annotations (a bool
    is stored as an integer)."""
    hints = typing.get_type_hints(SortEvent)
    out: dict[str, tuple[type, ...]] = {}
    for name in EVENT_FIELDS:
        hint = hints[name]
        parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        allowed: tuple[type, ...] = ()
        for part in parts:
            allowed += {type(None): (type(None),), float: (float, int), bool: (int,)}.get(
                part, (part,))
        out[name] = allowed
    return out


EVENT_TYPES = _event_types()


def valid_event(values: Iterable[object]) -> bool:
    """Whether a row of EVENT_FIELDS values could be a SortEvent (a damaged row is not)."""
    row = dict(zip(EVENT_FIELDS, values, strict=True))
    if row["bin"] not in BINS:
        return False
    for name, value in row.items():
        if not isinstance(value, EVENT_TYPES[name]):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
    return True


@dataclass
class Salvage:
    """What could be read of a damaged database."""

    counts: dict[str, int] | None = None
    seq: int | None = None
    base: tuple[int, dict[str, int]] | None = None  # (seq, counts) of the last reset/rebuild
    journal: list[tuple[Any, ...]] = field(default_factory=list)  # (seq, *EVENT_FIELDS)
    pending: list[tuple[Any, ...]] = field(default_factory=list)  # EVENT_FIELDS
    outbox: list[tuple[Any, ...]] = field(default_factory=list)  # topic, payload, qos, created
    problems: list[str] = field(default_factory=list)


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open a database for reading without creating or changing any file: with its -wal
    when there is one, else immutable (nothing to lock, no -shm made)."""
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if has_content(wal) else "immutable=1"
    uri = f"file:{_uri_path(path)}?{mode}"
    db = sqlite3.connect(uri, uri=True, check_same_thread=False)
    # Damaged text must not stop the rows after it from being read.
    db.text_factory = lambda b: b.decode("utf-8", "replace")
    return db


def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.absolute()))


def salvage(path: Path) -> Salvage:
    """Everything that can still be read of the database at `path`, table by table."""
    out = Salvage()
    try:
        db = open_readonly(path)
    except (sqlite3.Error, ValueError) as exc:
        out.problems.append(f"cannot open: {exc}")
        return out
    try:
        _salvage_meta(db, out)
        _salvage_counts(db, out)
        journal = _rows(db, f"SELECT seq, {_columns(db, 'journal')} FROM journal", out)
        out.journal = sorted((r for r in journal if _count(r[0]) and valid_event(r[1:])),
                             key=lambda r: int(r[0]))
        out.pending = [r[1:] for r in _rows(db, f"SELECT id, {_columns(db, 'pending')} "
                                                "FROM pending", out) if valid_event(r[1:])]
        out.outbox = [r[1:] for r in _rows(db, "SELECT id, topic, payload, qos, created "
                                              "FROM outbox", out) if _valid_message(r[1:])]
    finally:
        db.close()
    return out


def _columns(db: sqlite3.Connection, table: str) -> str:
    """EVENT_FIELDS as a select list, NULL for those a file from an older smartbin lacks."""
    try:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    except (sqlite3.Error, ValueError):
        have = set(EVENT_FIELDS)
    return ", ".join(name if name in have else "NULL" for name in EVENT_FIELDS)


def _rows(db: sqlite3.Connection, sql: str, out: Salvage) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    try:
        cur = db.execute(sql)
        while batch := cur.fetchmany(SALVAGE_BATCH):
            rows.extend(batch)
    except (sqlite3.Error, ValueError) as exc:  # ValueError: an undecodable error text
        out.problems.append(f"{sql.split(' FROM ')[-1]}: {exc}")
    return rows


def _salvage_meta(db: sqlite3.Connection, out: Salvage) -> None:
    meta = dict(r for r in _rows(db, "SELECT key, value FROM meta", out) if len(r) == 2)
    out.seq = parse_seq(meta.get("seq"))
    out.base = parse_base(meta.get("base"))


def _salvage_counts(db: sqlite3.Connection, out: Salvage) -> None:
    rows = _rows(db, "SELECT bin, n FROM counts", out)
    counts = {b: _count(n) for b, n in rows if b in BINS}
    if set(counts) == set(BINS) and all(n is not None for n in counts.values()):
        out.counts = {b: counts[b] or 0 for b in BINS}


def _valid_message(row: tuple[Any, ...]) -> bool:
    topic, payload, qos, created = row
    if not (isinstance(topic, str) and isinstance(payload, str) and qos in (0, 1, 2)
            and isinstance(created, float | int)):
        return False
    try:
        return isinstance(json.loads(payload), dict)
    except (ValueError, RecursionError):
        return False


def format_base(seq: int, counts: dict[str, int]) -> str:
    """meta 'base': the counts as they were at `seq` (a reset, a rebuild), so the journal
    after it is enough to rebuild the counts."""
    return json.dumps({"seq": seq, "counts": counts})


def parse_base(value: object) -> tuple[int, dict[str, int]] | None:
    if not isinstance(value, str):
        return None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("counts"), dict):
        return None
    seq = _count(data.get("seq"))
    counts = {b: _count(data["counts"].get(b, 0)) for b in BINS}
    if seq is None or any(n is None for n in counts.values()):
        return None
    return seq, {b: n or 0 for b, n in counts.items()}


# ---------------------------------------------------------------------------- rebuilding


@dataclass(frozen=True)
class Rebuilt:
    counts: dict[str, int]
    seq: int  # the last seq the old database may have given
    source: str  # said in the log line and the store_recovered fault

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def rebuild(s: Salvage, side: SidecarState | None) -> Rebuilt:
    """The counts and last seq for a new database, from the best source available."""
    top = max((int(r[0]) for r in s.journal), default=0)
    seq = max(s.seq or 0, top)
    if side is not None and (s.seq is None or side.seq > seq):
        seq = max(seq, side.reserved)  # the last seq is unknown: skip past any it may be
    if s.counts is not None:
        return Rebuilt(s.counts, seq, "the counts table of the old file")
    base_seq, counts, base_name = 0, dict.fromkeys(BINS, 0), ""
    if side is not None:
        base_seq, counts = side.seq, dict(side.counts)
        base_name = f"{DB_NAME}{SIDECAR_SUFFIX} (saved {side.saved()})"
    if s.base is not None and s.base[0] >= base_seq:
        base_seq, counts, base_name = s.base[0], dict(s.base[1]), ""
    tail = [r for r in s.journal if int(r[0]) > base_seq]
    for row in tail:
        counts[row[1 + EVENT_FIELDS.index("bin")]] += 1
    complete = ({int(r[0]) for r in tail} == set(range(base_seq + 1, top + 1))
                and s.seq is not None and top >= s.seq)
    if not base_name and not tail:
        if s.base is None:
            return Rebuilt(counts, seq, "nothing (no readable counts, journal or "
                           f"{DB_NAME}{SIDECAR_SUFFIX}): counting starts again from zero")
        return Rebuilt(counts, seq, "the last reset recorded in the old file")
    if base_name:
        source = base_name if not tail else f"{base_name} and {len(tail)} journal rows after it"
    else:
        source = f"the journal of the old file ({len(tail)} rows)"
    if not complete:
        source += f"; items counted after seq {max(top, base_seq)} may be missing"
    return Rebuilt(counts, seq, source)


def move_aside(path: Path) -> Path | None:
    """Rename the database (with its -wal and -shm) to `<name>.corrupt-<time>`; the aside
    path, or None when there was no file at all."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(p.exists() for p in with_companions(aside)):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    moved = False
    try:
        for src, dst in zip(with_companions(path), with_companions(aside), strict=True):
            if src.exists():
                os.replace(src, dst)
                moved = moved or src == path
    except OSError as exc:
        raise StoreError(f"{path}: damaged, and it cannot be moved aside ({exc}); move it "
                         "(and its -wal, -shm) away by hand, then start again") from exc
    return aside if moved else None


def with_companions(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


# ---------------------------------------------------------------------------- inspecting


def inspect(state_dir: str | Path) -> str:
    """The count database's health in one line, changing nothing. It starts with the
    verdict: "ok, N items ...", "new: ...", "missing: ...", "corrupt: ..." or
    "unreadable: ..."."""
    path = Path(state_dir) / DB_NAME
    side = Sidecar(path).read()
    if not has_content(path):
        if side is not None and side.counted:
            what = "is empty" if path.exists() else "does not exist"
            return (f"missing: {path} {what} but the bin had counted {side.total} items "
                    f"(seq {side.seq}, {DB_NAME}{SIDECAR_SUFFIX} saved {side.saved()}); the "
                    "service will rebuild the counts from it")
        return f"new: {path} does not exist yet; the service creates it"
    try:
        problem = header_problem(path)
        if problem is None:
            return _inspect_open(path, side)
    except OSError as exc:
        return f"unreadable: {path}: {exc}"
    return _corrupt_line(path, problem, side)


def _inspect_open(path: Path, side: SidecarState | None) -> str:
    try:
        db = open_readonly(path)
        try:
            problem = check_database(db)
            if problem is None:
                return _ok_line(db, path, side)
        finally:
            db.close()
    except (sqlite3.Error, ValueError) as exc:
        if not is_corruption(exc):
            return f"unreadable: {path}: {exc}"
        problem = str(exc)[:300]
    return _corrupt_line(path, problem, side)


def _ok_line(db: sqlite3.Connection, path: Path, side: SidecarState | None) -> str:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"meta", "counts"} <= tables:
        return f"new: {path} holds no counts yet"
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    seq = parse_seq(meta.get("seq")) or 0
    total = sum(int(n) for b, n in db.execute("SELECT bin, n FROM counts") if b in BINS)
    if seq == 0 and total == 0 and side is not None and side.counted:
        return (f"missing: {path} holds no items but the bin had counted {side.total} items "
                f"({DB_NAME}{SIDECAR_SUFFIX} saved {side.saved()}); the service will rebuild "
                "the counts from it")
    line = f"ok, {total} items counted (last seq {seq})"
    pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] if "pending" in tables \
        else 0
    if pending:
        line += f", {pending} item(s) mid-cycle to resolve at start"
    if meta.get("recovered"):
        line += f"; rebuilt {meta['recovered']}"
    return line


def _corrupt_line(path: Path, problem: str, side: SidecarState | None) -> str:
    rebuilt = rebuild(salvage(path), side)
    return (f"corrupt: {path}: {problem}; the service will move it aside and rebuild "
            f"{rebuilt.total} items from {rebuilt.source}")


def check_store(state_dir: str | Path) -> str:
    """`inspect` for `smartbin check`: the line when the database is fine (or not made yet),
    else StoreError with it."""
    line = inspect(state_dir)
    if line.startswith(("ok", "new")):
        return line
    raise StoreError(line)
