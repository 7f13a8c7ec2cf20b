"""`smartbin monitor`: a live terminal view of one bin or a whole fleet, over MQTT."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bin_controller.bins import BINS
from bin_controller.errors import SmartbinError
from bin_controller.mqtt.connection import parse_host


@dataclass
class BinView:
    availability: str = "?"
    counts: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))
    stats: dict[str, Any] = field(default_factory=dict)


class Fleet:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.bins: dict[str, BinView] = {}
        self.lock = threading.Lock()
        self.changed = threading.Event()

    def on_message(self, client: mqtt.Client, userdata: object,
                   msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 3 or parts[0] != self.prefix:
            return
        bin_id, kind = parts[1], "/".join(parts[2:])
        try:
            payload = msg.payload.decode()
            data = json.loads(payload) if kind in ("counts", "state", "event", "stats") else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return  # not ours to judge; a monitor never crashes on a bad message
        with self.lock:
            view = self.bins.setdefault(bin_id, BinView())
            if kind == "availability":
                view.availability = payload
            elif kind == "counts" and isinstance(data, dict):
                view.counts = data
            elif kind == "state" and isinstance(data, dict):
                view.state = data
            elif kind == "event" and isinstance(data, dict):
                if not any(e.get("seq") == data.get("seq") for e in view.events):
                    view.events.append(data)
            elif kind == "stats" and isinstance(data, dict):
                view.stats = data
        self.changed.set()

    def render(self) -> str:
        with self.lock:
            bins = dict(sorted(self.bins.items()))
        if not bins:
            return "waiting for bins..."
        head = f"{'bin':16} {'online':8} {'state':12} " + " ".join(f"{b:>10}" for b in BINS) \
            + f" {'total':>7}"
        lines = [head, "-" * len(head)]
        for bin_id, v in bins.items():
            counts = " ".join(f"{v.counts.get(b, '-'):>10}" for b in BINS)
            lines.append(f"{bin_id[:16]:16} {v.availability:8} "
                         f"{str(v.state.get('state', '?'))[:12]:12} {counts} "
                         f"{v.counts.get('total', '-'):>7}")
        lines.append("")
        lines.append("recent items")
        for bin_id, v in bins.items():
            for e in list(v.events)[-5:]:
                when = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
                what = e.get("label_en") or e.get("label") or e.get("error") or "?"
                conf = e.get("bin_confidence") or e.get("confidence")
                flag = " uncertain" if e.get("uncertain") else (" failed" if e.get("failed")
                                                                 else "")
                lines.append(f"  {when} {bin_id[:16]:16} #{e.get('seq', '?'):<6} "
                             f"{str(what)[:24]:24} -> {e.get('bin', '?')}"
                             + (f" {conf:.0%}" if isinstance(conf, int | float) else "") + flag)
        return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    host, port = parse_host(args.host)
    fleet = Fleet(args.prefix)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    topic = f"{args.prefix}/{args.bin_id}/#"
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_message = fleet.on_message
    try:
        client.connect(host, port or args.port, keepalive=30)
    except OSError as exc:
        raise SmartbinError(f"cannot reach the broker at {host}:{port or args.port}: "
                            f"{exc.strerror or exc}") from exc
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
