"""The bin as one object: loop, store and telemetry wired together, for run and simulate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bin_controller.config import Config
from bin_controller.mqtt.commands import make_handlers
from bin_controller.mqtt.telemetry import Telemetry
from bin_controller.payloads import event_message
from bin_controller.sorter import SortingLoop
from bin_controller.store import Store

log = logging.getLogger(__name__)


def open_store(cfg: Config, state_dir: str | Path | None = None) -> Store:
    return Store(state_dir or cfg.bin.state_dir, synchronous=cfg.store.synchronous.upper(),
                 journal_keep=cfg.store.journal_keep, outbox_max=cfg.store.outbox_max,
                 message=event_message)


def attach(cfg: Config, loop: SortingLoop, store: Store) -> Telemetry | None:
    """Recover a cycle cut short by a crash, then connect telemetry when enabled."""
    for event in store.recover(item_still_present=loop.sensor.present):
        log.info("recovered item #%d (%s)", event.seq, event.bin)
    if not cfg.mqtt.enabled:
        return None
    telemetry: Telemetry | None = None

    def counts_changed() -> None:
        if telemetry is not None and telemetry.connected.is_set():
            telemetry.publish_counts()

    telemetry = Telemetry(cfg.mqtt, bin_id=cfg.bin.id, store=store,
                          commands=make_handlers(cfg, loop, store, counts_changed),
                          status=loop.status)
    loop.on_event.append(telemetry.on_event)
    loop.on_state.append(telemetry.on_state)
    loop.on_fault.append(telemetry.on_fault)
    telemetry.start()
    return telemetry


def cli_overrides(args: Any) -> dict[str, Any]:
    """--mqtt HOST[:PORT], --bin-id, --state-dir, --model and --backbone from the command
    line, over the configuration file."""
    from bin_controller.mqtt.telemetry import parse_host

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
