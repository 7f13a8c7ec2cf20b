"""The last item's picture: `image/meta` then `image` (the thumbnail JPEG), both retained.

The photo log hands each thumbnail over after the photo is written (its `on_photo`); every
connect publishes its newest one again (`last`), so a dashboard that subscribes later, or a
broker that restarted, holds the newest picture. Frigate's users were shown events with the
wrong snapshot; here the seq is in the item's `event`, in `image/meta` and in the JPEG's
comment, and the two messages of a picture always go out together and in that order.

QoS 0 like the rest of the retained state (see retained.py): a picture missed during an
outage is replaced by the newest one on the next connect, never resent stale after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from bin_controller.mqtt.connection import Connection
from bin_controller.payloads import IMAGE, IMAGE_META, image_meta_payload

if TYPE_CHECKING:
    from bin_controller.photolog import Thumbnail


class Pictures:
    def __init__(self, conn: Connection, base: str,
                 last: Callable[[], Thumbnail | None]) -> None:
        self.conn = conn
        self.base = base
        self.last = last
        # The photo writer and paho's thread (a connect) both publish: one pair at a time,
        # so that a meta is never followed by another picture's JPEG.
        self._lock = threading.Lock()

    def on_photo(self, thumbnail: Thumbnail) -> None:
        """From the photo writer's thread, after the photo is on disk."""
        if not self.conn.connected.is_set():
            return  # the next connect publishes the newest picture
        with self._lock:
            self._send(thumbnail)

    def republish(self) -> None:
        """On every connect. `last` is read under the lock: a picture the writer publishes
        meanwhile is newer than it, or the same one, never older."""
        with self._lock:
            thumbnail = self.last()
            if thumbnail is not None:
                self._send(thumbnail)

    def _send(self, thumbnail: Thumbnail) -> None:
        self.conn.publish(f"{self.base}/{IMAGE_META}", image_meta_payload(thumbnail.meta()),
                          retain=True)
        self.conn.publish(f"{self.base}/{IMAGE}", thumbnail.jpeg, retain=True)
