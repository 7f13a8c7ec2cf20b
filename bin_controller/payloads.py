"""Every MQTT topic suffix and payload the bin sends, in one place.

Dashboards, `smartbin monitor` and Home Assistant parse these bytes, so they are built here
and nowhere else: changing a payload means changing this file (and its golden tests in
tests/test_mqtt_units.py). Topics are relative to the bin's base, `<prefix>/<bin id>`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeAlias

from bin_controller.bins import BINS
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.fill import Emptied

JsonValue: TypeAlias = (
    "bool | int | float | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None")
JsonObject: TypeAlias = "dict[str, JsonValue]"

AVAILABILITY = "availability"
COUNTS = "counts"
EVENT = "event"
LAST = "last"
STATE = "state"
STATS = "stats"
# The background teach's phases (`state`'s `teach.phase`): while it runs, then how it ended.
TEACH_RUNNING = ("exporting", "features", "fitting", "checking", "installing")
TEACH_FINISHED = ("done", "rejected", "failed", "cancelled")
TEACH_PHASES = TEACH_RUNNING + TEACH_FINISHED
FAULT = "fault"
COMMAND = "cmd"
REPLY = "reply"
OWNER = "owner"
# Per compartment fill level (retained) and the emptying of one (an event, through the outbox).
FILL = "fill"
EMPTIED = "emptied"
# The last item's picture: the JPEG thumbnail, and what it shows (its seq) beside it.
IMAGE = "image"
IMAGE_META = "image/meta"
IMAGE_CONTENT_TYPE = "image/jpeg"
# The command whose answer is a JPEG on a topic of its own (reply/review_photo/<seq>).
REVIEW_PHOTO = "review_photo"

ONLINE = "online"
OFFLINE = "offline"

# Events are the only messages that must arrive (at least once); the outbox keeps them.
EVENT_QOS = 1

# Limits on JSON read from the broker (commands, retained messages the monitor shows).
# Every message the bin sends or accepts is far below them; they keep a hostile message
# from costing memory, time or the recursion limit.
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # commands need 2 levels, the bin's own messages 3
# A number literal's length: Python refuses ints over 4,300 digits with a ValueError, and
# nothing here needs more than a timestamp's 20 characters.
MAX_NUMBER_CHARS = 100


@dataclass(frozen=True)
class OutboxMessage:
    """A message queued in the store's outbox, in the same transaction as its item."""

    topic: str  # relative to the bin's base topic
    payload: str
    qos: int


