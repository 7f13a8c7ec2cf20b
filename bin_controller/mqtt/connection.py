"""The broker connection: one paho client (callback API 2), and who hears about it.

The other parts never set paho callbacks themselves; they register here, so one connect
can reset the outbox, republish retained state and resubscribe in a known order.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bin_controller.config import MqttSection
from bin_controller.errors import SmartbinError

log = logging.getLogger(__name__)

# Messages paho keeps unacknowledged at once; the outbox publisher uses the same window so
# paho never has to queue behind it.
INFLIGHT_WINDOW = 20
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30

MessageHandler = Callable[[str, bytes], None]


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
    """HOST or HOST:PORT; a bare IPv6 address (several colons) is a host."""
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not port:
        return text, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SmartbinError(f"--mqtt {text}: the port must be a number from 1 to 65535")
    return host, int(port)


def make_client(cfg: MqttSection, *, client_id: str,
                will: tuple[str, str] | None = None) -> mqtt.Client:
    """A configured, unconnected client: identity, last will, credentials, TLS, pacing."""
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=client_id, protocol=mqtt.MQTTv311)
    if will is not None:
        c.will_set(will[0], will[1], qos=1, retain=True)
    if cfg.username:
        c.username_pw_set(cfg.username, read_password(cfg))
    if cfg.tls:
        try:
            c.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                      keyfile=cfg.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError) as exc:
            raise SmartbinError(f"mqtt TLS files: {exc}") from exc
    c.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
    c.max_inflight_messages_set(INFLIGHT_WINDOW)
    return c


class Connection:
    """Owns the client and its network thread; fans paho's callbacks out to the parts.

    Every callback runs on paho's network thread: registered hooks must not block.
    """

    def __init__(self, cfg: MqttSection, *, client_id: str,
                 will: tuple[str, str] | None = None) -> None:
        self.cfg = cfg
        self.client = make_client(cfg, client_id=client_id, will=will)
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # every registered filter is active
        self._connect_hooks: list[Callable[[], None]] = []
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._publish_hooks: list[Callable[[int], None]] = []
        self._routes: list[tuple[str, int, MessageHandler]] = []
        self._stopping = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # ------------------------------------------------------------------ registration
    # Register before start(): the lists are read from paho's thread without a lock.

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Called after every successful (re)connect, in registration order."""
        self._connect_hooks.append(hook)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        self._disconnect_hooks.append(hook)

    def on_publish(self, hook: Callable[[int], None]) -> None:
        """Called with the mid of each message the broker acknowledged (or paho sent, QoS 0)."""
        self._publish_hooks.append(hook)

    def on_message(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Subscribe to `topic_filter` on every connect; `handler(topic, payload)`."""
        self._routes.append((topic_filter, qos, handler))

    # ------------------------------------------------------------------ use

    def publish(self, topic: str, payload: str, *, qos: int = 0,
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def start(self) -> None:
        self._stopping = False
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection: %s", reason_code)
            return
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        self.connected.set()
        if self._routes:
            # A clean session forgets subscriptions: they are made again on every connect.
            client.subscribe([(topic, qos) for topic, qos, _ in self._routes])
        for hook in self._connect_hooks:
            hook()

    def _on_disconnect(self, client: mqtt.Client, userdata: object,
                       flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping:
            log.warning("MQTT disconnected (%s); events wait in the outbox", reason_code)
        for hook in self._disconnect_hooks:
            hook()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.warning("MQTT broker refused a subscription (%s); commands may not arrive",
                        ", ".join(refused))
            return
        self.subscribed.set()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: Properties) -> None:
        for hook in self._publish_hooks:
            hook(mid)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        for topic_filter, _, handler in self._routes:
            if mqtt.topic_matches_sub(topic_filter, message.topic):
                handler(message.topic, bytes(message.payload))
