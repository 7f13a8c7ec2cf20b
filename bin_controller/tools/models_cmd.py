"""`smartbin models install|list|rollback`: the versions kept in the models folder.

The folder is the configured `model.dir`; see `model_updates` for how a version gets in
whole or not at all. After an install or a rollback of the running bundle, the service
picks it up on `reload_model` (or a restart).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bin_controller.config import load_config
from bin_controller.errors import CommandError
from bin_controller.model_updates import ModelsFolder
from bin_controller.overrides import cli_overrides


def configured_name(bundle: str) -> str:
    """The bundle name the config runs: a name as it is, a folder by its last part."""
    return Path(bundle).name


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, cli_overrides(args))
    models = ModelsFolder(cfg.model.dir)
    if args.models_command == "install":
        done = models.install(args.bundle, keep=args.keep)
        print(f"installed {done.name} {done.version} in {models.folder}"
              + (f" (previous: {done.previous})" if done.previous else "")
              + (f"; removed {', '.join(done.removed)}" if done.removed else "")
              + "; send reload_model or restart the service to use it")
        return 0
    if args.models_command == "rollback":
        name = args.name or configured_name(cfg.model.bundle)
        before, after = models.rollback(name)
        print(f"{name}: {before} -> {after or 'the shipped bundle'}; send reload_model or "
              "restart the service to use it")
        return 0
    if args.models_command != "list":
        raise CommandError(f"unknown models command {args.models_command!r}")
    listing = models.list()
    if args.json:
        print(json.dumps(listing, ensure_ascii=False))
        return 0
    if not listing:
        print(f"no bundles in {models.folder}")
    for name, entry in listing.items():
        current = entry["current"] or ("the shipped bundle" if entry["shipped"] else "none")
        if entry.get("unmanaged"):
            current = "copied in by hand (adopted at the next install)"
        older = [v for v in entry["versions"] if v != entry["current"]]
        print(f"{name}: {current}" + (f"; kept: {', '.join(older)}" if older else ""))
    return 0