def to_json(value: JsonValue) -> str:
    # ensure_ascii=False: labels are Chinese, and consumers read UTF-8.
    return json.dumps(value, ensure_ascii=False)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `text`'s arrays and objects nest deeper than `limit` (brackets inside strings
    do not count). Checked before json.loads, which raises RecursionError on a payload
    nested 100,000 deep."""
    skeleton = _STRING.sub("", text)
    depth = 0
    for bracket in _BRACKET.findall(skeleton):
        depth += 1 if bracket in "[{" else -1
        if depth > limit:
            return True
    return False


def parse_json(raw: bytes, *, what: str = "payload") -> JsonValue:
    """JSON from the broker, within the limits above; every failure is a ValueError whose
    message starts with `what` and names the limit or the syntax error."""
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes; the limit is {MAX_JSON_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if json_too_deep(text):
        raise ValueError(f"{what} nests JSON more than {MAX_JSON_DEPTH} levels deep (the "
                         "limit)")
    try:
        value: JsonValue = json.loads(text, parse_int=_number(int, what),
                                      parse_float=_number(float, what),
                                      parse_constant=_not_a_number(what))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    return value


def _number(kind: type[int] | type[float], what: str) -> Callable[[str], int | float]:
    def parse(literal: str) -> int | float:
        if len(literal) > MAX_NUMBER_CHARS:
            raise ValueError(f"{what} has a number of {len(literal)} characters; the limit "
                             f"is {MAX_NUMBER_CHARS}")
        value = kind(literal)
        if not math.isfinite(value):  # 1e999 overflows to infinity
            raise ValueError(f"{what} has the number {literal}, too large for a float")
        return value

    return parse


def _not_a_number(what: str) -> Callable[[str], float]:
    def refuse(literal: str) -> float:
        raise ValueError(f"{what} has {literal}, which is not a JSON number")

    return refuse


def counts_topic(bin_name: str) -> str:
    return f"{COUNTS}/{bin_name}"


def command_topic(name: str) -> str:
    return f"{COMMAND}/{name}"


def reply_topic(name: str) -> str:
    return f"{REPLY}/{name}"


def event_message(event: SortEvent) -> OutboxMessage:
    """The `event` message of a committed item (its `seq` already given)."""
    return OutboxMessage(EVENT, to_json(asdict(event)), EVENT_QOS)


def last_payload(event: SortEvent) -> str:
    return to_json({"seq": event.seq, "time": event.time, "label": event.label,
                    "label_en": event.label_en, "bin": event.bin,
                    "confidence": event.confidence, "uncertain": event.uncertain,
                    "failed": event.failed})


def counts_payload(snapshot: Mapping[str, int],
                   contamination: Mapping[str, JsonValue] | None = None) -> str:
    """The counts (what physically happened) and, when the bin keeps a site log, the
    contamination reviewers found among them (SiteLog.contamination())."""
    if contamination is None:
        return to_json(dict(snapshot))
    return to_json({**snapshot, "contamination": contamination})


def bin_count_payloads(snapshot: Mapping[str, int]) -> dict[str, str]:
    """counts/<bin> topic -> the bare integer, for consumers that cannot parse JSON."""
    return {counts_topic(b): str(snapshot[b]) for b in BINS}


def state_payload(state: State, detail: str, status: Mapping[str, JsonValue]) -> str:
    return to_json({"state": state.value, "detail": detail, **status})


def fault_payload(fault: Fault) -> str:
    return to_json({"kind": fault.kind, "detail": fault.detail, "time": fault.time})


def fault_message(fault: Fault) -> OutboxMessage:
    """A fault as an outbox message: delivered at least once, across outages and restarts,
    in order with the events around it."""
    return OutboxMessage(FAULT, fault_payload(fault), 1)


# What `fill` says per compartment, in this order (FillTracker.snapshot() has more: the raw
# sensor level and the event counts are for the logs and the simulator's report).
FILL_FIELDS = ("pct", "state", "source", "sensor_fault", "items", "capacity_l", "full_in_s")


def fill_payload(snapshot: Mapping[str, Mapping[str, object]]) -> str:
    """The retained `fill`: compartment -> its level (percent), state (ok, warn, full),
    where the level comes from (sensor or estimate), whether the sensor is faulty, the
    items since the last emptying, the capacity and the predicted seconds to full (null
    when it is not filling)."""
    return json.dumps({b: {key: snapshot[b][key] for key in FILL_FIELDS}
                       for b in BINS if b in snapshot}, ensure_ascii=False)


def emptied_message(emptied: Emptied) -> OutboxMessage:
    """A compartment was emptied: through the outbox like a fault, so an emptying during a
    broker outage still arrives; `pct_before` is the level it was emptied at."""
    return OutboxMessage(EMPTIED, to_json({
        "bin": emptied.bin, "time": emptied.time, "pct_before": emptied.pct_before,
        "items": emptied.items, "source": emptied.source}), EVENT_QOS)


IMAGE_META_FIELDS = ("seq", "time", "label", "bin", "bytes", "width", "height", "content_type")


def image_meta_payload(meta: Mapping[str, object]) -> str:
    """What the retained `image` shows (photolog.Thumbnail.meta()): the seq in it is also in
    the item's `event` and in the JPEG's comment, so a consumer can tell a picture from the
    one before it."""
    return json.dumps({key: meta[key] for key in IMAGE_META_FIELDS}, ensure_ascii=False)


def review_photo_topic(seq: int) -> str:
    """Where `cmd/review_photo` puts the item's full photo (its JSON reply names it)."""
    return f"{REPLY}/{REVIEW_PHOTO}/{seq}"


def owner_payload(token: str, host: str, pid: int, since: float) -> str:
    """The retained claim on a bin id: which running service publishes for it."""
    return to_json({"token": token, "host": host, "pid": pid, "since": since})


def stats_report(*, uptime_s: float, cycle_ms_p50: float | None, cycle_ms_p95: float | None,
                 items_per_hour: int, outbox: int, version: str,
                 status: Mapping[str, JsonValue], cpu_temperature_c: float | None,
                 contamination: Mapping[str, JsonValue] | None = None,
                 photos: Mapping[str, JsonValue] | None = None) -> JsonObject:
    """The `stats` message as an object (also what `Telemetry.stats()` returns); with a
    site log, its contamination and the photo log's figures (photos_mb, photos_dropped,
    photos_deleted)."""
    out: JsonObject = {"uptime_s": uptime_s, "cycle_ms_p50": cycle_ms_p50,
                       "cycle_ms_p95": cycle_ms_p95, "items_per_hour": items_per_hour,
                       "outbox": outbox, "version": version, **status}
    if cpu_temperature_c is not None:
        out["cpu_temperature_c"] = cpu_temperature_c
    if photos is not None:
        out.update(photos)
    if contamination is not None:
        out["contamination"] = contamination
    return out
