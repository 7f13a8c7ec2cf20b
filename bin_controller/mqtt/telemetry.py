"""MQTT telemetry and commands (paho-mqtt 2.x): the parts, wired together for one bin.

Topics under <prefix>/<bin id>/ are listed in README.md (MQTT) and built in
bin_controller/payloads.py. The parts, each in its own module:

  connection  the paho client; fans connect, disconnect, ack and message callbacks out
  outbox      event messages from the SQLite outbox: in order, at least once
  retained    availability, counts, last item, state, fill, faults, stats, discovery
  pictures    the last item's picture: image/meta and image (with a photo log)
  discovery   Home Assistant entity configs (pure data)
  commands    cmd/<name> in, on threads of their own; reply/<name> out
  owner       a retained claim on the bin id: two bins with one bin.id are a fault

On every (re)connect the outbox starts again from its oldest row, everything retained is
published again and the command subscriptions are made again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt

from bin_controller.config import MqttSection
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.errors import SmartbinError
from bin_controller.mqtt import discovery
from bin_controller.mqtt.commands import Commands, Handler
from bin_controller.mqtt.connection import Connection
from bin_controller.mqtt.outbox import OutboxPublisher
from bin_controller.mqtt.owner import OwnerClaim
from bin_controller.mqtt.pictures import Pictures
from bin_controller.mqtt.retained import RetainedState, Status
from bin_controller.payloads import (
    AVAILABILITY,
    OFFLINE,
    JsonObject,
    command_topic,
    emptied_message,
    fault_message,
    reply_topic,
    to_json,
)
from bin_controller.store import Store

if TYPE_CHECKING:
    from bin_controller.fill import Emptied, FillTracker
    from bin_controller.photolog import PhotoLog, Thumbnail

# How long a stop waits for the photo writer before the last contamination is published.
PHOTO_FLUSH_S = 2.0


class Telemetry:
    def __init__(self, cfg: MqttSection, *, bin_id: str, store: Store,
                 commands: Mapping[str, Handler] | None = None,
                 status: Status | None = None, photos: PhotoLog | None = None,
                 fill: FillTracker | None = None) -> None:
        """`photos`: the bin's photo log, for the pictures, the contamination in `counts`
        and `stats`, and their discovery entities (hand its `on_photo` this `on_photo`).
        `fill`: the bin's fill levels, for the retained `fill` and its entities (hand its
        `on_change` this `on_fill` and its `on_emptied` this `on_emptied`)."""
        if not bin_id or any(ch in bin_id for ch in "/#+ "):
            raise SmartbinError(f"bin.id = {bin_id!r}: must be a single MQTT topic level "
                                "(no '/', '+', '#' or spaces)")
        self.cfg = cfg
        self.bin_id = bin_id
        self.base = f"{cfg.prefix}/{bin_id}"
        self.store = store
        self.photos = photos
        self.fill = fill
        self._conn = Connection(cfg, client_id=f"smartbin-{bin_id}",
                                will=(f"{self.base}/{AVAILABILITY}", OFFLINE))
        self.client: mqtt.Client = self._conn.client
        self.connected = self._conn.connected
        self.subscribed = self._conn.subscribed  # commands can be received
        self._outbox = OutboxPublisher(self.client, store, self.base)
        self._retained = RetainedState(
            self._conn, store, self.base, status=status or dict,
            stats_interval_s=cfg.stats_interval_s,
            discovery=self.discovery_payloads() if cfg.discovery else None,
            reviewed=photos.sitelog if photos is not None else None,
            photo_stats=photos.stats if photos is not None else None,
            fill=fill.snapshot if fill is not None else None)
        self._pictures = Pictures(self._conn, self.base, lambda: photos.last) \
            if photos is not None else None
        self._commands = Commands(commands, reply=self._reply)
        # Work of the bin's that must end before telemetry does (a background teach).
        self.on_stop: list[Callable[[], None]] = []
        self._owner = OwnerClaim(self._conn, self.base, bin_id, on_duplicate=self.report_fault)

        self._conn.on_connect(self._outbox.on_connect)
        self._conn.on_connect(self._retained.republish)
        if self._pictures is not None:
            self._conn.on_connect(self._pictures.republish)
        self._conn.on_connect(self._owner.on_connect)
        self._conn.on_disconnect(self._outbox.on_disconnect)
        self._conn.on_publish(self._outbox.on_publish)
        self._conn.on_message(f"{self.base}/{command_topic('+')}", self._on_command)
        self._conn.on_message_with_retain(self._owner.topic, self._owner.on_message)
        if cfg.discovery:
            self._conn.on_message(discovery.status_topic(cfg), self._on_ha_status)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._conn.start()
        self._outbox.start()
        self._retained.start()
        self._commands.start()

    def stop(self, *, drain_s: float = 0.0) -> None:
        for stop in self.on_stop:
            stop()
        if drain_s and self.connected.is_set():
            self.drain(drain_s)
        if self.photos is not None and self.connected.is_set():
            # The last items reach the site log on the photo writer's thread: the retained
            # contamination left behind counts them too.
            self.photos.flush(PHOTO_FLUSH_S)
            self._retained.poll_reviews()
        self._retained.announce_offline()
        self._commands.stop()
        self._retained.stop()
        self._outbox.stop()
        self._conn.stop()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every event acknowledged by the broker)."""
        return self._outbox.drain(timeout)

    def wake(self) -> None:
        self._outbox.wake()

    # ------------------------------------------------------------------ loop hooks

    def on_event(self, event: SortEvent) -> None:
        self._retained.on_event(event)
        self._outbox.wake()  # its message is in the outbox now

    def on_photo(self, thumbnail: Thumbnail) -> None:
        """The photo log wrote an item's photo (its writer thread): `image/meta`, `image`."""
        if self._pictures is not None:
            self._pictures.on_photo(thumbnail)

    def on_state(self, state: State, detail: str) -> None:
        self._retained.on_state(state, detail)

    def on_fault(self, fault: Fault) -> None:
        """Faults go through the outbox like events, so an operator hears of a jam during
        a broker outage or just before a crash; straight to paho (QoS 1) only when the
        store cannot take it (a full disk)."""
        if self.store.queue(fault_message(fault)):
            self._outbox.wake()
        else:
            self._retained.on_fault(fault, qos=1)
        # The retained state's fault counts and last fault (a fault need not change state).
        self._retained.publish_state()

    def on_fill(self) -> None:
        """A fill level or state changed (the loop, the sensor thread or a command)."""
        self._retained.on_fill()

    def on_emptied(self, emptied: Emptied) -> None:
        """A compartment was emptied: an `emptied` event through the outbox, like a fault."""
        message = emptied_message(emptied)
        if self.store.queue(message):
            self._outbox.wake()
        else:  # a full disk: paho keeps a QoS 1 message for the next connect at least
            self._conn.publish(f"{self.base}/{message.topic}", message.payload,
                               qos=message.qos)

    def report_fault(self, fault: Fault) -> None:
        """A fault of telemetry's own (the loop's come through on_fault)."""
        self.on_fault(fault)

    # ------------------------------------------------------------------ state

    def publish_counts(self) -> None:
        """The counts and the contamination read again (after a reset or a review)."""
        self._retained.publish_counts(refresh=True)

    def publish_discovery(self) -> None:
        self._retained.publish_discovery()

    def publish_state(self) -> None:
        """The retained `state` again with the status now (after a model reload)."""
        self._retained.publish_state()

    def discovery_payloads(self) -> dict[str, JsonObject]:
        """Home Assistant discovery: topic -> config payload."""
        return discovery.discovery_payloads(self.cfg, self.bin_id, self.base,
                                            photos=self.photos is not None,
                                            fill=self.fill is not None)

    def stats(self) -> JsonObject:
        return self._retained.stats()

    # ------------------------------------------------------------------ commands

    def handle_command(self, name: str, payload: bytes) -> JsonObject:
        """Carry out a command now, on the caller's thread; returns the reply."""
        return self._commands.handle(name, payload)

    def _on_command(self, topic: str, payload: bytes) -> None:
        self._commands.submit(topic.rsplit("/", 1)[-1], payload)

    def _reply(self, name: str, reply: JsonObject) -> None:
        self._conn.publish(f"{self.base}/{reply_topic(name)}", to_json(reply))

    def publish_reply(self, suffix: str, payload: bytes) -> str:
        """Bytes a command answers with beside its JSON reply (a photo), not retained;
        the full topic, for the JSON reply to name."""
        topic = f"{self.base}/{suffix}"
        self._conn.publish(topic, payload)
        return topic

    def _on_ha_status(self, topic: str, payload: bytes) -> None:
        if payload == b"online":  # Home Assistant restarted and forgot us
            self._retained.publish_discovery()
