"""`smartbin check`: is this bin ready to run? One line per part: `ok` lines on stdout,
`FAIL` lines on stderr, and exit code 2 when anything failed (like every other error)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bin_controller.config import Config, load_config
from bin_controller.errors import SmartbinError
from bin_controller.overrides import cli_overrides

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

MIN_FREE_MB = 100
# How long the broker check waits for the TCP/TLS connection and then for the CONNACK.
BROKER_TIMEOUT_S = 5.0


def _model(cfg: Config) -> str:
    from bin_controller.assembly import make_classifier

    c = make_classifier(cfg.model)
    b = c.bundle
    return f"{b.name} {b.version}, {len(b.labels)} labels, {len(c.stages)} stage(s), {c.backend}"


def _pins(cfg: Config) -> str:
    from bin_controller.hardware.registry import make_pin_factory

    factory = make_pin_factory(cfg.hardware.pin_factory)
    name = type(factory).__name__
    factory.close()
    return name


def _camera(cfg: Config) -> str:
    from bin_controller.hardware.registry import cameras
    from bin_controller.tools.camera_cmd import camera_report

    kinds = cameras()
    if cfg.camera.type not in kinds:
        raise SmartbinError(f"camera.type = {cfg.camera.type!r} is not installed; known: "
                            f"{', '.join(kinds)}")
    if cfg.camera.type != "picamera2":
        return f"{cfg.camera.type} (from {kinds[cfg.camera.type]}); {camera_report(cfg)}"
    if importlib.util.find_spec("picamera2") is None:
        raise SmartbinError("picamera2 is not importable: sudo apt install python3-picamera2, "
                            "and a venv made with --system-site-packages")
    from picamera2 import Picamera2

    found: list[dict[str, str]] = Picamera2.global_camera_info()
    if not found:
        raise SmartbinError("no camera found: check the ribbon cable and 'rpicam-hello'")
    models = ", ".join(c.get("Model", "camera") for c in found)
    return f"{models}; {camera_report(cfg)}"


def _broker(cfg: Config) -> str:
    """A real MQTT connect with the service's credentials and TLS: an open port says
    nothing about a wrong password or certificate."""
    from bin_controller.mqtt.connection import make_client

    if not cfg.mqtt.enabled:
        return "disabled (mqtt.enabled = false)"
    where = f"{cfg.mqtt.host}:{cfg.mqtt.port}"
    # Not the service's client id: the broker would disconnect a running service for it.
    client = make_client(cfg.mqtt, client_id=f"smartbin-check-{cfg.bin.id}-{os.getpid()}")
    client.connect_timeout = BROKER_TIMEOUT_S
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=cfg.mqtt.keepalive_s)
    except ssl.SSLError as exc:
        detail = getattr(exc, "verify_message", None) or exc.reason or exc
        raise SmartbinError(f"{where}: TLS failed: {detail}") from exc
    except (OSError, ValueError) as exc:  # ValueError: paho's own checks on host and port
        raise SmartbinError(f"{where} unreachable: {getattr(exc, 'strerror', None) or exc}"
                            ) from exc
    try:
        refusal = _connack(client, where)
    finally:
        client.disconnect()
        client.loop(timeout=0.1)
    if refusal:
        raise SmartbinError(f"{where} refused the connection: {refusal}"
                            + _credentials_hint(cfg))
    how = ", TLS" if cfg.mqtt.tls else ""
    who = f" as {cfg.mqtt.username}" if cfg.mqtt.username else ""
    return f"{where} connected{who}{how}"


def _connack(client: mqtt.Client, where: str) -> str | None:
    """Run the client until the broker answers the CONNECT: None when it accepted, else
    its reason (e.g. "Not authorized")."""
    answer: list[str | None] = []

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason_code: object,
                   properties: object) -> None:
        failed = getattr(reason_code, "is_failure", False)
        answer.append(str(reason_code) if failed else None)

    client.on_connect = on_connect
    end = time.monotonic() + BROKER_TIMEOUT_S
    while not answer and time.monotonic() < end:
        rc = client.loop(timeout=0.2)
        if rc != 0 and not answer:  # the broker closed the connection without a CONNACK
            raise SmartbinError(f"{where} closed the connection before answering ({rc.name}); "
                                "is it an MQTT broker, and does it want TLS (mqtt.tls)?")
    if not answer:
        raise SmartbinError(f"{where} did not answer the MQTT connect within "
                            f"{BROKER_TIMEOUT_S:g} s; does it want TLS (mqtt.tls)?")
    return answer[0]


def _credentials_hint(cfg: Config) -> str:
    if not cfg.mqtt.username:
        return " (no mqtt.username is set)"
    return (f" (user {cfg.mqtt.username}; check the password in "
            f"{cfg.mqtt.password_file or 'the mqtt_password credential'})")


def _counts(cfg: Config) -> str:
    """The count database as it would open: sound, new, or what a rebuild would start from."""
    from bin_controller.store_recovery import check_store

    return check_store(cfg.bin.state_dir)


def _disk(cfg: Config) -> str:
    folder = Path(cfg.bin.state_dir)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise SmartbinError(f"{folder}: only {free_mb:.0f} MB free (want {MIN_FREE_MB} MB)")
    return f"{folder}: {free_mb:,.0f} MB free"


def _photos(cfg: Config) -> str:
    """Where photos go, what they take, and whether the disk leaves them room."""
    from bin_controller.photolog import photos_dir

    folder = photos_dir(cfg)
    keep = cfg.photos.keep
    if keep == "none":
        return "photos.keep = none: no photo is written"
    size = sum(p.stat().st_size for p in folder.rglob("*.jpg")) if folder.is_dir() else 0
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    if free_mb < cfg.photos.min_free_mb:
        raise SmartbinError(f"{folder}: {free_mb:.0f} MB free, below photos.min_free_mb "
                            f"({cfg.photos.min_free_mb:.0f} MB): no photo will be kept; free some "
                            "space or lower photos.min_free_mb")
    return (f"{folder}: keep {keep}, {size / 2**20:,.1f} of {cfg.photos.max_mb:g} MB used, "
            f"older than {cfg.photos.keep_days:g} days pruned")


def _fail(name: str, exc: BaseException) -> None:
    print(f"FAIL {name}: {exc}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, cli_overrides(args))
    except SmartbinError as exc:
        _fail("config", exc)
        return 2
    print(f"ok   config: {args.config or 'built-in defaults'} (bin {cfg.bin.id})", flush=True)
    checks: list[tuple[str, Callable[[Config], str]]] = [
        ("model", _model), ("pins", _pins), ("camera", _camera), ("broker", _broker),
        ("disk", _disk), ("counts", _counts), ("photos", _photos)]
    failed = 0
    for name, fn in checks:
        try:
            print(f"ok   {name}: {fn(cfg)}", flush=True)
        except Exception as exc:  # every part is reported, whatever broke
            failed += 1
            _fail(name, exc)
    return 2 if failed else 0
