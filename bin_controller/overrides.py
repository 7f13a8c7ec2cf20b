"""Command-line options that change the config file's values, as a table of overrides
merged in before validation (so cross-field checks see the final values)."""

from __future__ import annotations

from typing import Any


def cli_overrides(args: Any) -> dict[str, Any]:
    """--mqtt HOST[:PORT], --bin-id, --state-dir, --model and --backbone from the command
    line, over the configuration file."""
    from bin_controller.mqtt.connection import parse_host

    overrides: dict[str, Any] = {}
    if getattr(args, "mqtt", None):
        host, port = parse_host(args.mqtt)
        overrides["mqtt"] = {"enabled": True, "host": host, **({"port": port} if port else {})}
    if getattr(args, "bin_id", None):
        overrides.setdefault("bin", {})["id"] = args.bin_id
    if getattr(args, "state_dir", None):
        overrides.setdefault("bin", {})["state_dir"] = str(args.state_dir)
    if getattr(args, "backbone", None):
        overrides.setdefault("model", {})["backbone"] = str(args.backbone)
    if getattr(args, "model", None):
        overrides.setdefault("model", {})["bundle"] = str(args.model)
    return overrides
