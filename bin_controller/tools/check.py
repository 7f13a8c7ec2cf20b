"""`smartbin check`: is this bin ready to run? One line per part, non-zero when not."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from bin_controller.config import Config, load_config
from bin_controller.errors import SmartbinError
from bin_controller.overrides import cli_overrides

MIN_FREE_MB = 100


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

    kinds = cameras()
    if cfg.camera.type not in kinds:
        raise SmartbinError(f"camera.type = {cfg.camera.type!r} is not installed; known: "
                            f"{', '.join(kinds)}")
    if cfg.camera.type != "picamera2":
        return f"{cfg.camera.type} (from {kinds[cfg.camera.type]})"
    if importlib.util.find_spec("picamera2") is None:
        raise SmartbinError("picamera2 is not importable: sudo apt install python3-picamera2, "
                            "and a venv made with --system-site-packages")
    from picamera2 import Picamera2

    found: list[dict[str, str]] = Picamera2.global_camera_info()
    if not found:
        raise SmartbinError("no camera found: check the ribbon cable and 'rpicam-hello'")
    return ", ".join(c.get("Model", "camera") for c in found)


def _broker(cfg: Config) -> str:
    if not cfg.mqtt.enabled:
        return "disabled (mqtt.enabled = false)"
    try:
        with socket.create_connection((cfg.mqtt.host, cfg.mqtt.port), timeout=3):
            pass
    except OSError as exc:
        raise SmartbinError(f"{cfg.mqtt.host}:{cfg.mqtt.port} unreachable: "
                            f"{exc.strerror or exc}") from exc
    return f"{cfg.mqtt.host}:{cfg.mqtt.port} reachable"


def _disk(cfg: Config) -> str:
    folder = Path(cfg.bin.state_dir)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise SmartbinError(f"{folder}: only {free_mb:.0f} MB free (want {MIN_FREE_MB} MB)")
    return f"{folder}: {free_mb:,.0f} MB free"


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, cli_overrides(args))
    except SmartbinError as exc:
        print(f"FAIL config: {exc}")
        return 1
    print(f"ok   config: {args.config or 'built-in defaults'} (bin {cfg.bin.id})")
    checks: list[tuple[str, Callable[[Config], str]]] = [
        ("model", _model), ("pins", _pins), ("camera", _camera), ("broker", _broker),
        ("disk", _disk)]
    failed = 0
    for name, fn in checks:
        try:
            print(f"ok   {name}: {fn(cfg)}", flush=True)
        except Exception as exc:  # every part is reported, whatever broke
            failed += 1
            print(f"FAIL {name}: {exc}", flush=True)
    return 1 if failed else 0
