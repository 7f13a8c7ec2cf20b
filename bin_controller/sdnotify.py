"""The sd_notify protocol: datagrams to $NOTIFY_SOCKET (READY, STATUS, WATCHDOG, STOPPING).

Written out rather than imported: it is a dozen lines and the bin should not need libsystemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if enabled else 0.0

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, **fields: str | int) -> None:
        if self.sock is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with contextlib.suppress(OSError):  # systemd went away: nothing to tell
            self.sock.sendto(message, self.address)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING=1, STATUS=status)

    def start_watchdog(self, healthy: Callable[[float], bool]) -> threading.Event:
        """Ping at half the watchdog interval while healthy(max_age_s) says so.

        The sorting loop itself proves it is alive (its heartbeat); a hung camera call
        stops the pings and systemd restarts the service.
        """
        stop = threading.Event()
        if not self.watchdog_s or self.sock is None:
            return stop
        interval = self.watchdog_s / 2

        def run() -> None:
            while not stop.wait(interval):
                if healthy(interval):
                    self.send(WATCHDOG=1)

        threading.Thread(target=run, name="sd-watchdog", daemon=True).start()
        return stop


def heartbeat_fresh(heartbeat: Callable[[], float]) -> Callable[[float], bool]:
    return lambda max_age: time.monotonic() - heartbeat() <= max_age
