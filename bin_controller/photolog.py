"""The photo log: the frame each item was classified on, kept as a JPEG under its seq.

Off the sorting path: the loop hands the frame over (`keep`, a queue put) and a thread of
its own logs the item in the site log, encodes and writes the photo, and hands a small
thumbnail to listeners (MQTT's `image`), always after the photo is on disk and always
carrying the seq it belongs to (also inside the JPEG, as its comment), so a picture is
never paired with the wrong item.

What is kept (`photos.keep`): every item's photo, only uncertain and failed items', or none.
What goes, and in what order, when space is short:
  1. confident items nobody reviewed (also when older than `photos.keep_days`),
  2. items waiting for a review (uncertain, failed),
  3. reviewed items (the site dataset).
`photos.max_mb` only ever takes the first kind: when it is reached with nothing of that kind
left, new photos are not written (a warning says so) rather than deleting photos that wait
for a review. A disk about to fill (less than `photos.min_free_mb` free), or a count database
that finds the disk full (`spare`), takes all three kinds in that order: photos are the
first thing dropped, counts never are.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bin_controller.config import Config, PhotosSection
from bin_controller.domain import SortEvent
from bin_controller.errors import CommandError, StoreError
from bin_controller.sitelog import DATASET, ORDINARY, PHOTO_CLASSES, WAITING, Item, SiteLog
from bin_controller.store_recovery import is_disk_full

log = logging.getLogger(__name__)

# Frames waiting to be written. The writer keeps up with any real bin (an item takes a
# second, a photo a few ms); a backlog this long means a stalled disk, and the frames it
# would hold are dropped (their items are still logged) rather than the loop waiting.
MAX_QUEUED_FRAMES = 32
# Photos deleted per step when making room.
DELETE_BATCH = 20
# Age pruning runs at most this often (and at start).
PRUNE_EVERY_S = 60.0
# The same space warning is reported again at most this often.
WARN_REPEAT_S = 600.0
THUMBNAIL_QUALITY = 75
MB = 1024 * 1024


@dataclass(frozen=True)
class Thumbnail:
    """The per-item picture for MQTT: the item's photo, small, with the seq it shows."""

    seq: int
    time: float
    jpeg: bytes
    width: int
    height: int
    label: str | None
    bin: str

    def meta(self) -> dict[str, object]:
        return {"seq": self.seq, "time": self.time, "label": self.label, "bin": self.bin,
                "bytes": len(self.jpeg), "width": self.width, "height": self.height,
                "content_type": "image/jpeg"}


