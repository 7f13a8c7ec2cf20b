"""Who publishes for a bin id: a retained claim that catches two bins with one bin.id.

Two services with the same bin.id connect with the same client id, so the broker drops
the older connection each time the other one (re)connects: in MQTT 3.1.1 that is just
"Unspecified error", once a second, forever. So each service publishes a retained claim
`<base>/owner` with a token of its own (host, pid, random) on every connect, and reads the
claim back:

- a claim with another token arriving live means another service is publishing for this
  bin right now;
- a retained one is normal once (the previous run of this service left it), but seen on
  two connects within a minute it means another service keeps claiming the bin in between.

Either is a `duplicate_bin_id` fault: an error log line and a `fault` message.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable

from bin_controller.domain import Fault
from bin_controller.mqtt.connection import Connection
from bin_controller.payloads import OWNER, owner_payload, parse_json

log = logging.getLogger(__name__)

DUPLICATE = "duplicate_bin_id"
# Two sightings of a foreign retained claim within this window make a duplicate; the
# broker's kick-off loop produces one per reconnect, about every second or two.
DUPLICATE_WINDOW_S = 60.0
# While the duplicate lasts, the fault is reported again at most this often.
DUPLICATE_REPORT_S = 600.0


def process_token() -> str:
    """Unique to this process (and this Telemetry): host, pid and a random part."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class OwnerClaim:
    """Register `on_connect` and `on_message` (with retain) on the connection."""

    def __init__(self, conn: Connection, base: str, bin_id: str, *,
                 on_duplicate: Callable[[Fault], None], token: str | None = None) -> None:
        self.conn = conn
        self.topic = f"{base}/{OWNER}"
        self.bin_id = bin_id
        self.token = token or process_token()
        self._claim = owner_payload(self.token, socket.gethostname(), os.getpid(), time.time())
        self._on_duplicate = on_duplicate
        self._seen_this_connection = False
        self._sightings: deque[float] = deque(maxlen=2)
        self._reported_at: float | None = None

    def on_connect(self) -> None:
        self._seen_this_connection = False
        # QoS 1: a claim lost to a dropped connection is sent again on the next one.
        self.conn.publish(self.topic, self._claim, qos=1, retain=True)

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        other = _read_claim(payload)
        if other is None or other["token"] == self.token:
            return
        if not retained:
            self._duplicate(other)
            return
        if self._seen_this_connection:
            return
        self._seen_this_connection = True
        now = time.monotonic()
        self._sightings.append(now)
        if len(self._sightings) == 2 and now - self._sightings[0] < DUPLICATE_WINDOW_S:
            self._duplicate(other)
        else:
            log.debug("bin id %s was last claimed by %s (a previous run?)", self.bin_id,
                      other["token"])

    def _duplicate(self, other: dict[str, str]) -> None:
        now = time.monotonic()
        if self._reported_at is not None and now - self._reported_at < DUPLICATE_REPORT_S:
            return
        self._reported_at = now
        detail = (f"another smartbin (host {other['host']}, pid {other['pid']}) uses bin.id "
                  f"{self.bin_id!r} on this broker, and the broker keeps disconnecting one "
                  "of the two: give each bin its own bin.id (bin.id in its config file, or "
                  "--bin-id)")
        log.error("fault %s: %s", DUPLICATE, detail)
        self._on_duplicate(Fault(DUPLICATE, detail))


def _read_claim(payload: bytes) -> dict[str, str] | None:
    """Another claim's token, host and pid as text; None for an empty (cleared) or
    malformed one: anybody can publish there, and that must not make a fault."""
    try:
        data = parse_json(payload, what="owner claim") if payload else None
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        return None
    return {key: str(data.get(key, "?")) for key in ("token", "host", "pid")}
