"""Builds model/demo: a small int8 bundle trained on procedurally generated items.

    python -m training.build_demo [--out model/demo] [--seed 0]

Deterministic for a given seed, so the committed bundle can be regenerated bit for bit.

The head is trained with outlier exposure (training.outliers): without it the demo called
kinds it had never seen a battery or an apple with 99 % confidence, so they went into a
wrong compartment instead of the fallback bin marked uncertain. Its metrics are measured on
the written int8 bundle, as the bin runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bin_controller.config import ModelSection
from bin_controller.vision.bundle import REPO_MODELS, write_manifest
from bin_controller.vision.classifier import Classifier, Prediction
from bin_controller.vision.fetch import sha256_bytes
from hardware_sim import items
from hardware_sim.unknown_kinds import UNKNOWN_KINDS
from training import outliers
from training.export_head import export_head, pooling_backbone
from training.features import StageFeatures
from training.head import train_head

SIZE, GRID, HIDDEN = 64, 16, 256
OUTLIER_WEIGHT = 0.5  # Hendrycks et al.'s lambda
# Chosen on the held-out photos of known kinds and held-out outliers only (never on the
# unknown kinds): with outlier exposure, 128 units, dropout 0.2 and 40 epochs marked 3.0 %
# of the known photos uncertain and caught 69 % of the outliers; no dropout 1.1 % / 68 %;
# 256 units and 80 epochs without dropout 0.7 % / 73 %.
DROPOUT, EPOCHS = 0.0, 80
N_UNKNOWN = 200  # photos of each never-taught kind the metrics are measured on


def below_threshold(predictions: list[Prediction], threshold: float) -> float:
    """The share of predictions whose bin probability is under `threshold`: the items the
    bin sends to its fallback compartment marked uncertain."""
    return float(np.mean([p.bin_confidence < threshold for p in predictions]))


def measure(bundle_dir: Path, *, seed: int, val: tuple[list[np.ndarray], list[int]],
            held_out_outliers: list[np.ndarray]) -> dict[str, object]:
    """The written bundle's numbers, through the int8 classifier the bin runs."""
    classifier = Classifier(bundle_dir)
    threshold = ModelSection().confidence_threshold
    images, labels = val
    known = [classifier.classify_array(im) for im in images]
    top1 = float(np.mean([p.index == y for p, y in zip(known, labels, strict=True)]))
    rng = np.random.default_rng([seed, 3])
    unknown = {kind.name_en: round(below_threshold(
        [classifier.classify_array(items.render(kind, rng)) for _ in range(N_UNKNOWN)],
        threshold), 4) for kind in UNKNOWN_KINDS}
    outlying = [classifier.classify_array(im) for im in held_out_outliers]
    return {"val_top1": round(top1, 4),
            "val_uncertain": round(below_threshold(known, threshold), 4),
            "threshold": threshold,
            "outliers_uncertain": round(below_threshold(outlying, threshold), 4),
            "unknown_kinds_uncertain": unknown}


def build(out: Path, *, seed: int = 0, n_train: int = 8000, n_val: int = 1000,
          n_outliers: int = 8000, n_outliers_val: int = 1000) -> dict:
    rng = np.random.default_rng(seed)
    backbone = pooling_backbone(SIZE, GRID)
    extractor = StageFeatures(backbone, size=SIZE, mean=0.0, std=1.0)
    started = time.perf_counter()
    train_imgs, y_train = items.sample(rng, n_train)
    val_imgs, y_val = items.sample(rng, n_val)
    # Their own generator: the known kinds' photos stay those of the seed alone.
    out_rng = np.random.default_rng([seed, 2])
    outlier_imgs = outliers.sample(out_rng, n_outliers)
    outlier_val_imgs = outliers.sample(out_rng, n_outliers_val)
    x_train = extractor.batch(train_imgs)
    x_val = extractor.batch(val_imgs)
    result = train_head(
        x_train, np.array(y_train), len(items.KINDS), hidden=HIDDEN, dropout=DROPOUT, lr=2e-3,
        epochs=EPOCHS, batch_size=64, weight_decay=1e-4, seed=seed, x_val=x_val,
        y_val=np.array(y_val), x_outlier=extractor.batch(outlier_imgs),
        outlier_target=outliers.bin_spread_target([k.bin for k in items.KINDS]),
        outlier_weight=OUTLIER_WEIGHT,
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
        "version": "1.1.0",
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
            "dataset": "hardware_sim.items procedural photos; training.outliers procedural "
                       "outliers (random shapes, blobs, textures, recoloured kinds)",
            "method": f"average-pooled {GRID}x{GRID} colour grid, dense {HIDDEN} relu "
                      f"(dropout {DROPOUT}), "
                      "dense softmax; outlier exposure (Hendrycks et al. 2019: weight "
                      f"{OUTLIER_WEIGHT}, target {{each bin 1/4, split among its labels}}); "
                      "numpy training, int8 export",
            "seed": seed,
            "split": {"train": n_train, "val": n_val, "outliers": n_outliers,
                      "outliers_val": n_outliers_val},
            "metrics": {"train_top1": round(final["train_acc"], 4)},
        },
        "how_to_train": "python -m training.build_demo --out model/demo",
    }
    # The manifest first, so the bundle loads; then again with what the int8 model does.
    write_manifest(out, manifest)
    manifest["provenance"]["metrics"].update(measure(
        out, seed=seed, val=(val_imgs, y_val), held_out_outliers=outlier_val_imgs))
    write_manifest(out, manifest)
    return {"seconds": time.perf_counter() - started, **manifest["provenance"]["metrics"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO_MODELS / "demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    stats = build(args.out, seed=args.seed)
    unknown = ", ".join(f"{k} {v:.0%}" for k, v in stats["unknown_kinds_uncertain"].items())
    print(f"wrote {args.out}: train top-1 {stats['train_top1']:.3f}, "
          f"val top-1 {stats['val_top1']:.3f} (int8), uncertain: known "
          f"{stats['val_uncertain']:.1%}, held-out outliers {stats['outliers_uncertain']:.0%}, "
          f"{unknown}; {stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
