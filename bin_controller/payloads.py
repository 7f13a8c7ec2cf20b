"""Every MQTT topic suffix and payload the bin sends, in one place.

Dashboards, `smartbin monitor` and Home Assistant parse these bytes, so they are built here
and nowhere else: changing a payload means changing this file (and its golden tests in
tests/test_mqtt_units.py). Topics are relative to the bin's base, `<prefix>/<bin id>`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeAlias

from bin_controller.bins import BINS
from bin_controller.domain import Fault, SortEvent, State

JsonValue: TypeAlias = (
    "bool | int | float | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None")
JsonObject: TypeAlias = "dict[str, JsonValue]"

AVAILABILITY = "availability"
COUNTS = "counts"
EVENT = "event"
LAST = "last"
STATE = "state"
STATS = "stats"
FAULT = "fault"
COMMAND = "cmd"
REPLY = "reply"

ONLINE = "online"
OFFLINE = "offline"

# Events are the only messages that must arrive (at least once); the outbox keeps them.
EVENT_QOS = 1


@dataclass(frozen=True)
class OutboxMessage:
    """A message queued in the store's outbox, in the same transaction as its item."""

    topic: str  # relative to the bin's base topic
    payload: str
    qos: int


def to_json(value: JsonValue) -> str:
    # ensure_ascii=False: labels are Chinese, and consumers read UTF-8.
    return json.dumps(value, ensure_ascii=False)


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


def counts_payload(snapshot: Mapping[str, int]) -> str:
    return to_json(snapshot)


def bin_count_payloads(snapshot: Mapping[str, int]) -> dict[str, str]:
    """counts/<bin> topic -> the bare integer, for consumers that cannot parse JSON."""
    return {counts_topic(b): str(snapshot[b]) for b in BINS}


def state_payload(state: State, detail: str, status: Mapping[str, JsonValue]) -> str:
    return to_json({"state": state.value, "detail": detail, **status})


def fault_payload(fault: Fault) -> str:
    return to_json({"kind": fault.kind, "detail": fault.detail, "time": fault.time})


def stats_report(*, uptime_s: float, cycle_ms_p50: float | None, cycle_ms_p95: float | None,
                 items_per_hour: int, outbox: int, version: str,
                 status: Mapping[str, JsonValue], cpu_temperature_c: float | None) -> JsonObject:
    """The `stats` message as an object (also what `Telemetry.stats()` returns)."""
    out: JsonObject = {"uptime_s": uptime_s, "cycle_ms_p50": cycle_ms_p50,
                       "cycle_ms_p95": cycle_ms_p95, "items_per_hour": items_per_hour,
                       "outbox": outbox, "version": version, **status}
    if cpu_temperature_c is not None:
        out["cpu_temperature_c"] = cpu_temperature_c
    return out
