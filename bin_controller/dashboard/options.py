"""The options of `smartbin dashboard`, and reading them (no aiohttp here: the command
line is built without importing the web part)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from bin_controller.errors import ConfigError, SmartbinError

DEFAULT_LISTEN = "127.0.0.1:8080"
PASSWORD_CREDENTIAL = "dashboard_password"
VIEWER_CREDENTIAL = "dashboard_viewer_password"
HISTORY_NAME = "dashboard.db"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
               path: Callable[[str], str]) -> argparse.ArgumentParser:
    """The subcommand's parser; `path` checks a file option (the CLI's: no NUL, not too
    long)."""
    p = sub.add_parser("dashboard", help="web dashboard of every bin under the prefix (MQTT)")
    p.add_argument("--mqtt", required=True, metavar="HOST[:PORT]", help="the MQTT broker")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"where to serve the pages (default {DEFAULT_LISTEN}; port 0: a free "
                        "port)")
    p.add_argument("--prefix", default="smartbin", help="topic prefix of the bins")
    p.add_argument("--password-file", type=path, default=None, metavar="FILE",
                   help="the login password (default: the systemd credential "
                        f"{PASSWORD_CREDENTIAL})")
    p.add_argument("--viewer-password-file", type=path, default=None, metavar="FILE",
                   help="a read-only login's password (default: the credential "
                        f"{VIEWER_CREDENTIAL}, if any)")
    p.add_argument("--history", type=path, default=None, metavar="FILE",
                   help=f"the charts' database (default: $STATE_DIRECTORY/{HISTORY_NAME}, "
                        f"else ~/.local/state/smartbin/{HISTORY_NAME})")
    p.add_argument("--mqtt-username", default="", metavar="U")
    p.add_argument("--mqtt-password-file", type=path, default="", metavar="F",
                   help="default: the systemd credential mqtt_password when a username is set")
    p.add_argument("--tls", action="store_true", help="connect to the broker with TLS")
    p.add_argument("--ca-file", type=path, default="", metavar="F")
    p.add_argument("--cert-file", type=path, default="", metavar="F")
    p.add_argument("--key-file", type=path, default="", metavar="F")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def parse_listen(text: str) -> tuple[str, int]:
    usage = "give ADDR:PORT, e.g. 127.0.0.1:8080 ([::1]:8080 for IPv6; port 0: a free one)"
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or any(ch.isspace() or not ch.isprintable() for ch in host):
        raise ConfigError(f"--listen {text!r}: {usage}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ConfigError(f"--listen {text!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def read_secret(option: str, path: str | None, credential: str, *,
                required: bool) -> str | None:
    """A password from its file, else the systemd credential; None or an error when there
    is neither."""
    if path is None:
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        candidate = Path(folder) / credential if folder else None
        if candidate is None or not candidate.is_file():
            if required:
                raise SmartbinError(f"no dashboard password: give {option} FILE or the systemd "
                                    f"credential {credential}")
            return None
        file = candidate
    else:
        file = Path(path)
    try:
        secret = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SmartbinError(f"{option} {file}: cannot read it: {reason}") from None
    if not secret:
        raise SmartbinError(f"{option} {file}: the file is empty; put the password in it")
    return secret


def history_path(option: str | None) -> Path:
    if option:
        return Path(option).expanduser()
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / HISTORY_NAME
    return Path.home() / ".local" / "state" / "smartbin" / HISTORY_NAME
