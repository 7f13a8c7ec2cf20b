"""The dashboard's MQTT client: every message under `<prefix>/+/#` in, commands out.

paho runs its own network thread; each message is handed to the asyncio loop with
call_soon_threadsafe, so everything else in the dashboard runs on that one loop. A command
goes to `<prefix>/<bin>/cmd/<name>` with an `id` of our own, and the reply with that `id`
on `reply/<name>` resolves it; `review_photo` also brings its JPEG on
`reply/review_photo/<seq>`, just before its reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from bin_controller.errors import SmartbinError
from bin_controller.mqtt.commands import TIME_LIMIT_S, TIME_LIMITS_S
from bin_controller.mqtt.connection import Connection
from bin_controller.payloads import COMMAND, REPLY, REVIEW_PHOTO, JsonObject, parse_json

log = logging.getLogger(__name__)

# A little longer than the bin's own limit: a command that ran out of time there is
# answered "busy" by the bin, which is the clearer reply.
REPLY_MARGIN_S = 2.0
PHOTO_WAIT_S = 5.0  # for the JPEG after its reply, should the broker reorder them


class BridgeError(SmartbinError):
    """A command that got no reply: not connected, or none in time."""


def reply_timeout(name: str) -> float:
    return TIME_LIMITS_S.get(name, TIME_LIMIT_S) + REPLY_MARGIN_S


class Bridge:
    def __init__(self, connection: Connection, prefix: str, *,
                 on_message: Callable[[str, bytes], None],
                 timeout: Callable[[str], float] = reply_timeout) -> None:
        self.connection = connection
        self.prefix = prefix
        self.on_message = on_message
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, tuple[str, str, asyncio.Future[JsonObject]]] = {}
        self._photos: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        connection.on_message_with_retain(f"{prefix}/+/#", self._from_paho, qos=1)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connection.start()

    def stop(self) -> None:
        self.connection.stop()
        for _, _, future in self._pending.values():
            if not future.done():
                future.set_exception(BridgeError("the dashboard is stopping"))

    @property
    def connected(self) -> bool:
        return self.connection.connected.is_set()

    # ------------------------------------------------------------------ messages in

    def _from_paho(self, topic: str, payload: bytes, retained: bool) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._take, topic, payload)

    def _take(self, topic: str, payload: bytes) -> None:
        try:
            parts = topic.split("/")
            if len(parts) >= 4 and parts[2] == REPLY:
                self._reply(parts[1], parts[3:], payload)
                return
            if len(parts) >= 3 and parts[2] == COMMAND:
                return  # our own commands (or another dashboard's)
            self.on_message(topic, payload)
        except Exception:  # a message never stops the dashboard; a bug here is still logged
            log.exception("dashboard: message on %r ignored", topic)

    def _reply(self, bin_id: str, rest: list[str], payload: bytes) -> None:
        if len(rest) == 2 and rest[0] == REVIEW_PHOTO:
            seq = int(rest[1]) if rest[1].isascii() and rest[1].isdigit() \
                and len(rest[1]) < 16 else None
            photo = self._photos.get((bin_id, seq)) if seq is not None else None
            if photo is not None and not photo.done():
                photo.set_result(payload)
            return
        if len(rest) != 1:
            return
        try:
            data = parse_json(payload, what="reply")
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        request = data.get("id")
        pending = self._pending.get(request) if isinstance(request, str) else None
        if pending is None or pending[:2] != (bin_id, rest[0]):
            return  # someone else's, or one we stopped waiting for
        if not pending[2].done():
            pending[2].set_result(data)

    # ------------------------------------------------------------------ commands out

    async def request(self, bin_id: str, name: str, args: JsonObject) -> JsonObject:
        """Send `cmd/<name>` to one bin and wait for its reply (`{"ok": ...}`)."""
        if not self.connected:
            raise BridgeError("the dashboard is not connected to the MQTT broker")
        loop = asyncio.get_running_loop()
        request = secrets.token_hex(8)
        future: asyncio.Future[JsonObject] = loop.create_future()
        self._pending[request] = (bin_id, name, future)
        try:
            payload = json.dumps({**args, "id": request}, ensure_ascii=False)
            self.connection.publish(f"{self.prefix}/{bin_id}/{COMMAND}/{name}", payload, qos=1)
            limit = self.timeout(name)
            try:
                return await asyncio.wait_for(future, limit)
            except TimeoutError:
                raise BridgeError(f"no reply from bin {bin_id!r} to {name} within "
                                  f"{limit:.0f} s (is it online?)") from None
        finally:
            self._pending.pop(request, None)

    async def photo(self, bin_id: str, seq: int) -> tuple[JsonObject, bytes | None]:
        """An item's full photo from the bin (`review_photo`): the reply, and the JPEG when
        the reply is ok."""
        loop = asyncio.get_running_loop()
        key = (bin_id, seq)
        future = self._photos.get(key)
        if future is None or future.done():
            future = self._photos[key] = loop.create_future()
        try:
            reply = await self.request(bin_id, REVIEW_PHOTO, {"seq": seq})
            if reply.get("ok") is not True:
                return reply, None
            try:
                return reply, await asyncio.wait_for(asyncio.shield(future), PHOTO_WAIT_S)
            except TimeoutError:
                raise BridgeError(f"bin {bin_id!r} said it sent photo {seq}, but it did not "
                                  "arrive") from None
        finally:
            if self._photos.get(key) is future:
                del self._photos[key]


def describe(reply: dict[str, Any]) -> str:
    """A reply as one line for a log."""
    return "ok" if reply.get("ok") is True else f"error: {reply.get('error')}"
