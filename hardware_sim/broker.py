"""A real mosquitto broker on a free loopback port, for the benchmarks that need one.

`smartbin bench soak` starts it, stops it for a few seconds while items are sorted (the
bin's events wait in its outbox) and starts it again on the same port. Persistence keeps a
subscriber's session, and the QoS 1 messages queued for it, across those restarts.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from bin_controller.errors import SmartbinError
from hardware_sim.children import die_with_parent

START_TIMEOUT_S = 10.0  # mosquitto listens within milliseconds; a loaded machine is slower


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise SmartbinError("mosquitto is not installed: sudo apt-get install mosquitto "
                            "(./dev test installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """mosquitto listening on 127.0.0.1:`port`, its files (config, persistence, log) in
    `folder`."""

    def __init__(self, folder: Path, port: int | None = None, *,
                 own_session: bool = False) -> None:
        self.folder = Path(folder)
        # own_session: out of the terminal's process group, so that a Ctrl-C reaches only
        # the program that started it, which stops the broker last (`smartbin demo`); and
        # it goes when that program dies.
        self.own_session = own_session
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.folder / "mosquitto.conf"
        # mosquitto started as root switches to the user named here: keep it ours so that
        # it can write its database into our folder. max_queued_messages 0 (no limit): after
        # an outage the bin sends its whole outbox at once, more than the default 1,000 a
        # subscriber may have queued, and the benchmark counts every message.
        self.conf.write_text(f"user {getpass.getuser()}\n"
                             f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {self.folder}/\n"
                             "max_queued_messages 0\nlog_dest stderr\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.folder / "broker.log", "ab") as log_file:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                         stdout=subprocess.DEVNULL, stderr=log_file,
                                         start_new_session=self.own_session,
                                         preexec_fn=die_with_parent if self.own_session
                                         else None)
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SmartbinError(f"mosquitto did not start on port {self.port}; see "
                            f"{self.folder / 'broker.log'}")

    def stop(self) -> None:
        """A clean stop (SIGTERM): mosquitto saves its sessions and queued messages."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
