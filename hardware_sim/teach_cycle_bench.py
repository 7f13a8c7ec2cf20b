"""The sorting cycle while a teach runs in the background, against idle.

    python -m hardware_sim.teach_cycle_bench [--model demo] [--images DIR --bin-map FILE]
        [--backbone FILE] [--items 150] [--per-class 10]

The simulated bin (fast mechanics, the real SQLite store and photo log) sorts items back to
back: first `--items` with nothing else running, then items until a background teach (the
service's own `TeachJob`: the `smartbin teach` child process, niced, features not cached)
has finished. It prints the cycle (sensor edge to item counted) p50/p95 both ways and how
long the teach took. The teach data are `--per-class` photos of each class of `--images`
(else of the demo's generated kinds) and as many generated grapes as a new label.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.teaching import TeachJob, TeachSettings
from bin_controller.tools.bench import percentiles
from hardware_sim import items as kinds
from hardware_sim.bench import CycleTimer
from hardware_sim.mechanics import SimItem
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import IMAGE_SUFFIXES, FolderSource, GeneratedSource
from hardware_sim.unknown_kinds import GRAPES


def teach_data(dest: Path, images: Path | None, per_class: int) -> int:
    rng = np.random.default_rng(7)
    n = 0
    if images is not None:
        for cls in sorted(d for d in images.iterdir() if d.is_dir()):
            (dest / cls.name).mkdir(parents=True)
            photos = sorted(p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for p in photos[-per_class:]:  # the last ones: not the loop's first items
                (dest / cls.name / p.name).write_bytes(p.read_bytes())
                n += 1
    else:
        for kind in kinds.KINDS:
            (dest / kind.name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(kinds.render(kind, rng)).save(dest / kind.name / f"{i}.png")
                n += 1
    (dest / GRAPES.name).mkdir(parents=True)
    size = 224 if images is not None else kinds.FRAME
    for i in range(per_class):
        Image.fromarray(kinds.render(GRAPES, rng, size)).save(dest / GRAPES.name / f"{i}.png")
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hardware_sim.teach_cycle_bench")
    p.add_argument("--model", default="demo")
    p.add_argument("--images", type=Path, help="class folders for the loop's items")
    p.add_argument("--bin-map", type=Path)
    p.add_argument("--backbone", help="local backbone file for a downloadable one")
    p.add_argument("--items", type=int, default=150, help="items sorted idle")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="smartbin-teachbench-") as tmp:
        root = Path(tmp)
        # Features not cached: the teach computes every photo's, as on a first teach.
        os.environ["SMARTBIN_CACHE_DIR"] = str(root / "cache")
        model: dict[str, Any] = {"bundle": args.model, "threads": args.threads}
        if args.backbone:
            model["backbone"] = str(Path(args.backbone).resolve())
        # Compartments that never fill: the emptying is not what is measured.
        cfg = sim_config(config_from_dict({"bin": {"state_dir": str(root / "state")},
                                           "model": model,
                                           "fill": {"capacity_l": dict.fromkeys(BINS, 100000)}}),
                         fast=True)
        n_photos = teach_data(root / "data", args.images, args.per_class)
        frame = (cfg.camera.width, cfg.camera.height)
        source: Any = (FolderSource(args.images, args.bin_map, 0, frame) if args.images
                       else GeneratedSource(0))
        pool: list[SimItem] = source.items(max(args.items, 200))

        def export(dest: Path) -> dict[str, Any]:
            import shutil

            shutil.copytree(root / "data", dest)
            return {"photos": n_photos}

        with Simulation(cfg) as sim:
            loop = sim.loop
            job = TeachJob(state_dir=root / "state", export=export,
                           base=lambda: (loop.classifier.bundle.path,
                                         loop.classifier.bundle.name),
                           install=lambda _p: {}, backbone=model.get("backbone"))
            cycles = CycleTimer(sim).cycles

            def item(n: int) -> SimItem:
                src = pool[n % len(pool)]
                return SimItem(n + 1, src.true_class, src.true_bin, src.image.copy(),
                               label_en=src.label_en)

            sim.drop([item(n) for n in range(args.items)])
            idle = list(cycles)
            cycles.clear()
            started = time.monotonic()
            job.start(TeachSettings(margin=100.0))
            n = args.items
            while job.running():
                sim.drop([item(n)])
                n += 1
            teach_s = time.monotonic() - started
            during = list(cycles)
            outcome = job.snapshot() or {}
    i50, i95 = percentiles(idle)
    d50, d95 = percentiles(during) if during else (float("nan"), float("nan"))
    print(f"model {args.model}, {args.threads} thread(s), fast mechanics, SQLite store and "
          f"photos, items back to back; teach: {n_photos} photos, features not cached, "
          f"niced child process, {os.cpu_count()} CPUs")
    print(f"idle            {len(idle):4d} items  cycle p50 {i50:6.2f} ms  p95 {i95:6.2f} ms")
    print(f"teach running   {len(during):4d} items  cycle p50 {d50:6.2f} ms  p95 {d95:6.2f} ms"
          f"  (teach {outcome.get('phase')} in {teach_s:.1f} s"
          + (f": {outcome.get('error')}" if outcome.get("error") else "") + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
