"""Delivers the store's outbox to the broker: in order, at least once, a window at a time.

A row leaves the outbox only when the broker acknowledged it (QoS 1 PUBACK). On every
connect the publisher starts again from the oldest row: whatever was in flight on the old
connection is sent again, so consumers may see duplicates (they drop them by `seq`) but
never a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from paho.mqtt.enums import MQTTErrorCode

from bin_controller.mqtt.connection import INFLIGHT_WINDOW

log = logging.getLogger(__name__)

# Acks whose mid is not (yet) in flight: mostly QoS 0 state messages, sometimes an outbox
# message acknowledged before publish() returned its mid. Enough to cover that race.
EARLY_ACKS_KEPT = 256


class PublishResult(Protocol):
    @property
    def rc(self) -> int: ...

    @property
    def mid(self) -> int: ...


class PublishClient(Protocol):
    """The part of paho's Client the publisher needs."""

    def publish(self, topic: str, payload: str, qos: int = 0,
                retain: bool = False) -> PublishResult: ...


class OutboxStore(Protocol):
    def outbox_batch(self, after_id: int = 0,
                     limit: int = 100) -> list[tuple[int, str, str, int]]: ...

    def outbox_size(self) -> int: ...

    def acked(self, message_id: int) -> None: ...


class OutboxPublisher:
    """Feed `on_connect`, `on_disconnect` and `on_publish` from the connection; `start()`
    runs the publishing thread (or call `publish_pending()` directly)."""

    def __init__(self, client: PublishClient, store: OutboxStore, base: str, *,
                 window: int = INFLIGHT_WINDOW) -> None:
        self.client = client
        self.store = store
        self.base = base
        self.window = window
        # paho calls on_publish holding its own message lock, so publish() is never called
        # while holding this one (the opposite order would deadlock).
        self._cond = threading.Condition()
        self._online = False
        self._inflight: dict[int, int] = {}  # mid -> outbox id
        self._acked_early: dict[int, None] = {}  # an ordered set, oldest first
        self._cursor = 0  # last outbox id handed to the client since the last connect
        self._generation = 0  # connects so far: a batch from an older one is abandoned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ connection events

    def on_connect(self) -> None:
        with self._cond:
            # Anything in flight on the old connection is sent again from the outbox.
            self._inflight.clear()
            self._acked_early.clear()
            self._cursor = 0
            self._generation += 1
            self._online = True
            self._cond.notify_all()

    def on_disconnect(self) -> None:
        with self._cond:
            self._online = False

    def on_publish(self, mid: int) -> None:
        with self._cond:
            outbox_id = self._inflight.pop(mid, None)
            if outbox_id is None:
                self._acked_early[mid] = None
                while len(self._acked_early) > EARLY_ACKS_KEPT:
                    self._acked_early.pop(next(iter(self._acked_early)))
            self._cond.notify_all()
        if outbox_id is not None:
            self.store.acked(outbox_id)

    # ------------------------------------------------------------------ publishing

    def publish_pending(self) -> int:
        """Hand the client as many outbox rows as the window allows; returns how many."""
        with self._cond:
            room = self.window - len(self._inflight)
            if not self._online or room <= 0:
                return 0
            cursor, generation = self._cursor, self._generation
        sent = 0
        for outbox_id, topic, payload, qos in self.store.outbox_batch(cursor, room):
            info = self.client.publish(f"{self.base}/{topic}", payload, qos=qos)
            with self._cond:
                if generation != self._generation:
                    break  # reconnected meanwhile: on_connect restarted from the outbox
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    # Connection going down; the reconnect sends it again.
                    log.debug("outbox message %d not sent (rc %s)", outbox_id, info.rc)
                    break
                self._cursor = outbox_id
                early = info.mid in self._acked_early
                if early:
                    del self._acked_early[info.mid]
                else:
                    self._inflight[info.mid] = outbox_id
            sent += 1
            if early:
                self.store.acked(outbox_id)
        return sent

    def _ready(self) -> bool:
        return self._stop.is_set() or (
            self._online and len(self._inflight) < self.window
            and bool(self.store.outbox_batch(self._cursor, 1)))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                ready = self._cond.wait_for(self._ready, timeout=1.0)
            if ready and not self._stop.is_set() and self.publish_pending() == 0:
                # There was room and work, yet nothing went out: the client refused (the
                # connection is going down). Do not spin until the disconnect arrives.
                self._stop.wait(0.1)

    def wake(self) -> None:
        """New rows were queued (or state changed): look at the outbox now."""
        with self._cond:
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every event acknowledged by the broker)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.store.outbox_size() == 0:
                return True
            self.wake()
            time.sleep(0.05)
        return self.store.outbox_size() == 0

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
