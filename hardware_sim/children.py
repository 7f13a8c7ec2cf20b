"""The processes `smartbin demo` and `smartbin bench dashboard` run: simulated bins
(`smartbin run --simulate`) and the dashboard, each with its log in a file, stopped in order.

Every child gets its own session, so a Ctrl-C in the terminal reaches only the parent, which
then stops them in the right order (bins first: each finishes its item and says `offline`),
and a parent-death signal, so that a parent killed outright takes no child with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bin_controller.errors import SmartbinError

# The dashboard's first stdout line, the contract between it and the tools that start it.
LISTENING = re.compile(r"smartbin dashboard listening on (http://\S+/)")
DASHBOARD_START_S = 60.0  # a cold start imports aiohttp and opens its history database
STOP_S = 20.0  # a bin finishes the item on its flap first (the unit's TimeoutStopSec)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT (Ctrl-C) or SIGTERM: the demo and the bench then stop their
    children in order instead of dying with them half started."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    return stop


def smartbin_argv(*args: str) -> list[str]:
    """`smartbin ARGS` with this interpreter, so it works from a venv and from a checkout."""
    return [sys.executable, "-m", "bin_controller", *args]


class Child:
    """One child process; stderr (and stdout unless read) go to `log`."""

    def __init__(self, name: str, argv: list[str], log: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 read_stdout: bool = False) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if read_stdout else log_file, stderr=log_file,
                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                preexec_fn=die_with_parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        if read_stdout:
            assert self.proc.stdout is not None
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True,
                             name=f"{name}-stdout").start()

    def _pump(self, stream: IO[bytes]) -> None:
        # Read to the end, so that a chatty child never blocks on a full pipe.
        for raw in stream:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def last_words(self) -> str:
        """The child's last non-empty log line (its error, usually)."""
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines()
                     if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def stop(self, timeout_s: float = STOP_S) -> None:
        """SIGTERM, then SIGKILL when it does not go in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True)
class Passwords:
    """A fresh login password and a read-only (viewer) one, each in its own file as
    `smartbin dashboard --password-file/--viewer-password-file` read them."""

    admin: str
    viewer: str
    admin_file: Path
    viewer_file: Path

    @classmethod
    def create(cls, folder: Path) -> Passwords:
        made = cls(secrets.token_urlsafe(9), secrets.token_urlsafe(9),
                   folder / "dashboard_password", folder / "dashboard_viewer_password")
        for path, secret in ((made.admin_file, made.admin), (made.viewer_file, made.viewer)):
            path.touch(mode=0o600)
            path.write_text(secret + "\n", encoding="utf-8")
        return made


def start_dashboard(folder: Path, *, mqtt_port: int, listen: str, passwords: Passwords,
                    stop: threading.Event) -> tuple[Child, str]:
    """`smartbin dashboard` against the local broker, and the URL it says it listens on."""
    home = folder / "dashboard"
    home.mkdir(exist_ok=True)
    child = Child("dashboard", smartbin_argv(
        "dashboard", "--mqtt", f"127.0.0.1:{mqtt_port}", "--listen", listen,
        "--password-file", str(passwords.admin_file),
        "--viewer-password-file", str(passwords.viewer_file),
        "--history", str(home / "dashboard.db")), folder / "dashboard.log",
        cwd=home, read_stdout=True)
    end = time.monotonic() + DASHBOARD_START_S
    while not stop.is_set() and time.monotonic() < end:
        try:
            line = child.lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            child.proc.wait()
            child.stop()
            raise SmartbinError(f"the dashboard stopped before it listened (exit "
                                f"{child.proc.returncode}): {child.last_words()}")
        found = LISTENING.search(line)
        if found:
            return child, found.group(1)
    child.stop()
    if stop.is_set():
        raise KeyboardInterrupt
    raise SmartbinError(f"the dashboard did not say where it listens within "
                        f"{DASHBOARD_START_S:g} s; see {child.log}")


def toml_value(value: Any) -> str:
    """A TOML value for the few types a generated config needs (JSON strings are TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {toml_value(v)}\n"
                                           for key, v in body.items()) + "\n"
                   for name, body in sections.items())
    path.write_text(text, encoding="utf-8")


def stop_all(children: list[Child], *, say: Callable[[str], None] | None = None) -> None:
    """Stop the children together (each gets SIGTERM at once), waiting for all."""
    for child in children:
        if child.exited() is None:
            child.proc.terminate()
    for child in children:
        child.stop()
    if say is not None and children:
        say(f"stopped {', '.join(c.name for c in children)}")
