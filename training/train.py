"""`smartbin train`: a folder of labelled photos in, a deployable int8 bundle out.

The `features` method is the study's chosen model: the whole MobileNetV2 backbone frozen,
so its pooled features are computed once (and cached) and only dropout + dense is trained,
in numpy, in seconds. No TensorFlow is needed, so it runs on the bin itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.errors import SmartbinError
from bin_controller.vision import tflite_format
from bin_controller.vision.bundle import MANIFEST, load_bundle, write_manifest
from bin_controller.vision.fetch import RemoteFile, cache_dir, fetch_bytes, resolve, sha256_bytes
from training import plots
from training.calibration import DEFAULT_TARGET_ACCURACY, Calibration, calibrate, view_ece
from training.dataset import Dataset, load_dataset
from training.evaluate import SPLIT_FILE, evaluate, save_float_head, write_report
from training.export_head import export_head, int8_agreement
from training.features import (
    DEPLOY_CROP,
    EVAL_VIEWS,
    TRAIN_VIEWS,
    FeatureCache,
    StageFeatures,
    extract,
)
from training.head import Dense, ensemble, forward, softmax, train_head

OFFICIAL_BACKBONE = RemoteFile(
    url="https://storage.googleapis.com/download.tensorflow.org/models/tflite_11_05_08/"
        "mobilenet_v2_1.0_224_quant.tgz",
    sha256="7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
    member="mobilenet_v2_1.0_224_quant.tflite",
)
POOLED = "MobilenetV2/Logits/AvgPool"
WEIGHT_DECAYS = (1e-4, 1e-3)


@dataclass
class Hyper:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    dropout: float = 0.5
    seed: int = 0


def _backbone(spec: str | None) -> tuple[RemoteFile, bytes]:
    """The backbone as (how the bundle names it, bytes); a local file keeps the official
    URL when it is the official model."""
    if spec and spec.startswith(("http://", "https://")):
        # A custom URL: its checksum is recorded from this download.
        name = spec.rsplit("/", 1)[-1]
        member = name.removesuffix(".tgz").removesuffix(".tar.gz") + ".tflite" \
            if name.endswith((".tgz", ".tar.gz")) else name
        data = fetch_bytes(RemoteFile(spec, "", member))
        return RemoteFile(spec, sha256_bytes(data), member), data
    data = resolve(OFFICIAL_BACKBONE, override=spec) if not spec or Path(spec).exists() \
        else None
    if data is None:
        raise SmartbinError(f"--backbone {spec}: no such file")
    return OFFICIAL_BACKBONE, data


def _variant_scores(layers: list[Dense], x: np.ndarray, x_flip: np.ndarray | None,
                    y: np.ndarray) -> float:
    p = softmax(forward(layers, x)[-1])
    if x_flip is not None:
        p = p + softmax(forward(layers, x_flip)[-1])
    return float((p.argmax(1) == y).mean())


def train_features(data: Path, out: Path, *, bin_map: Path | None = None,
                   backbone: str | None = None, hyper: Hyper | None = None,
                   search: bool = True, target_accuracy: float = DEFAULT_TARGET_ACCURACY,
                   progress: bool | None = None, log=print) -> dict[str, Any]:
    plots.require()
    hyper = hyper or Hyper()
    started = time.perf_counter()
    ds = load_dataset(data, seed=hyper.seed, bin_map=bin_map)
    for rel, reason in ds.skipped:
        log(f"skipped {rel}: {reason}")
    for warning in ds.warnings:
        log(f"warning: {warning}")
    log(f"{len(ds.classes)} classes; split train {len(ds.splits['train'])} / val "
        f"{len(ds.splits['val'])} / test {len(ds.splits['test'])}"
        + (" (pre-split)" if ds.presplit else f" (8:1:1, seed {ds.seed})"))
    remote, original = _backbone(backbone)
    try:
        derived = tflite_format.truncate_at_tensor(original, POOLED)
    except tflite_format.TFLiteFormatError as exc:
        raise SmartbinError(f"backbone: {exc}") from exc
    extractor = StageFeatures(derived, size=224, mean=128.0, std=128.0)
    cache = FeatureCache(cache_dir() / "features", remote.sha256)
    train_views = TRAIN_VIEWS if search else ("center",)
    eval_views = EVAL_VIEWS if search else ("center", "flip")
    f_train, stats_tr = extract(ds.splits["train"], train_views, extractor, cache,
                                progress=progress)
    f_val, stats_va = extract(ds.splits["val"], eval_views, extractor, cache, progress=progress)
    f_test, stats_te = extract(ds.splits["test"], eval_views, extractor, cache,
                               progress=progress)
    computed = stats_tr["computed"] + stats_va["computed"] + stats_te["computed"]
    extract_s = stats_tr["seconds"] + stats_va["seconds"] + stats_te["seconds"]
    speed = computed / extract_s if computed else float("nan")
    log(f"features: {computed} computed ({speed:.1f} images/s on this machine), "
        f"the rest from the cache")

    y = {k: np.array([s.label for s in ds.splits[k]]) for k in ("train", "val", "test")}
    n_cls = len(ds.classes)
    variants: list[dict[str, Any]] = []

    def fit(name: str, used_views: tuple[str, ...], deploy: str, *, wd: float = 0.0,
            hidden: int = 0, seeds: int = 1, tta: bool = False, fast: bool = False) -> tuple:
        x = np.concatenate([f_train[v] for v in used_views])
        yy = np.concatenate([y["train"]] * len(used_views))
        t0 = time.perf_counter()
        # The study's optimiser settings; the many-view heads take larger steps on larger
        # batches so that they train in seconds rather than minutes.
        lr, batch, epochs = (2e-3, 256, 20) if fast else (hyper.lr, hyper.batch_size,
                                                         hyper.epochs)
        members = [train_head(x, yy, n_cls, hidden=hidden, dropout=hyper.dropout, lr=lr,
                              epochs=epochs, batch_size=batch, weight_decay=wd,
                              seed=hyper.seed + i, x_val=f_val[deploy], y_val=y["val"])
                   for i in range(seeds)]
        layers = ensemble([m.layers for m in members])
        seconds = time.perf_counter() - t0
        flip = "full_flip" if deploy == "full" else "flip"
        val = _variant_scores(layers, f_val[deploy], f_val[flip] if tta else None, y["val"])
        test = _variant_scores(layers, f_test[deploy], f_test[flip] if tta else None,
                               y["test"])
        row = {"variant": name, "views": list(used_views), "deploy_view": deploy,
               "hidden": hidden, "ensemble": seeds, "weight_decay": wd,
               "test_time_flip": tta, "val_top1": round(val, 4), "test_top1": round(test, 4),
               "train_seconds": round(seconds, 2)}
        variants.append(row)
        log(f"  {name:52} val {val:.2%}  test {test:.2%}  ({seconds:.1f} s)")
        return layers, row, members[0].history

    log("variants (chosen on validation only; test shown for the record):")
    candidates = [fit("study: centre crop, dropout + dense", ("center",), "center")]
    if search:
        candidates.append(fit("study head, whole frame", ("full",), "full"))
        candidates.append(fit("dense, 14 flip/crop/turn views", train_views, "full"))
        for wd in WEIGHT_DECAYS[:2]:
            candidates.append(fit(f"dense, 14 views, L2 {wd:g}", train_views, "full", wd=wd))
        for wd in WEIGHT_DECAYS[:2]:
            candidates.append(fit(f"dense 512 relu dense, 14 views, L2 {wd:g}, 3 seeds",
                                  train_views, "full", wd=wd, hidden=512, seeds=3, fast=True))
    top = max(candidates, key=lambda c: (c[1]["val_top1"], -c[1]["weight_decay"]))
    result_layers, chosen, history = top
    if search:
        r = top[1]
        tta = fit(r["variant"] + " + test-time flip", tuple(r["views"]), r["deploy_view"],
                  wd=r["weight_decay"], hidden=r["hidden"], seeds=r["ensemble"], tta=True,
                  fast=r["hidden"] > 0)
        # Test-time flip doubles the backbone's work; keep it only if validation gains.
        if tta[1]["val_top1"] > r["val_top1"]:
            result_layers, chosen, history = tta
    log(f"chosen: {chosen['variant']}")

    # Calibrate before the export, so that the int8 softmax is the calibrated one.
    deploy = chosen["deploy_view"]
    flip = "full_flip" if deploy == "full" else "flip"
    views = [deploy, flip] if chosen["test_time_flip"] else [deploy]
    uncalibrated = result_layers
    result_layers, calibration = calibrate(result_layers, [f_val[v] for v in views], y["val"])
    # The test split says whether the temperature fitted on validation carries over.
    test_ece = {"test_ece_float_before": view_ece(uncalibrated, [f_test[v] for v in views],
                                                  y["test"]),
                "test_ece_float_after": view_ece(result_layers, [f_test[v] for v in views],
                                                 y["test"])}
    log(f"calibration: temperature {calibration.temperature:.3f}; validation ECE "
        f"{calibration.val_ece_before:.2%} -> {calibration.val_ece_after:.2%}, NLL "
        f"{calibration.val_nll_before:.3f} -> {calibration.val_nll_after:.3f}; test ECE "
        f"(float) {test_ece['test_ece_float_before']:.2%} -> "
        f"{test_ece['test_ece_float_after']:.2%}")

    q = extractor.quant
    calib = np.concatenate([f_train[v][:256] for v in chosen["views"]])
    head = export_head(result_layers, calib, input_scale=q.scale,
                       input_zero_point=q.zero_point - 128 if q.dtype is np.uint8
                       else q.zero_point, description=f"smartbin head for {out.name}")
    # T rescales the logits and so the int8 output range: check the export still follows.
    check = int8_agreement(head, result_layers, f_val[deploy])
    log(f"int8 head against the calibrated float head on validation: top-1 agreement "
        f"{check['top1_agreement']:.2%}, largest probability difference "
        f"{check['max_prob_diff']:.3f}")
    manifest = _manifest(out, ds, remote, head, chosen, hyper, variants, speed,
                         time.perf_counter() - started, calibration,
                         check | {k: round(v, 4) for k, v in test_ece.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "head.tflite").write_bytes(head)
    save_float_head(out, result_layers)
    (out / SPLIT_FILE).write_text(json.dumps(ds.record(), ensure_ascii=False) + "\n",
                                  encoding="utf-8")
    write_manifest(out, manifest)
    report = finalize(out, data, history=history, backbone=backbone, progress=progress,
                      target_accuracy=target_accuracy)
    log(f"int8 bundle on the test split: top-1 {report['top1']:.2%}, top-5 "
        f"{report['top5']:.2%}, bin accuracy {report['bin_accuracy']:.2%} (bin of the top "
        f"label: {report['bin_accuracy_top_label']:.2%}), int8/float agreement "
        f"{report['int8_float_agreement']:.2%}; ECE {report['ece']:.2%}")
    log(report["calibration"]["advice"])
    log(f"benchmark: feature extraction {speed:.1f} images/s; head training "
        f"{chosen['train_seconds']:.1f} s; wrote {out}")
    return {"report": report, "variants": variants, "chosen": chosen,
            "images_per_s": speed}


def finalize(out: Path, data: Path, *, history: list | None = None,
             backbone: str | None = None, progress: bool | None = None,
             target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict[str, Any]:
    """Evaluate the written bundle on its test split; record the numbers and the report."""
    report = evaluate(out, data, split="test", backbone=backbone, progress=progress,
                      target_accuracy=target_accuracy)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    metrics = manifest["provenance"]["metrics"]
    if report["int8_float_agreement"] is None:
        report["int8_float_agreement"] = metrics.get("int8_float_agreement")
    metrics.update(test_top1_int8=report["top1"], test_top5_int8=report["top5"],
                   test_bin_accuracy_int8=report["bin_accuracy"],
                   test_bin_accuracy_top_label_int8=report["bin_accuracy_top_label"],
                   int8_float_agreement=report["int8_float_agreement"],
                   test_ece_int8=report["ece"], test_bin_ece_int8=report["bin_ece"])
    if "calibration" in manifest["provenance"]:
        # Measured on the int8 bundle as deployed, not on the float head.
        manifest["provenance"]["calibration"].update(test_ece=report["ece"],
                                                     test_bin_ece=report["bin_ece"])
    write_manifest(out, manifest)
    variants = manifest["provenance"]["variants"]
    chosen = next(v for v in variants if v["variant"] == manifest["provenance"]["chosen"])
    write_report(report, out / "report", load_bundle(out),
                 extra_md=_variants_md(variants, chosen))
    if history:
        plots.curves_png(history, out / "report" / "training.png",
                         f"{manifest['name']} {manifest['version']}: training, train and "
                         f"validation splits ({chosen['variant']})")
    return report


def _variants_md(variants: list[dict[str, Any]], chosen: dict[str, Any]) -> str:
    lines = ["## Variants tried", "", "Float heads; chosen on the validation split only.", "",
             "| variant | val top-1 | test top-1 | train s |",
             "| --- | ---: | ---: | ---: |"]
    for v in variants:
        mark = " **(chosen)**" if v is chosen else ""
        lines.append(f"| {v['variant']}{mark} | {v['val_top1']:.2%} | "
                     f"{v['test_top1']:.2%} | {v['train_seconds']} |")
    return "\n".join(lines)


def _manifest(out: Path, ds: Dataset, remote: RemoteFile, head: bytes, chosen: dict,
              hyper: Hyper, variants: list, speed: float, seconds: float,
              calibration: Calibration, checks: dict[str, float]) -> dict[str, Any]:
    names_en: dict[str, str] = {}
    old = out / MANIFEST
    if old.is_file():  # keep hand-written English names (model/garbage120 has them)
        try:
            names_en = {lab["name"]: lab.get("name_en", "")
                        for lab in json.loads(old.read_text(encoding="utf-8"))["labels"]}
        except (ValueError, KeyError, TypeError):
            names_en = {}
    labels = [{"name": c, "name_en": names_en.get(c) or c.split("_", 1)[-1].replace("_", " "),
               "bin": ds.bins[c]} for c in ds.classes]
    return {
        "format": 1,
        "name": out.name,
        "version": time.strftime("%Y.%m.%d"),
        "description": f"Frozen ImageNet MobileNetV2 (int8) + dropout/dense head trained on "
                       f"{ds.root.name}.",
        "labels": labels,
        "input": {"size": [224, 224], "color": "RGB", "crop": DEPLOY_CROP[chosen["deploy_view"]],
                  "crop_fraction": 1.0, "mean": 128.0, "std": 128.0},
        "output": "probabilities",
        "test_time_flip": bool(chosen["test_time_flip"]),
        "stages": [
            {"role": "backbone", "source": {"url": remote.url, "sha256": remote.sha256,
                                            "member": remote.member}, "output": POOLED},
            {"role": "head", "file": "head.tflite", "sha256": sha256_bytes(head)},
        ],
        "provenance": {
            "dataset": ds.root.name,
            "split": {k: len(v) for k, v in ds.splits.items()} | {"seed": ds.seed,
                                                                   "file": SPLIT_FILE},
            "skipped": len(ds.skipped),
            "method": "features: frozen int8 backbone, pooled features (cached), "
                      "dropout + dense softmax trained in numpy (Adam), int8 export",
            "hyperparameters": {"epochs": hyper.epochs, "batch_size": hyper.batch_size,
                                "lr": hyper.lr, "dropout": hyper.dropout,
                                "weight_decay": chosen["weight_decay"],
                                "hidden": chosen["hidden"], "ensemble": chosen["ensemble"],
                                "views": chosen["views"]},
            "variants": variants,
            "chosen": chosen["variant"],
            "calibration": calibration.record() | {
                "test_ece_float_before": checks["test_ece_float_before"],
                "test_ece_float_after": checks["test_ece_float_after"],
                "int8_val_top1_agreement": checks["top1_agreement"],
                "int8_val_max_prob_diff": checks["max_prob_diff"]},
            "metrics": {"val_top1_float": chosen["val_top1"],
                        "test_top1_float": chosen["test_top1"]},
            "benchmark": {"feature_images_per_s": round(speed, 1) if speed == speed else None,
                          "head_train_s": chosen["train_seconds"],
                          "total_s": round(seconds, 1)},
        },
        "how_to_train": f"smartbin train --data /path/to/{ds.root.name} --out model/{out.name}",
    }
