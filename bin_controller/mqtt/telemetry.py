"""MQTT telemetry and commands (paho-mqtt 2.x, callback API version 2).

Topics under <prefix>/<bin id>/:
  availability   online/offline, retained, also the last will
  counts         retained JSON of every bin and total; counts/<bin> retained integers
  event          QoS 1, one JSON per item with its sequence number (from the outbox)
  last           retained JSON of the last item
  state          retained JSON of the loop state
  stats          periodic JSON
  cmd/<name>     commands in (JSON); replies on reply/<name>

Event messages go through the SQLite outbox, so they survive broker outages and restarts
and are delivered in order, at least once (consumers drop duplicates by `seq`). On every
(re)connect everything retained is published again and commands are resubscribed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from bin_controller import __version__
from bin_controller.bins import BINS
from bin_controller.config import MqttSection
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.errors import SmartbinError
from bin_controller.store import Store

log = logging.getLogger(__name__)
INFLIGHT_WINDOW = 20


def read_password(cfg: MqttSection) -> str | None:
    """From password_file, else the systemd credential; never logged."""
    if cfg.password_file:
        path = Path(cfg.password_file)
    elif os.environ.get("CREDENTIALS_DIRECTORY"):
        path = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "mqtt_password"
        if not path.is_file():
            return None
    else:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise SmartbinError(f"mqtt.password_file: cannot read {path}: {exc.strerror}") from exc


def parse_host(text: str) -> tuple[str, int | None]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not port:
        return text, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SmartbinError(f"--mqtt {text}: the port must be a number from 1 to 65535")
    return host, int(port)


class Telemetry:
    def __init__(self, cfg: MqttSection, *, bin_id: str, store: Store,
                 commands: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        if not bin_id or any(ch in bin_id for ch in "/#+ "):
            raise SmartbinError(f"bin.id = {bin_id!r}: must be a single MQTT topic level "
                                "(no '/', '+', '#' or spaces)")
        self.cfg = cfg
        self.bin_id = bin_id
        self.base = f"{cfg.prefix}/{bin_id}"
        self.store = store
        self.commands = commands
        self.status = status or (lambda: {})
        self.state: dict[str, Any] = {"state": State.IDLE.value, "detail": ""}
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # commands can be received
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._inflight: dict[int, int] = {}  # mid -> outbox id
        self._acked_early: dict[int, None] = {}
        self._cursor = 0  # last outbox id handed to paho since the last connect
        self._generation = 0
        self._recent: deque[SortEvent] = deque(maxlen=200)
        self._started = time.time()
        self._threads: list[threading.Thread] = []
        self._cmd_queue: deque[tuple[str, bytes]] = deque()
        self.client = self._make_client()

    # ------------------------------------------------------------------ connection

    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=f"smartbin-{self.bin_id}", protocol=mqtt.MQTTv311)
        c.will_set(f"{self.base}/availability", "offline", qos=1, retain=True)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, read_password(self.cfg))
        if self.cfg.tls:
            try:
                c.tls_set(ca_certs=self.cfg.ca_file or None,
                          certfile=self.cfg.cert_file or None,
                          keyfile=self.cfg.key_file or None,
                          cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:
                raise SmartbinError(f"mqtt TLS files: {exc}") from exc
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_inflight_messages_set(INFLIGHT_WINDOW)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = lambda *_: self.subscribed.set()
        return c

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        for target, name in ((self._publisher, "mqtt-outbox"), (self._stats_loop, "mqtt-stats"),
                             (self._command_loop, "mqtt-commands")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection: %s", reason_code)
            return
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        with self._wake:
            # Anything in flight on the old connection is sent again from the outbox.
            self._inflight.clear()
            self._acked_early.clear()
            self._cursor = 0
            self._generation += 1
            self.connected.set()
            self._wake.notify_all()
        client.subscribe([(f"{self.base}/cmd/+", 1),
                          (f"{self.cfg.discovery_prefix}/status", 1)])
        self._publish_retained()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); events wait in the outbox", reason_code)

    def _publish(self, topic: str, payload: Any, *, retain: bool = False, qos: int = 0) -> None:
        # Retained state goes at QoS 0 on purpose: paho re-sends unacknowledged QoS 1
        # messages after a reconnect, and a stale count arriving after a fresh one would
        # become the retained value. Every connect republishes all state anyway.
        if not isinstance(payload, str | bytes):
            payload = json.dumps(payload, ensure_ascii=False)
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def _publish_retained(self) -> None:
        self._publish(f"{self.base}/availability", "online", retain=True, qos=1)
        self._publish(f"{self.base}/state", self.state, retain=True)
        self.publish_counts()
        last = self.store.last_event()
        if last:
            self._publish(f"{self.base}/last", _last(last), retain=True)
        if self.cfg.discovery:
            self.publish_discovery()

    def publish_counts(self) -> None:
        snapshot = self.store.snapshot()
        self._publish(f"{self.base}/counts", snapshot, retain=True)
        for b in BINS:
            self._publish(f"{self.base}/counts/{b}", str(snapshot[b]), retain=True)

    # ------------------------------------------------------------------ outbox

    def _publisher(self) -> None:
        # paho calls on_publish holding its own message lock, so publish() is never called
        # while holding self._wake (that order would deadlock).
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._stop.is_set() or (
                    self.connected.is_set() and len(self._inflight) < INFLIGHT_WINDOW
                    and self._has_more()), timeout=1.0)
                if self._stop.is_set() or not self.connected.is_set():
                    continue
                room = INFLIGHT_WINDOW - len(self._inflight)
                cursor, generation = self._cursor, self._generation
            for outbox_id, topic, payload, qos in self.store.outbox_batch(cursor, room):
                info = self.client.publish(f"{self.base}/{topic}", payload, qos=qos)
                with self._wake:
                    if generation != self._generation or info.rc != mqtt.MQTT_ERR_SUCCESS:
                        break  # reconnected meanwhile: start again from the outbox
                    self._cursor = outbox_id
                    if info.mid in self._acked_early:
                        self._acked_early.pop(info.mid)
                        self.store.acked(outbox_id)
                    else:
                        self._inflight[info.mid] = outbox_id

    def _has_more(self) -> bool:
        return bool(self.store.outbox_batch(self._cursor, 1))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._wake:
            outbox_id = self._inflight.pop(mid, None)
            if outbox_id is not None:
                self.store.acked(outbox_id)
            else:
                # Either a retained/state message, or an outbox message whose ack beat
                # publish() returning its mid. Keep a few, oldest out first.
                self._acked_early[mid] = None
                while len(self._acked_early) > 256:
                    self._acked_early.pop(next(iter(self._acked_early)))
            self._wake.notify_all()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every event acknowledged by the broker)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.store.outbox_size() == 0:
                return True
            self.wake()
            time.sleep(0.05)
        return self.store.outbox_size() == 0

    # ------------------------------------------------------------------ loop hooks

    def on_event(self, event: SortEvent) -> None:
        self._recent.append(event)
        if self.connected.is_set():
            self.publish_counts()
            self._publish(f"{self.base}/last", _last(event), retain=True)
        self.wake()

    def on_state(self, state: State, detail: str) -> None:
        self.state = {"state": state.value, "detail": detail, **self.status()}
        if self.connected.is_set():
            self._publish(f"{self.base}/state", self.state, retain=True)

    def on_fault(self, fault: Fault) -> None:
        if self.connected.is_set():
            self._publish(f"{self.base}/fault", {"kind": fault.kind, "detail": fault.detail,
                                                  "time": fault.time})

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        recent = list(self._recent)
        now = time.time()
        cycles = [e.cycle_ms for e in recent if e.cycle_ms]
        hour = [e for e in recent if now - e.time <= 3600]
        out: dict[str, Any] = {
            "uptime_s": round(now - self._started, 1),
            "cycle_ms_p50": round(float(np.percentile(cycles, 50)), 1) if cycles else None,
            "cycle_ms_p95": round(float(np.percentile(cycles, 95)), 1) if cycles else None,
            "items_per_hour": len(hour),
            "outbox": self.store.outbox_size(),
            "version": __version__,
            **self.status(),
        }
        temp = cpu_temperature()
        if temp is not None:
            out["cpu_temperature_c"] = temp
        return out

    def _stats_loop(self) -> None:
        while not self._stop.wait(self.cfg.stats_interval_s):
            if self.connected.is_set():
                self._publish(f"{self.base}/stats", self.stats(), qos=0)

    # ------------------------------------------------------------------ commands

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == f"{self.cfg.discovery_prefix}/status":
            if message.payload == b"online" and self.cfg.discovery:
                self.publish_discovery()  # Home Assistant restarted and forgot us
            return
        name = message.topic.rsplit("/", 1)[-1]
        # Commands may move the flap for a second; never block paho's network thread.
        with self._wake:
            self._cmd_queue.append((name, message.payload))
            self._wake.notify_all()

    def _command_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._stop.is_set() or bool(self._cmd_queue),
                                    timeout=1.0)
                if not self._cmd_queue:
                    continue
                name, payload = self._cmd_queue.popleft()
            reply = self.handle_command(name, payload)
            self._publish(f"{self.base}/reply/{name}", reply)

    def handle_command(self, name: str, payload: bytes) -> dict[str, Any]:
        try:
            text = payload.decode("utf-8").strip() if payload else ""
            args = json.loads(text) if text else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "command": name, "error": f"payload is not JSON: {exc}"}
        if not isinstance(args, dict):
            return {"ok": False, "command": name, "error": "payload must be a JSON object"}
        request_id = args.pop("id", None)
        reply: dict[str, Any]
        if self.commands is None:
            reply = {"ok": False, "error": "commands are not available"}
        else:
            try:
                reply = {"ok": True, **self.commands(name, args)}
            except (ValueError, KeyError, TypeError, RuntimeError, SmartbinError) as exc:
                reply = {"ok": False, "error": str(exc).strip("'\"")}
        reply["command"] = name
        if request_id is not None:
            reply["id"] = request_id
        return reply

    # ------------------------------------------------------------------ discovery

    def discovery_payloads(self) -> dict[str, dict[str, Any]]:
        """Home Assistant discovery: topic -> config payload."""
        node = f"smartbin_{self.bin_id}".replace("-", "_")
        device = {"identifiers": [node], "name": f"Smart bin {self.bin_id}",
                  "manufacturer": "smartbin", "model": "four-compartment sorting bin",
                  "sw_version": __version__}
        avail = {"availability_topic": f"{self.base}/availability",
                 "payload_available": "online", "payload_not_available": "offline"}
        sensors: dict[str, dict[str, Any]] = {}
        for b in BINS:
            sensors[f"count_{b}"] = {
                "name": f"{b.capitalize()} items", "state_topic": f"{self.base}/counts/{b}",
                "state_class": "total_increasing", "unit_of_measurement": "items",
                "icon": "mdi:delete-variant"}
        sensors["count_total"] = {
            "name": "Items sorted", "state_topic": f"{self.base}/counts",
            "value_template": "{{ value_json.total }}", "state_class": "total_increasing",
            "unit_of_measurement": "items", "icon": "mdi:delete"}
        sensors["last_item"] = {
            "name": "Last item", "state_topic": f"{self.base}/last",
            "value_template": "{{ value_json.label_en or value_json.label or 'unknown' }}",
            "json_attributes_topic": f"{self.base}/last", "icon": "mdi:recycle"}
        sensors["last_bin"] = {
            "name": "Last bin", "state_topic": f"{self.base}/last",
            "value_template": "{{ value_json.bin }}", "icon": "mdi:tray-arrow-down"}
        sensors["state"] = {
            "name": "State", "state_topic": f"{self.base}/state",
            "value_template": "{{ value_json.state }}",
            "json_attributes_topic": f"{self.base}/state", "icon": "mdi:state-machine"}
        out = {}
        for key, conf in sensors.items():
            topic = f"{self.cfg.discovery_prefix}/sensor/{node}/{key}/config"
            out[topic] = {**conf, "unique_id": f"{node}_{key}", "object_id": f"{node}_{key}",
                          "device": device, **avail}
        status = f"{self.cfg.discovery_prefix}/binary_sensor/{node}/online/config"
        out[status] = {"name": "Online", "state_topic": f"{self.base}/availability",
                       "payload_on": "online", "payload_off": "offline",
                       "device_class": "connectivity", "unique_id": f"{node}_online",
                       "object_id": f"{node}_online", "device": device}
        return out

    def publish_discovery(self) -> None:
        for topic, payload in self.discovery_payloads().items():
            self._publish(topic, payload, retain=True)

    # ------------------------------------------------------------------ stop

    def stop(self, *, drain_s: float = 0.0) -> None:
        if drain_s and self.connected.is_set():
            self.drain(drain_s)
        if self.connected.is_set():
            info = self.client.publish(f"{self.base}/availability", "offline", qos=1,
                                       retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=3)
        self._stop.set()
        self.wake()
        self.client.disconnect()
        self.client.loop_stop()
        for t in self._threads:
            t.join(timeout=3)


def _last(event: SortEvent) -> dict[str, Any]:
    return {"seq": event.seq, "time": event.time, "label": event.label,
            "label_en": event.label_en, "bin": event.bin, "confidence": event.confidence,
            "uncertain": event.uncertain, "failed": event.failed}


def cpu_temperature() -> float | None:
    try:
        raw = Path("/sys/class/thermal/thermal_zone0/temp").read_text()
        return round(int(raw.strip()) / 1000, 1)
    except (OSError, ValueError):
        return None
