"""The dashboard's view of every bin under the prefix, built from the MQTT messages.

Retained messages are read by every dashboard started later, so one of the wrong shape (a
list where a count belongs, a string time, bytes that are not UTF-8, a huge number) must
never break a page: each field is checked as it arrives (with the same checks as
`smartbin monitor`) and is None when it is not what a bin sends. Only this module reads
bin payloads; the pages get the checked values as JSON.

Runs on the asyncio loop only (the bridge hands messages over), so it needs no lock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bin_controller.bins import BINS
from bin_controller.payloads import (
    AVAILABILITY,
    COUNTS,
    EVENT,
    FAULT,
    FILL,
    IMAGE,
    IMAGE_META,
    LAST,
    OFFLINE,
    ONLINE,
    STATE,
    STATS,
    TEACH_PHASES,
    JsonObject,
    JsonValue,
    parse_json,
)
from bin_controller.photolog import comment_seq
from bin_controller.tools.monitor import FILL_STATES, MAX_BINS, MAX_COUNT, fraction, timestamp

MAX_TEXT = 200  # characters of any text shown (a label, a fault's detail)
MAX_IMAGE_BYTES = 2 * 1024 * 1024  # a thumbnail is about 5 KB
RECENT_FAULTS = 50  # per bin, in memory; the history keeps them all
MAX_BIN_ID = 200
STATES = ("idle", "settling", "capturing", "classifying", "sorting", "clearing", "cooldown",
          "paused", "fault")
STATS_FIELDS = ("uptime_s", "cycle_ms_p50", "cycle_ms_p95", "items_per_hour", "outbox",
                "cpu_temperature_c", "photos_mb", "version")

# (kind, JSON for the pages): ("bin", its snapshot), ("item", {bin: bin id, seq, time,
# item: the item}), ("fault", {bin: bin id, kind, detail, time})
Update = tuple[str, dict[str, Any]]


# ---------------------------------------------------------------------- field checks


def text(value: JsonValue | None) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def whole(value: JsonValue | None) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT:
        return value
    return None


def real(value: JsonValue | None) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and abs(value) < MAX_COUNT:
        return float(value)
    return None


def flag(value: JsonValue | None) -> bool | None:
    return value if isinstance(value, bool) else None


def compartment(value: JsonValue | None) -> str | None:
    return value if isinstance(value, str) and value in BINS else None


def obj(value: JsonValue | None) -> JsonObject:
    return value if isinstance(value, dict) else {}




def teach_progress(data: JsonValue | None) -> dict[str, Any] | None:
    """The `teach` of a bin's state (a background teach), or None when it has none;
    `finished` (unix time) once it ended, also the last one kept over a restart."""
    if not isinstance(data, dict):
        return None
    phase = data.get("phase")
    result = obj(data.get("result"))
    return {"phase": phase if isinstance(phase, str) and phase in TEACH_PHASES else None,
            "done": whole(data.get("done")), "total": whole(data.get("total")),
            "error": text(data.get("error")), "version": text(result.get("version")),
            "finished": timestamp(data.get("finished"))}


def bin_id_ok(bin_id: str) -> bool:
    """A bin id the dashboard shows: one topic level, printable, not absurdly long."""
    return 0 < len(bin_id) <= MAX_BIN_ID and bin_id.isprintable() \
        and not any(ch in bin_id for ch in "+#/")


def item(data: JsonObject) -> dict[str, Any]:
    """An `event` (or the retained `last`), as the pages show it."""
    return {"seq": whole(data.get("seq")), "time": timestamp(data.get("time")),
            "label": text(data.get("label")), "label_en": text(data.get("label_en")),
            "bin": compartment(data.get("bin")),
            "predicted_bin": compartment(data.get("predicted_bin")),
            "confidence": fraction(data.get("confidence")),
            "bin_confidence": fraction(data.get("bin_confidence")),
            "uncertain": flag(data.get("uncertain")) is True,
            "failed": flag(data.get("failed")) is True,
            "forced": flag(data.get("forced")) is True,
            "photo": flag(data.get("photo")) is True,
            "error": text(data.get("error")), "model_version": text(data.get("model_version"))}


def contamination(data: JsonValue | None) -> dict[str, Any] | None:
    if not isinstance(data, dict):
        return None
    return {"rate": fraction(obj(data.get("total")).get("rate")),
            "reviewed": whole(obj(data.get("total")).get("reviewed")),
            "wrong": whole(obj(data.get("total")).get("wrong")),
            "reviewed_fraction": fraction(data.get("reviewed_fraction")),
            "bins": {b: {"rate": fraction(obj(data.get(b)).get("rate")),
                         "wrong": whole(obj(data.get(b)).get("wrong"))} for b in BINS}}


def fill_level(data: JsonValue | None) -> dict[str, Any]:
    d = obj(data)
    pct = real(d.get("pct"))
    state = d.get("state")
    return {"pct": pct if pct is not None and 0 <= pct <= 100 else None,
            "state": state if isinstance(state, str) and state in FILL_STATES else None,
            "sensor_fault": d.get("sensor_fault") is True,
            "full_in_s": timestamp(d.get("full_in_s"))}


def fault(data: JsonObject) -> dict[str, Any] | None:
    kind = text(data.get("kind"))
    if kind is None:
        return None
    return {"kind": kind, "detail": text(data.get("detail")) or "",
            "time": timestamp(data.get("time"))}


# ---------------------------------------------------------------------- one bin


@dataclass
class BinView:
    bin_id: str
    availability: str | None = None  # online, offline, None: not seen yet or unreadable
    state: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int | None] = field(default_factory=dict)
    contamination: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    fill: dict[str, dict[str, Any]] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    image_seq: int | None = None
    image: bytes | None = None
    faults: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_FAULTS))

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.bin_id, "online": self.availability, "state": self.state,
                "counts": self.counts, "contamination": self.contamination,
                "last": self.last, "fill": self.fill, "stats": self.stats,
                "image_seq": self.image_seq if self.image is not None else None,
                "faults": list(self.faults)}


# ---------------------------------------------------------------------- the fleet


class Fleet:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.bins: dict[str, BinView] = {}

    def snapshot(self) -> list[dict[str, Any]]:
        return [v.snapshot() for _, v in sorted(self.bins.items())]

    def get(self, bin_id: str) -> BinView | None:
        return self.bins.get(bin_id)

    def take(self, topic: str, payload: bytes) -> list[Update]:
        """One message in; what changed out, for the pages (nothing for a message that is
        not a bin's or cannot be read)."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != self.prefix or not bin_id_ok(parts[1]):
            return []
        bin_id, kind = parts[1], "/".join(parts[2:])
        if kind == IMAGE:
            return self._image(bin_id, payload)
        if kind == AVAILABILITY:
            word = payload.decode("utf-8", "replace") if len(payload) <= 16 else ""
            view = self._view(bin_id)
            if view is None:
                return []
            view.availability = word if word in (ONLINE, OFFLINE) else None
            return [("bin", view.snapshot())]
        if kind not in (COUNTS, STATE, EVENT, STATS, FILL, FAULT, LAST, IMAGE_META):
            return []
        if not payload:
            return []  # a retained message being cleared
        try:
            data = parse_json(payload, what=topic)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return []  # not what a bin sends: what was shown stays
        view = self._view(bin_id)
        if view is None:
            return []
        return self._json(view, kind, data)

    def _view(self, bin_id: str) -> BinView | None:
        view = self.bins.get(bin_id)
        if view is None:
            if len(self.bins) >= MAX_BINS:  # random topics must not grow the view without end
                return None
            view = self.bins[bin_id] = BinView(bin_id)
        return view

    def _json(self, view: BinView, kind: str, data: JsonObject) -> list[Update]:
        out: list[Update] = []
        if kind == COUNTS:
            view.counts = {k: whole(data.get(k)) for k in (*BINS, "total")}
            view.contamination = contamination(data.get("contamination"))
        elif kind == STATE:
            state = data.get("state")
            view.state = {
                "state": state if isinstance(state, str) and state in STATES else None,
                "detail": text(data.get("detail")), "paused": flag(data.get("paused")),
                "model": text(data.get("model")),
                "model_version": text(data.get("model_version")),
                "backend": text(data.get("backend")),
                "faults": {k[:MAX_TEXT]: n for k, v in obj(data.get("faults")).items()
                           if (n := whole(v)) is not None},
                "last_fault": text(data.get("last_fault")),
                "teach": teach_progress(data.get("teach"))}
        elif kind in (EVENT, LAST):
            shown = item(data)
            if shown["seq"] is None:
                return []
            if view.last is None or view.last["seq"] is None or shown["seq"] >= view.last["seq"]:
                view.last = shown
            if kind == EVENT:
                out.append(("item", {"bin": view.bin_id, "seq": shown["seq"],
                                     "time": shown["time"], "item": shown}))
        elif kind == STATS:
            view.stats = {k: (text(data.get(k)) if k == "version" else real(data.get(k)))
                          for k in STATS_FIELDS}
        elif kind == FILL:
            view.fill = {b: fill_level(data.get(b)) for b in BINS if b in data}
        elif kind == FAULT:
            found = fault(data)
            if found is None:
                return []
            view.faults.appendleft(found)
            out.append(("fault", {"bin": view.bin_id, **found}))
        elif kind == IMAGE_META:
            return []  # the JPEG's own comment and the event carry the seq too
        out.insert(0, ("bin", view.snapshot()))
        return out

    def _image(self, bin_id: str, payload: bytes) -> list[Update]:
        if not payload or len(payload) > MAX_IMAGE_BYTES or not payload.startswith(b"\xff\xd8"):
            return []  # not a JPEG: the one shown stays
        view = self._view(bin_id)
        if view is None:
            return []
        view.image = payload
        view.image_seq = _image_seq(payload)
        return [("bin", view.snapshot())]


def _image_seq(payload: bytes) -> int | None:
    try:
        seq = comment_seq(payload)
    except Exception:  # a JPEG from anyone: Pillow may fail on it in any way
        return None
    return seq if seq is not None and 0 <= seq < MAX_COUNT else None
