"""`smartbin monitor`: a live terminal view of one bin or a whole fleet, over MQTT.

Whatever is retained on the broker is read here, by every monitor started later, so a
message of the wrong shape (a list where a count belongs, a string time, deep nesting,
bytes that are not UTF-8, a number too large for a float) must never crash it: each field
is checked as it arrives and shown as "?" when it is not what the bin sends.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bin_controller.bins import BINS
from bin_controller.errors import SmartbinError
from bin_controller.mqtt.connection import parse_host
from bin_controller.payloads import (
    AVAILABILITY,
    COUNTS,
    EVENT,
    FILL,
    STATE,
    STATS,
    TEACH_FINISHED,
    TEACH_RUNNING,
    JsonObject,
    JsonValue,
    parse_json,
)

log = logging.getLogger(__name__)

RECENT_ITEMS = 5  # per bin
# Bins kept on screen: random topics under the prefix must not grow the view without end.
MAX_BINS = 1000
# A count or a time beyond this is not something a bin sends (and strftime cannot show it).
MAX_COUNT = 10**12
MAX_TIME = 10**11
UNKNOWN = "?"
BAR = 10  # characters of a fill bar
FILL_STATES = ("ok", "warn", "full")
TEACH_ERROR = 100  # characters of a failed teach's error on its line


@dataclass(frozen=True)
class Item:
    """One recent item, already in the shapes the screen needs."""

    seq: int | None
    time: float | None
    what: str
    bin: str
    confidence: float | None
    flag: str


@dataclass(frozen=True)
class Contamination:
    """What reviewers found (the `contamination` in `counts`), as shown text."""

    rate: str  # of the reviewed items, those in the wrong compartment: "12.5%", "-", "?"
    reviewed: str  # the reviewed fraction of the logged items
    wrong: dict[str, str]  # compartment -> reviewed items in it that belong elsewhere


@dataclass(frozen=True)
class Level:
    """One compartment's fill (from `fill`), each field None when it is not what the bin
    sends."""

    pct: float | None
    state: str | None
    sensor_fault: bool
    full_in_s: float | None


@dataclass
class BinView:
    availability: str = UNKNOWN
    counts: dict[str, str] = field(default_factory=dict)  # bin or total -> shown text
    contamination: Contamination | None = None  # None: the bin keeps no site log
    state: str = UNKNOWN
    events: deque[Item] = field(default_factory=lambda: deque(maxlen=RECENT_ITEMS))
    stats: JsonObject = field(default_factory=dict)
    fill: dict[str, Level] | None = None  # None: no `fill` seen (no fill tracking)
    teach: str | None = None  # the `state`'s teach as one line; None: no teach yet


# ---------------------------------------------------------------------- field checks


def shown(value: object) -> str:
    """Text safe for a terminal: control characters (escape sequences) become '?'."""
    text = value if isinstance(value, str) else UNKNOWN
    return "".join(ch if ch.isprintable() else UNKNOWN for ch in text)


def count(value: JsonValue | None) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT:
        return str(value)
    return UNKNOWN


def timestamp(value: JsonValue | None) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and 0 <= value < MAX_TIME:
        return float(value)
    return None


def fraction(value: JsonValue | None) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    return None


def percent(value: JsonValue | None) -> str:
    """A rate (0..1) as a percentage; "-" when there is none yet (nothing reviewed)."""
    if value is None:
        return "-"
    rate = fraction(value)
    return UNKNOWN if rate is None else f"{rate:.1%}"


def _object(value: JsonValue | None) -> JsonObject:
    return value if isinstance(value, dict) else {}


def contamination_of(value: JsonValue | None) -> Contamination:
    data = _object(value)
    return Contamination(rate=percent(_object(data.get("total")).get("rate", UNKNOWN)),
                         reviewed=percent(data.get("reviewed_fraction", UNKNOWN)),
                         wrong={b: count(_object(data.get(b)).get("wrong")) for b in BINS})


def level(value: JsonValue | None) -> Level:
    data = _object(value)
    pct = data.get("pct")
    state = data.get("state")
    full_in = timestamp(data.get("full_in_s"))
    return Level(
        pct=float(pct) if isinstance(pct, int | float) and not isinstance(pct, bool)
        and 0 <= pct <= 100 else None,
        state=state if isinstance(state, str) and state in FILL_STATES else None,
        sensor_fault=data.get("sensor_fault") is True, full_in_s=full_in)


def fill_line(c: Level) -> str:
    """`[#######   ]  72 % warn, full in 1 h 20 m`; '?' for what cannot be read."""
    if c.pct is None:
        bar, pct = " " * BAR, f"{UNKNOWN:>3}"
    else:
        filled = min(BAR, round(c.pct / 100 * BAR))
        bar, pct = "#" * filled + " " * (BAR - filled), f"{c.pct:3.0f}"
    text = f"[{bar}] {pct} % {c.state or UNKNOWN}"
    if c.full_in_s is not None:
        text += f", full in {duration(c.full_in_s)}"
    if c.sensor_fault:
        text += ", sensor fault"
    return text


def teach_line(value: JsonValue | None) -> str | None:
    """The `state`'s `teach` in one line: `features 120/260` while it runs; when it ended,
    the phase, the time and what came of it (the version installed, the numbers that
    refused it, the error). None when the bin has taught nothing yet."""
    if not isinstance(value, dict):
        return None
    phase = value.get("phase")
    if phase in TEACH_RUNNING:
        done, total = count(value.get("done")), count(value.get("total"))
        return f"{phase} {done}/{total}" if total not in ("0", UNKNOWN) else str(phase)
    if phase not in TEACH_FINISHED:
        return UNKNOWN
    line = f"{phase} {_clock(timestamp(value.get('finished')))}"
    result = _object(value.get("result"))
    error = value.get("error")
    if phase == "done":
        model, version = result.get("model"), result.get("version")
        if isinstance(version, str):
            named = f"{model} {version}" if isinstance(model, str) else version
            return f"{line}: installed {shown(named)}"
        return line
    if phase == "rejected":
        old = _object(_object(result.get("evaluation")).get("old_labels_top1"))
        base, new, n = fraction(old.get("base")), fraction(old.get("new")), count(old.get("n"))
        if base is not None and new is not None:
            margin = value.get("margin")
            allowed = f", margin {margin:g} points" if isinstance(margin, int | float) \
                and not isinstance(margin, bool) and 0 <= margin <= 100 else ""
            return (f"{line}: old labels {base:.1%} -> {new:.1%} on {n} photos "
                    f"({(base - new) * 100:.1f} points worse{allowed})")
    if isinstance(error, str) and error:
        text = shown(error)
        if len(text) > TEACH_ERROR:
            text = text[:TEACH_ERROR - 3] + "..."
        return f"{line}: {text}"
    return line


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "< 1 m"
    if minutes < 60:
        return f"{minutes} m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} m" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def item(data: JsonObject) -> Item:
    seq = data.get("seq")
    what = next((v for v in (data.get("label_en"), data.get("label"), data.get("error"))
                 if isinstance(v, str) and v), UNKNOWN)
    conf = data.get("bin_confidence") or data.get("confidence")
    flag = " uncertain" if data.get("uncertain") is True else (
        " failed" if data.get("failed") is True else "")
    return Item(seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                time=timestamp(data.get("time")), what=shown(what),
                bin=shown(data.get("bin")), confidence=fraction(conf), flag=flag)


# ---------------------------------------------------------------------- the fleet


class Fleet:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.bins: dict[str, BinView] = {}
        self.lock = threading.Lock()
        self.changed = threading.Event()

    def on_message(self, client: mqtt.Client | None, userdata: object,
                   msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            return  # not a topic any bin publishes
        try:
            self._take(topic, bytes(msg.payload))
        except Exception:  # a monitor never dies on a message; a bug here is still logged
            log.exception("monitor: message on %r ignored", topic)

    def _take(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != self.prefix:
            return
        bin_id, kind = parts[1], "/".join(parts[2:])
        if kind == AVAILABILITY:
            self._update(bin_id, availability=_word(payload))
            return
        if kind not in (COUNTS, STATE, EVENT, STATS, FILL):
            return
        try:
            data = parse_json(payload, what=topic)
        except ValueError:
            data = None  # not what a bin sends: shown as unknown
        obj: JsonObject = data if isinstance(data, dict) else {}
        if kind == COUNTS:
            found = obj.get("contamination")
            self._update(bin_id, counts={k: count(obj.get(k)) for k in (*BINS, "total")},
                         contamination=None if found is None else contamination_of(found))
        elif kind == STATE:
            self._update(bin_id, state=shown(obj.get("state")),
                         teach=teach_line(obj.get("teach")))
        elif kind == EVENT and obj:
            self._update(bin_id, event=item(obj))
        elif kind == STATS:
            self._update(bin_id, stats=obj)
        elif kind == FILL:
            if not payload:
                return  # a retained `fill` being cleared
            self._update(bin_id, fill={b: level(obj.get(b)) for b in BINS})

    def _update(self, bin_id: str, *, availability: str | None = None,
                counts: dict[str, str] | None = None, state: str | None = None,
                event: Item | None = None, stats: JsonObject | None = None,
                contamination: Contamination | None = None,
                fill: dict[str, Level] | None = None, teach: str | None = None) -> None:
        with self.lock:
            view = self.bins.get(bin_id)
            if view is None:
                if len(self.bins) >= MAX_BINS:
                    return
                view = self.bins[bin_id] = BinView()
            if availability is not None:
                view.availability = availability
            if counts is not None:
                view.counts = counts
                view.contamination = contamination  # counts without it: no site log
            if state is not None:
                view.state = state
                view.teach = teach  # every state carries the teach (null before one)
            if event is not None and (event.seq is None
                                      or all(e.seq != event.seq for e in view.events)):
                view.events.append(event)
            if stats is not None:
                view.stats = stats
            if fill is not None:
                view.fill = fill
        self.changed.set()

    def render(self) -> str:
        with self.lock:
            bins = {bin_id: (v.availability, dict(v.counts), v.state, list(v.events))
                    for bin_id, v in sorted(self.bins.items())}
            found = {bin_id: v.contamination for bin_id, v in sorted(self.bins.items())
                     if v.contamination is not None}
            levels = {bin_id: dict(v.fill) for bin_id, v in sorted(self.bins.items())
                      if v.fill is not None}
            teaches = {bin_id: v.teach for bin_id, v in sorted(self.bins.items())
                       if v.teach is not None}
        if not bins:
            return "waiting for bins..."
        head = f"{'bin':16} {'online':8} {'state':12} " + " ".join(f"{b:>10}" for b in BINS) \
            + f" {'total':>7}"
        lines = [head, "-" * len(head)]
        for bin_id, (online, counts, state, _) in bins.items():
            cols = " ".join(f"{counts.get(b, '-'):>10}" for b in BINS)
            lines.append(f"{shown(bin_id)[:16]:16} {online[:8]:8} {state[:12]:12} {cols} "
                         f"{counts.get('total', '-'):>7}")
        if found:
            lines.append("")
            lines.append("contamination (reviewed items that landed in the wrong compartment)")
            lines.append(f"  {'bin':16} {'wrong':>7} {'reviewed':>9} "
                         + " ".join(f"{b:>10}" for b in BINS))
            for bin_id, c in found.items():
                lines.append(f"  {shown(bin_id)[:16]:16} {c.rate:>7} {c.reviewed:>9} "
                             + " ".join(f"{c.wrong[b]:>10}" for b in BINS))
        if levels:
            lines.append("")
            lines.append("fill")
            for bin_id, compartments in levels.items():
                for b, at in compartments.items():
                    lines.append(f"  {shown(bin_id)[:16]:16} {b:10} {fill_line(at)}")
        if teaches:
            lines.append("")
            lines.append("teach")
            for bin_id, line in teaches.items():
                lines.append(f"  {shown(bin_id)[:16]:16} {line}")
        lines.append("")
        lines.append("recent items")
        for bin_id, (_, _, _, events) in bins.items():
            for e in events:
                when = _clock(e.time)
                seq = UNKNOWN if e.seq is None else str(e.seq)
                conf = f" {e.confidence:.0%}" if e.confidence is not None else ""
                lines.append(f"  {when} {shown(bin_id)[:16]:16} #{seq[:12]:<6} "
                             f"{e.what[:24]:24} -> {e.bin[:12]}{conf}{e.flag}")
        return "\n".join(lines)


def _clock(t: float | None) -> str:
    if t is None:
        return "??:??:??"
    try:
        return time.strftime("%H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):  # beyond what this platform's C time knows
        return "??:??:??"


def _word(payload: bytes) -> str:
    """A short text payload (availability): shown when it is short UTF-8, else '?'."""
    if len(payload) > 64:
        return UNKNOWN
    try:
        return shown(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return UNKNOWN


# ---------------------------------------------------------------------- the command


def _topic_level(option: str, value: str, *, wildcard: bool) -> None:
    if value == "+" and wildcard:
        return
    if not value or any(ch in value for ch in "/+#\0"):
        allowed = " or + for every bin" if wildcard else ""
        raise SmartbinError(f"{option} {value!r}: must be one MQTT topic level (no '/', '+', "
                            f"'#'){allowed}")


def run(args: argparse.Namespace) -> int:
    host, port = parse_host(args.host, option="--host")
    _topic_level("--prefix", args.prefix, wildcard=False)
    _topic_level("--bin-id", args.bin_id, wildcard=True)
    port = port or args.port
    fleet = Fleet(args.prefix)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    topic = f"{args.prefix}/{args.bin_id}/#"
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_message = fleet.on_message
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise SmartbinError(f"cannot reach the broker at {host}:{port}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from exc
    client.loop_start()
    tty = sys.stdout.isatty()
    end = time.monotonic() + args.seconds if args.seconds else None
    last = ""
    try:
        while end is None or time.monotonic() < end:
            fleet.changed.wait(1.0)
            fleet.changed.clear()
            screen = fleet.render()
            if screen != last:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: a live view
                print(screen if tty else screen + "\n", flush=True)
                last = screen
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    return 0
