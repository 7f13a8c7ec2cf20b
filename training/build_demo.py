"""Builds model/demo: a small int8 bundle trained on procedurally generated items.

    python -m training.build_demo [--out model/demo] [--seed 0]

Deterministic for a given seed, so the committed bundle can be regenerated bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bin_controller.vision.bundle import REPO_MODELS, write_manifest
from bin_controller.vision.fetch import sha256_bytes
from hardware_sim import items
from training.export_head import export_head, pooling_backbone
from training.features import StageFeatures
from training.head import train_head

SIZE, GRID, HIDDEN = 64, 16, 128


def build(out: Path, *, seed: int = 0, n_train: int = 8000, n_val: int = 1000) -> dict:
    rng = np.random.default_rng(seed)
    backbone = pooling_backbone(SIZE, GRID)
    extractor = StageFeatures(backbone, size=SIZE, mean=0.0, std=1.0)
    started = time.perf_counter()
    train_imgs, y_train = items.sample(rng, n_train)
    val_imgs, y_val = items.sample(rng, n_val)
    x_train = extractor.batch(train_imgs)
    x_val = extractor.batch(val_imgs)
    result = train_head(
        x_train, np.array(y_train), len(items.KINDS), hidden=HIDDEN, dropout=0.2, lr=2e-3,
        epochs=40, batch_size=64, weight_decay=1e-4, seed=seed, x_val=x_val,
        y_val=np.array(y_val),
    )
    head = export_head(result.layers, x_train[:512], input_scale=1.0, input_zero_point=-128,
                       description="smartbin demo head")
    out.mkdir(parents=True, exist_ok=True)
    (out / "backbone.tflite").write_bytes(backbone)
    (out / "head.tflite").write_bytes(head)
    final = result.history[-1]
    manifest = {
        "format": 1,
        "name": "demo",
        "version": "1.0.0",
        "description": "Offline demo: 8 item kinds drawn by hardware_sim.items, all four bins. "
                       "Not for real photos.",
        "labels": [{"name": k.name, "name_en": k.name_en, "bin": k.bin} for k in items.KINDS],
        "input": {"size": [SIZE, SIZE], "color": "RGB", "crop": "center", "crop_fraction": 1.0,
                  "mean": 0.0, "std": 1.0},
        "output": "probabilities",
        "stages": [
            {"role": "backbone", "file": "backbone.tflite", "sha256": sha256_bytes(backbone)},
            {"role": "head", "file": "head.tflite", "sha256": sha256_bytes(head)},
        ],
        "provenance": {
            "dataset": "hardware_sim.items procedural photos",
            "method": f"average-pooled {GRID}x{GRID} colour grid, dense {HIDDEN} relu, "
                      "dense softmax; numpy training, int8 export",
            "seed": seed,
            "split": {"train": n_train, "val": n_val},
            "metrics": {"train_top1": round(final["train_acc"], 4),
                        "val_top1": round(final["val_acc"], 4)},
        },
        "how_to_train": "python -m training.build_demo --out model/demo",
    }
    write_manifest(out, manifest)
    return {"seconds": time.perf_counter() - started, **manifest["provenance"]["metrics"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO_MODELS / "demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    stats = build(args.out, seed=args.seed)
    print(f"wrote {args.out}: train top-1 {stats['train_top1']:.3f}, "
          f"val top-1 {stats['val_top1']:.3f}, {stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
