"""The broker connection: one paho client (callback API 2), and who hears about it.

The other parts never set paho callbacks themselves; they register here, so one connect
can reset the outbox, republish retained state and resubscribe in a known order.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bin_controller.config import MqttSection
from bin_controller.errors import ConfigError, SmartbinError

log = logging.getLogger(__name__)

# Messages paho keeps unacknowledged at once; the outbox publisher uses the same window so
# paho never has to queue behind it.
INFLIGHT_WINDOW = 20
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30

# Disconnects per minute logged as warnings; more mean a flapping link (or two bins with
# one bin.id), explained once.
DROPS_LOGGED_PER_MINUTE = 3

MessageHandler = Callable[[str, bytes], None]
RetainHandler = Callable[[str, bytes, bool], None]


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


def parse_host(text: str, *, option: str = "--mqtt") -> tuple[str, int | None]:
    """HOST, HOST:PORT, an IPv6 address (bare, or in brackets to add a port: [::1]:1883).

    A mistake is one line naming `option`: an empty host, a port that is not a number from
    1 to 65535, a URL (mqtt://...) or spaces.
    """
    usage = "give HOST or HOST:PORT (an IPv6 address as [ADDRESS]:PORT)"
    if "://" in text:
        raise ConfigError(f"{option} {text!r}: a host, not a URL: {usage}, without mqtt://")
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"{option} {text!r}: unclosed or misplaced ']': {usage}")
        host, port = address, rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, None  # a name, or a bare IPv6 address (several colons)
    if not host:
        raise ConfigError(f"{option} {text!r}: the host is empty: {usage}")
    if any(ch.isspace() or not ch.isprintable() or ch in "/[]" for ch in host):
        raise ConfigError(f"{option} {text!r}: {host!r} is not a host name or address: "
                          f"{usage}")
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        raise ConfigError(f"{option} {text!r}: the port must be a number from 1 to 65535")
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

    Every callback runs on paho's network thread: registered hooks must not block. A hook
    that raises is logged and skipped: paho would otherwise end its network thread.

    Logging while the broker is away: one warning when the first attempt fails or the
    connection drops (with the reason), one when it is back ("connected after N s");
    the retries in between only at debug level.
    """

    def __init__(self, cfg: MqttSection, *, client_id: str,
                 will: tuple[str, str] | None = None,
                 offline_note: str = "events wait in the outbox") -> None:
        self.cfg = cfg
        self.offline_note = offline_note  # what the warnings tell of the time offline
        self.client_id = client_id
        self.client = make_client(cfg, client_id=client_id, will=will)
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # every registered filter is active
        self._connect_hooks: list[Callable[[], None]] = []
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._publish_hooks: list[Callable[[int], None]] = []
        self._routes: list[tuple[str, int, RetainHandler]] = []
        self._stopping = False
        self._down_since: float | None = None  # not connected since (monotonic)
        self._warned = False  # the current outage has been logged as a warning
        self._connected_at = 0.0
        self._drops: deque[float] = deque(maxlen=DROPS_LOGGED_PER_MINUTE + 1)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
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
        self._routes.append((topic_filter, qos, lambda topic, payload, _: handler(topic,
                                                                                  payload)))

    def on_message_with_retain(self, topic_filter: str, handler: RetainHandler, *,
                               qos: int = 1) -> None:
        """Like on_message; `handler(topic, payload, retained)` also learns whether the
        broker sent a retained message (on subscribing) or a live one."""
        self._routes.append((topic_filter, qos, handler))

    # ------------------------------------------------------------------ use

    def publish(self, topic: str, payload: str | bytes, *, qos: int = 0,
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Text (JSON, UTF-8) or bytes as they are (a JPEG)."""
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def start(self) -> None:
        if not self.cfg.host:
            raise ConfigError("mqtt.host is empty: set the broker's host name or address "
                              "(or use --mqtt HOST[:PORT])")
        self._stopping = False
        self._down_since, self._warned = time.monotonic(), False
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    # ------------------------------------------------------------------ outages

    def _unreachable(self, reason: str) -> None:
        if self._warned:
            log.debug("MQTT broker %s still unreachable: %s", self.where(), reason)
            return
        self._warned = True
        log.warning("MQTT broker %s unreachable (%s); retrying every %d s at most, %s",
                    self.where(), reason, RECONNECT_MAX_S, self.offline_note)

    def _dropped(self, reason: ReasonCode) -> None:
        now = time.monotonic()
        self._down_since = now
        self._drops.append(now)
        recent = [t for t in self._drops if now - t < 60]
        if len(recent) > DROPS_LOGGED_PER_MINUTE:
            log.debug("MQTT disconnected again (%s)", reason)  # already explained
            return
        self._warned = True
        hint = ""
        if len(recent) >= 2 and now - self._connected_at < 60:
            # The broker drops the older of two clients with one id, without a reason in
            # MQTT 3.1.1: two bins with the same bin.id keep doing this to each other.
            hint = (f"; dropped {len(recent)} times within a minute: if another client "
                    f"uses the client id {self.client_id} (a bin with the same bin.id), "
                    "the broker drops one of the two on every connect")
        log.warning("MQTT disconnected (%s); %s%s", reason, self.offline_note, hint)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this inside its `except OSError:` block and does not pass the error:
        # the exception being handled is it.
        error = sys.exc_info()[1]
        reason = (getattr(error, "strerror", None) or str(error)) if error else "unknown"
        self._unreachable(reason)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._unreachable(f"the broker refused the connection: {reason_code}")
            return
        now = time.monotonic()
        if self._warned and self._down_since is not None:
            log.warning("MQTT connected to %s after %.0f s", self.where(),
                        now - self._down_since)
        else:
            log.info("MQTT connected to %s", self.where())
        self._down_since, self._warned, self._connected_at = None, False, now
        self.connected.set()
        if self._routes:
            # A clean session forgets subscriptions: they are made again on every connect.
            client.subscribe([(topic, qos) for topic, qos, _ in self._routes])
        for hook in self._connect_hooks:
            _call(hook, "connect")

    def _on_disconnect(self, client: mqtt.Client, userdata: object,
                       flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if was_connected and not self._stopping:
            self._dropped(reason_code)
        for hook in self._disconnect_hooks:
            _call(hook, "disconnect")

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
            _call(hook, "publish", mid)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.debug("MQTT message with a topic that is not UTF-8 ignored")
            return
        for topic_filter, _, handler in self._routes:
            if mqtt.topic_matches_sub(topic_filter, topic):
                _call(handler, f"message on {topic}", topic, bytes(message.payload),
                      bool(message.retain))


def _call(hook: Callable[..., None], what: str, *args: object) -> None:
    """Run a hook on paho's thread: an exception is logged, never raised into paho."""
    try:
        hook(*args)
    except Exception:
        log.exception("MQTT %s hook failed", what)