def photos_dir(cfg: Config) -> Path:
    return Path(cfg.photos.dir or Path(cfg.bin.state_dir) / "photos").expanduser()


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding `folder` (a seam: tests make the disk fill)."""
    return shutil.disk_usage(folder).free


def seq_comment(seq: int) -> bytes:
    return f"smartbin seq={seq}".encode()


def comment_seq(jpeg: bytes) -> int | None:
    """The seq a thumbnail or photo carries in its JPEG comment, or None."""
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            comment = img.info.get("comment", b"")
    except OSError:
        return None
    text = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
    if not text.startswith("smartbin seq="):
        return None
    try:
        return int(text.removeprefix("smartbin seq="))
    except ValueError:
        return None


def encode_jpeg(image: Image.Image, quality: int, seq: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, comment=seq_comment(seq))
    return buf.getvalue()


class PhotoLog:
    """A PhotoSink for the loop (`wants`, `keep`) and the photos' owner."""

    def __init__(self, cfg: PhotosSection, folder: str | Path, sitelog: SiteLog, *,
                 on_fault: Callable[[str, str], None] | None = None,
                 disk_free: Callable[[Path], int] = free_bytes) -> None:
        self.cfg = cfg
        self.folder = Path(folder)
        self.sitelog = sitelog
        self.on_fault = on_fault
        self.on_photo: list[Callable[[Thumbnail], None]] = []
        self.last: Thumbnail | None = None
        self.dropped = 0  # frames never written: a backlog, a full cap or a full disk
        self.deleted = 0  # photos deleted to make room or by age
        self._disk_free = disk_free
        self._queue: queue.Queue[tuple[SortEvent, np.ndarray | None] | None] = queue.Queue()
        self._frames = 0  # frames in the queue
        self._idle = threading.Condition()
        self._busy = 0  # items queued or being written
        self._lock = threading.RLock()  # photo files and the byte count
        self._bytes = 0
        self._unlinked: set[int] = set()  # photos deleted whose row still names them
        self._pruned = 0.0
        self._warned: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        try:
            if sitelog.set_aside is not None:
                self._set_folder_aside()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.folder}: cannot create the photos folder: {exc}; set "
                               "photos.dir to a writable folder") from exc

    # ------------------------------------------------------------------ the loop's side

    def wants(self, event: SortEvent) -> bool:
        """Whether this item's photo is kept (photos.keep), decided before it is counted so
        that its event says so."""
        keep = self.cfg.keep
        return keep == "all" or (keep == "uncertain" and (event.uncertain or event.failed))

    def keep(self, event: SortEvent, frame: np.ndarray | None) -> None:
        """Log the committed item and, when its event says so, its photo. Never blocks."""
        with self._idle:
            if frame is not None and self._frames >= MAX_QUEUED_FRAMES:
                frame = None
                self.dropped += 1
                self._warn("backlog", f"photos: {MAX_QUEUED_FRAMES} photos wait to be "
                           "written; the disk is too slow, photos are being dropped")
            if frame is not None:
                self._frames += 1
            self._busy += 1
        self._queue.put((event, frame))

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._reconcile()
        self._prune(time.time())
        self.last = self._newest_thumbnail()
        self._thread = threading.Thread(target=self._run, name="photo-log", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every handed-over item is logged (tests, a clean stop)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("photos: %d items were still being written at stop", self._busy)
            self._thread = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            event, frame = job
            try:
                self._log(event, frame)
            except Exception:  # one bad photo must not end the photo log
                log.exception("photos: item #%d could not be logged", event.seq)
            finally:
                with self._idle:
                    self._busy -= 1
                    if frame is not None:
                        self._frames -= 1
                    self._idle.notify_all()
            now = time.time()
            if now - self._pruned >= PRUNE_EVERY_S:
                self._prune(now)

    # ------------------------------------------------------------------ writing

    def _log(self, event: SortEvent, frame: np.ndarray | None) -> None:
        logged = self._add_item(event)
        if frame is None or self.cfg.keep == "none":
            return
        image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
        if event.photo:
            if logged:
                self._write(event, image)
            else:
                # A photo no row names would never be reviewed, exported or deleted.
                self.dropped += 1
        thumbnail = self._thumbnail(image, event.seq, event.time, event.label, event.bin)
        self.last = thumbnail
        for listener in self.on_photo:
            listener(thumbnail)

    def _add_item(self, event: SortEvent) -> bool:
        for attempt in range(2):
            try:
                self.sitelog.add_item(event)
                return True
            except Exception as exc:  # sqlite3.Error, a full disk: the item still counts
                if attempt == 0 and is_disk_full(exc) and self.spare():
                    continue  # photos made room for the row
                self._warn("sitelog", f"photos: the site log cannot be written ({exc}); "
                           f"item #{event.seq} is counted but not in the site log")
        return False

    def _thumbnail(self, image: Image.Image, seq: int, when: float, label: str | None,
                   bin_name: str) -> Thumbnail:
        thumb = image.copy()
        thumb.thumbnail((self.cfg.thumbnail_px, self.cfg.thumbnail_px))
        return Thumbnail(seq, when, encode_jpeg(thumb, THUMBNAIL_QUALITY, seq), thumb.width,
                         thumb.height, label, bin_name)

    def _newest_thumbnail(self) -> Thumbnail | None:
        """After a restart: the picture of the newest item that has a photo, so `image`
        is published again with the seq it shows."""
        items, _ = self.sitelog.query(with_photo=True, limit=1)
        photo = items[0].photo if items else None
        if photo is None:
            return None
        item = items[0]
        try:
            with Image.open(self.folder / photo) as img:
                image = img.convert("RGB")
        except OSError:
            return None
        return self._thumbnail(image, item.seq, item.time, item.label, item.bin)

    def _write(self, event: SortEvent, image: Image.Image) -> bool:
        data = encode_jpeg(image, self.cfg.quality, event.seq)
        waiting = event.uncertain or event.failed
        with self._lock:
            if not self._room(len(data), waiting=waiting):
                self.dropped += 1
                return False
            rel = f"{time.strftime('%Y-%m-%d', time.localtime(event.time))}/{event.seq:08d}.jpg"
            path = self.folder / rel
            try:
                _write_file(path, data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    self._warn("write", f"photos: {path} cannot be written ({exc})")
                    self.dropped += 1
                    return False
                # The disk filled between the check and the write: make room, once more.
                self._free_disk(len(data) + self._reserve())
                try:
                    _write_file(path, data)
                except OSError as again:
                    self._warn("disk", f"photos: the disk is full, photo #{event.seq} not "
                               f"kept ({again.strerror})")
                    self.dropped += 1
                    return False
            self._bytes += len(data)
            try:
                self.sitelog.set_photo(event.seq, rel, len(data),
                                       hashlib.sha256(data).hexdigest())
            except Exception as exc:
                # A file no row names would never be reviewed, exported or deleted.
                self._warn("sitelog", f"photos: the site log cannot be written ({exc}); "
                           f"photo #{event.seq} not kept")
                with contextlib.suppress(OSError):
                    path.unlink()
                self._bytes -= len(data)
                self.dropped += 1
                return False
        return True

    def _reserve(self) -> int:
        return int(self.cfg.min_free_mb * MB)

    def _room(self, size: int, *, waiting: bool) -> bool:
        """Make room for a photo of `size` bytes within the cap and the disk's reserve."""
        cap = int(self.cfg.max_mb * MB)
        while self._bytes + size > cap:
            batch = self.sitelog.photos(ORDINARY, limit=DELETE_BATCH)
            if not self._delete(_enough(batch, self._bytes + size - cap)):
                kind = "waiting for a review" if waiting else "new"
                self._warn("cap", f"photos: photos.max_mb ({self.cfg.max_mb:g}) is reached "
                           f"by photos waiting for a review and reviewed ones; {kind} photos "
                           "are not kept until some are reviewed (smartbin review) or "
                           "photos.max_mb is raised")
                return False
        return self._free_disk(size + self._reserve())

    def _free_disk(self, need: int) -> bool:
        """Delete photos, in the order of PHOTO_CLASSES, until `need` bytes are free."""
        try:
            free = self._disk_free(self.folder)
        except OSError:
            return True  # cannot tell: try the write
        if free >= need:
            return True
        freed = deleted = 0
        for kind in PHOTO_CLASSES:
            while free + freed < need:
                batch = _enough(self.sitelog.photos(kind, limit=DELETE_BATCH),
                                need - free - freed)
                step = self._delete(batch)
                if not step:
                    break  # none left of this kind (or only rows whose file is gone)
                freed += step
                deleted += len(batch)
        if deleted:
            self._warn("disk", f"photos: the disk has less than {self.cfg.min_free_mb:g} MB "
                       f"free; deleted {deleted} photos ({freed / MB:.1f} MB) to keep room "
                       "for the counts", fault=True)
        return free + freed >= need

    def _delete(self, items: list[Item]) -> int:
        """Delete these photos; the bytes that were really freed."""
        freed = 0
        with self._lock:
            for item in items:
                if item.photo is None:
                    continue
                try:
                    (self.folder / item.photo).unlink()
                except FileNotFoundError:
                    # Deleted here before while its row could not be updated (a full
                    # disk): freed then, not again; else removed by hand: gone from the
                    # byte count all the same.
                    if item.seq not in self._unlinked:
                        self._bytes -= item.bytes or 0
                except OSError as exc:
                    log.debug("photos: %s not deleted: %s", item.photo, exc)
                    continue
                else:
                    freed += item.bytes or 0
                    self._bytes -= item.bytes or 0
                    self.deleted += 1
                try:
                    self.sitelog.set_photo(item.seq, None)
                    self._unlinked.discard(item.seq)
                except Exception as exc:  # the disk is full: the file is gone anyway
                    self._unlinked.add(item.seq)
                    log.debug("photos: row of #%d not updated: %s", item.seq, exc)
        return freed

    def spare(self) -> int:
        """For the count database on a full disk: delete a batch of photos (the order of
        PHOTO_CLASSES) and return the bytes freed; 0 when nothing could be freed (the store
        then deletes what it owns, so a photo must never claim space it did not free)."""
        try:
            with self._lock:
                for kind in PHOTO_CLASSES:
                    batch = self.sitelog.photos(kind, limit=DELETE_BATCH)
                    freed = self._delete(batch)
                    if freed:
                        # Logged only: this runs inside the store's write, under its lock, and
                        # a fault published from here would take paho's lock while paho's
                        # thread waits for the store's (an ack): a deadlock the soak found.
                        # The store reports the disk_full fault itself, photo bytes included,
                        # once its lock is released.
                        self._warn("spare", f"photos: the disk is full; deleted {len(batch)} "
                                   "photos so the counts can be written")
                        return freed
                # No photo left: the site log's own WAL is the last thing to give back.
                return self.sitelog.shrink()
        except sqlite3.Error as exc:  # closed at stop, or unreadable: nothing freed
            log.debug("photos: no space spared: %s", exc)
            return 0

    # ------------------------------------------------------------------ retention

    def _prune(self, now: float) -> None:
        """Confident, unreviewed photos older than photos.keep_days, and log rows with
        nothing left to review."""
        self._pruned = now
        before = now - self.cfg.keep_days * 86400
        try:
            while batch := self.sitelog.photos(ORDINARY, limit=DELETE_BATCH * 10,
                                               before=before):
                self._delete(batch)
            self.sitelog.forget_old_rows(before)
        except Exception as exc:
            self._warn("prune", f"photos: old photos cannot be pruned ({exc})")
        self._remove_empty_days()

    def _reconcile(self) -> None:
        """At start: forget photos whose file is gone, and count the bytes of the rest."""
        total = 0
        for seq, rel in self.sitelog.all_photos():
            try:
                total += (self.folder / rel).stat().st_size
            except OSError:
                self.sitelog.set_photo(seq, None)
        with self._lock:
            self._bytes = total

    def _remove_empty_days(self) -> None:
        with contextlib.suppress(OSError):
            for day in self.folder.iterdir():
                if day.is_dir() and not any(day.iterdir()):
                    day.rmdir()

    def _set_folder_aside(self) -> None:
        if self.folder.is_dir() and any(self.folder.iterdir()):
            aside = self.folder.with_name(f"{self.folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            self.folder.rename(aside)
            log.warning("photos: the old photos belong to the old site log; moved to %s",
                        aside)

    # ------------------------------------------------------------------ reading

    def read(self, seq: int) -> bytes:
        """The photo of item `seq` as written (JPEG)."""
        item = self.sitelog.item(seq)
        if item is None:
            raise CommandError(f"no item #{seq} in the site log")
        if item.photo is None:
            raise CommandError(f"item #{seq} has no photo (photos.keep = {self.cfg.keep}, or "
                               "deleted to make room)")
        try:
            return (self.folder / item.photo).read_bytes()
        except OSError as exc:
            raise CommandError(f"the photo of item #{seq} cannot be read: {exc}") from exc

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            return {"photos_mb": round(self._bytes / MB, 2), "photos_dropped": self.dropped,
                    "photos_deleted": self.deleted}

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _warn(self, key: str, text: str, *, fault: bool = False) -> None:
        now = time.monotonic()
        last = self._warned.get(key)
        if last is not None and now - last < WARN_REPEAT_S:
            log.debug("%s", text)
            return
        self._warned[key] = now
        log.warning("%s", text)
        if fault and self.on_fault is not None:
            self.on_fault("disk_full", text)


def _enough(batch: list[Item], need: int) -> list[Item]:
    """The oldest photos of the batch that together free `need` bytes: no more is deleted
    than the room asked for."""
    out, total = [], 0
    for item in batch:
        if total >= need:
            break
        out.append(item)
        total += item.bytes or 0
    return out


def _write_file(path: Path, data: bytes) -> None:
    """Whole or not at all: a reader (a review, an export) never sees half a photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


__all__ = ["DATASET", "ORDINARY", "WAITING", "PhotoLog", "Thumbnail", "comment_seq",
           "photos_dir"]
