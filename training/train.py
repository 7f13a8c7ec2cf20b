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

from bin_controller.bins import BINS
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
    SHIFT_VIEWS,
    TRAIN_VIEWS,
    FeatureCache,
    StageFeatures,
    extract,
    shift_view,
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
# The proxy for other sites' photos (training.shift): validation photos shifted with these
# seeds choose the model; test photos shifted with others are only reported. Two draws a
# photo halve the noise of a 10 % split.
SHIFT_VAL_SEEDS = (101, 102)
SHIFT_TEST_SEEDS = (1, 2)
# L2 strengths tried by cross-validation on the training photos, and the folds.
L2_GRID = (1e-3, 1e-2, 3e-2)
CV_FOLDS = 3
# A bigger head (hidden layer, ensemble, test-time flip) is kept only when it beats the
# best simpler one by more than this on the selection score (points of top-1).
SIMPLER_MARGIN = 0.005
FAST_STEPS = 2000
SELECTION_RULE = (
    "score = mean of in-domain validation top-1 and shifted validation top-1 (seeds "
    f"{', '.join(map(str, SHIFT_VAL_SEEDS))}); the simplest candidate (no test-time flip, "
    f"then fewest hidden units x ensemble members) within {SIMPLER_MARGIN * 100:g} points of "
    "the best score is chosen; L2 by 3-fold cross-validation on the training photos (of the "
    "linear head with every view, then kept for the other new heads); the "
    "test split, shifted or not, is never used to choose")
SHIFT_PROXY = (
    "a proxy for other sites' photos, not such photos: each photo's object cut from its "
    "light backdrop (flood fill from the border), pasted at 45-95 % scale and a random "
    "place onto wood, concrete, dark metal, cardboard or coloured plastic textures, colour "
    "temperature, saturation, brightness and contrast shifted, JPEG quality 30-75; "
    "training views use other background generators")


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


def _probabilities(layers: list[Dense], x: np.ndarray, x_flip: np.ndarray | None) -> np.ndarray:
    p = softmax(forward(layers, x)[-1])
    if x_flip is not None:
        p = (p + softmax(forward(layers, x_flip)[-1])) / 2
    return p


def _variant_scores(layers: list[Dense], x: np.ndarray, x_flip: np.ndarray | None,
                    y: np.ndarray) -> float:
    return float((_probabilities(layers, x, x_flip).argmax(1) == y).mean())


def _bin_scores(layers: list[Dense], x: np.ndarray, x_flip: np.ndarray | None, y: np.ndarray,
                bin_of: np.ndarray) -> float:
    """Four-bin accuracy as the bin decides: the bin with the highest summed probability."""
    p = _probabilities(layers, x, x_flip)
    per_bin = np.zeros((len(p), len(BINS)))
    np.add.at(per_bin.T, bin_of, p.T)
    return float((per_bin.argmax(1) == bin_of[y]).mean())


def _complexity(row: dict[str, Any]) -> tuple[int, int]:
    """What a head costs on the bin: test-time flip runs the backbone twice; then size."""
    return int(row["test_time_flip"]), row["hidden"] * row["ensemble"]


def choose(candidates: list[tuple]) -> tuple:
    """The simplest candidate within SIMPLER_MARGIN of the best selection score.

    The score is the mean of in-domain and shifted validation top-1 (validation alone
    without the shifted views); the test split, shifted or not, is never looked at.
    """
    best = max(c[1]["select"] for c in candidates)
    near = [c for c in candidates if c[1]["select"] >= best - SIMPLER_MARGIN]
    return min(near, key=lambda c: (_complexity(c[1]), -c[1]["select"]))


def cross_validate_l2(features: dict[str, np.ndarray], views: tuple[str, ...], y: np.ndarray,
                      n_classes: int, *, hidden: int, dropout: float, lr: float, epochs: int,
                      batch_size: int, seed: int, grid: tuple[float, ...] = L2_GRID,
                      folds: int = CV_FOLDS) -> tuple[float, dict[str, float]]:
    """The L2 strength with the best mean top-1 on held-out folds of the training photos.

    Folds are of photos, so no view of a held-out photo is trained on; a held-out photo is
    scored on all its views, so strength that survives the augmentation counts. Ties go to
    the stronger L2.
    """
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    scores: dict[str, float] = {}
    for wd in grid:
        right = total = 0
        for k in range(folds):
            fit_on, held = fold != k, fold == k
            x = np.concatenate([features[v][fit_on] for v in views])
            layers = train_head(x, np.tile(y[fit_on], len(views)), n_classes, hidden=hidden,
                                dropout=dropout, lr=lr, epochs=epochs, batch_size=batch_size,
                                weight_decay=wd, seed=seed + k).layers
            for v in views:
                right += int((forward(layers, features[v][held])[-1].argmax(1)
                              == y[held]).sum())
                total += int(held.sum())
        scores[f"{wd:g}"] = round(right / total, 4)
    best = max(grid, key=lambda wd: (scores[f"{wd:g}"], wd))
    return best, scores


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
    train_views = TRAIN_VIEWS + SHIFT_VIEWS if search else ("center",)
    eval_views = EVAL_VIEWS if search else ("center", "flip")
    shift_val = tuple(shift_view(s, flip=f) for s in SHIFT_VAL_SEEDS for f in (False, True)) \
        if search else ()
    shift_test = tuple(shift_view(s, flip=f) for s in SHIFT_TEST_SEEDS for f in (False, True)) \
        if search else ()
    f_train, stats_tr = extract(ds.splits["train"], train_views, extractor, cache,
                                progress=progress)
    f_val, stats_va = extract(ds.splits["val"], eval_views + shift_val, extractor, cache,
                              progress=progress)
    f_test, stats_te = extract(ds.splits["test"], eval_views + shift_test, extractor, cache,
                               progress=progress)
    computed = stats_tr["computed"] + stats_va["computed"] + stats_te["computed"]
    extract_s = stats_tr["seconds"] + stats_va["seconds"] + stats_te["seconds"]
    speed = computed / extract_s if computed else float("nan")
    log(f"features: {computed} computed ({speed:.1f} images/s on this machine), "
        f"the rest from the cache")

    y = {k: np.array([s.label for s in ds.splits[k]]) for k in ("train", "val", "test")}
    n_cls = len(ds.classes)
    variants: list[dict[str, Any]] = []

    bin_of = np.array([BINS.index(ds.bins[c]) for c in ds.classes])

    def over_shifts(score, layers: list[Dense], feats: dict[str, np.ndarray],
                seeds: tuple[int, ...], labels: np.ndarray, tta: bool) -> float:
        """Mean over every shifted draw of the split (the shifted views are whole frames)."""
        return float(np.mean([score(layers, feats[shift_view(s)],
                                    feats[shift_view(s, flip=True)] if tta else None, labels)
                              for s in seeds]))

    def bins(layers, x, x_flip, labels):
        return _bin_scores(layers, x, x_flip, labels, bin_of)

    def fit(name: str, used_views: tuple[str, ...], deploy: str, *, wd: float | None = 0.0,
            hidden: int = 0, seeds: int = 1, tta: tuple[bool, ...] = (False,),
            fast: bool = False, dropout: float | None = None) -> list[tuple]:
        """Train one head; one candidate per test-time flip setting in `tta`."""
        x = np.concatenate([f_train[v] for v in used_views])
        yy = np.concatenate([y["train"]] * len(used_views))
        # The study's optimiser settings; the many-view heads take larger steps on larger
        # batches so that they train in seconds rather than minutes.
        lr, batch, epochs = (2e-3, 256, 20) if fast else (hyper.lr, hyper.batch_size,
                                                         hyper.epochs)
        if fast:  # one view is few steps an epoch: at least FAST_STEPS steps in all
            epochs = max(epochs, -(-FAST_STEPS * batch // len(x)))
        drop = hyper.dropout if dropout is None else dropout
        t0 = time.perf_counter()
        cv: dict[str, float] | None = None
        if wd is None:  # chosen by cross-validation on the training photos
            wd, cv = cross_validate_l2(f_train, used_views, y["train"], n_cls, hidden=hidden,
                                       dropout=drop, lr=lr, epochs=epochs, batch_size=batch,
                                       seed=hyper.seed)
        members = [train_head(x, yy, n_cls, hidden=hidden, dropout=drop, lr=lr,
                              epochs=epochs, batch_size=batch, weight_decay=wd,
                              seed=hyper.seed + i, x_val=f_val[deploy], y_val=y["val"])
                   for i in range(seeds)]
        layers = ensemble([m.layers for m in members])
        seconds = time.perf_counter() - t0
        flip = "full_flip" if deploy == "full" else "flip"
        out = []
        for flipped in tta:
            def on(feats: dict[str, np.ndarray], flipped: bool = flipped) -> tuple:
                return feats[deploy], feats[flip] if flipped else None

            val = _variant_scores(layers, *on(f_val), y["val"])
            test = _variant_scores(layers, *on(f_test), y["test"])
            label = name + (" + test-time flip" if flipped else "")
            row = {"variant": label, "views": list(used_views), "deploy_view": deploy,
                   "hidden": hidden, "ensemble": seeds, "weight_decay": wd, "dropout": drop,
                   "test_time_flip": flipped, "val_top1": round(val, 4),
                   "test_top1": round(test, 4), "train_seconds": round(seconds, 2),
                   "epochs": epochs, "batch_size": batch, "lr": lr,
                   "test_bin": round(bins(layers, *on(f_test), y["test"]), 4)}
            if cv is not None:
                row["cv_top1_by_l2"] = cv
            if search and deploy == "full":
                sv = over_shifts(_variant_scores, layers, f_val, SHIFT_VAL_SEEDS, y["val"],
                                 flipped)
                st = over_shifts(_variant_scores, layers, f_test, SHIFT_TEST_SEEDS, y["test"],
                                 flipped)
                sb = over_shifts(bins, layers, f_test, SHIFT_TEST_SEEDS, y["test"], flipped)
                row |= {"shift_val_top1": round(sv, 4), "shift_test_top1": round(st, 4),
                        "shift_test_bin": round(sb, 4), "select": round((val + sv) / 2, 4)}
            else:
                row["select"] = round(val, 4)
            variants.append(row)
            shifted = (f"  shifted val {row['shift_val_top1']:.2%} test "
                       f"{row['shift_test_top1']:.2%}" if "shift_val_top1" in row else "")
            log(f"  {label:62} val {val:.2%}  test {test:.2%}{shifted}  ({seconds:.1f} s)")
            out.append((layers, row, members[0].history))
        return out

    if not search:
        log("variant (the study's head only):")
        result_layers, chosen, history = fit("study: centre crop, dropout + dense",
                                             ("center",), "center")[0]
    else:
        log("variants (chosen on validation and shifted validation only; test shown for the "
            "record):")
        old = TRAIN_VIEWS
        both = TRAIN_VIEWS + SHIFT_VIEWS
        candidates = [
            *fit("logistic, whole frame, L2 by CV", ("full",), "full", wd=None, dropout=0.0,
                 fast=True),
            *fit("study head, whole frame", ("full",), "full"),
            *fit("shipped 2026.11.28: dense 512 relu dense, 14 views, L2 0.001, 3 seeds", old,
                 "full", wd=1e-3, hidden=512, seeds=3, tta=(True,), fast=True),
        ]
        linear = fit(f"dense, {len(both)} views (+ background, colour, scale), L2 by CV",
                     both, "full", wd=None, fast=True, tta=(False, True))
        candidates += linear
        wd = linear[0][1]["weight_decay"]
        candidates += fit(f"dense, 14 flip/crop/turn views, L2 {wd:g} (the CV choice above)",
                          old, "full", wd=wd, fast=True)
        candidates += fit(f"dense 512 relu dense, {len(both)} views, L2 {wd:g}", both, "full",
                          wd=wd, hidden=512, fast=True, tta=(False, True))
        candidates += fit(f"dense 512 relu dense, {len(both)} views, L2 {wd:g}, 3 seeds", both,
                          "full", wd=wd, hidden=512, seeds=3, fast=True, tta=(False, True))
        result_layers, chosen, history = choose(candidates)
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
                         check | {k: round(v, 4) for k, v in test_ece.items()},
                         bin_hint=_bin_hint(bin_map))
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
    shift = manifest["provenance"].get("shift")
    shifted = [evaluate(out, data, split="test", backbone=backbone, progress=progress,
                        shift=seed, target_accuracy=target_accuracy)
               for seed in (shift["test_seeds"] if shift else [])]
    if shifted:
        # The int8 bundle as deployed on the shifted test photos, mean over the draws.
        metrics.update(
            shift_test_top1_int8=round(float(np.mean([r["top1"] for r in shifted])), 4),
            shift_test_bin_accuracy_int8=round(float(np.mean([r["bin_accuracy"]
                                                              for r in shifted])), 4),
            shift_test_ece_int8=round(float(np.mean([r["ece"] for r in shifted])), 4))
        report["shifted"] = [{k: r[k] for k in ("shift", "n", "top1", "top5", "bin_accuracy",
                                                "ece", "bin_ece", "per_class")}
                             for r in shifted]
    if "calibration" in manifest["provenance"]:
        # Measured on the int8 bundle as deployed, not on the float head.
        manifest["provenance"]["calibration"].update(test_ece=report["ece"],
                                                     test_bin_ece=report["bin_ece"])
    write_manifest(out, manifest)
    variants = manifest["provenance"]["variants"]
    chosen = next(v for v in variants if v["variant"] == manifest["provenance"]["chosen"])
    write_report(report, out / "report", load_bundle(out),
                 extra_md=_shift_md(shifted) + _variants_md(variants, chosen,
                                                            manifest["provenance"]))
    if history:
        plots.curves_png(history, out / "report" / "training.png",
                         f"{manifest['name']} {manifest['version']}: training, train and "
                         f"validation splits ({chosen['variant']})")
    return report


def _bin_hint(bin_map: Path | None) -> str | None:
    """How the manifest's training command names the bin map: a shipped map by its name,
    never a machine path."""
    if bin_map is None:
        return None
    path = Path(bin_map)
    return path.stem if path.parent.name == "bin_maps" else path.name


def _shift_md(shifted: list[dict[str, Any]]) -> str:
    if not shifted:
        return ""
    lines = ["## The test split shifted off its backdrop (int8 bundle)", "",
             "A proxy for other sites' photos (see Variants tried), not such photos.", "",
             "| seed | n | top-1 | top-5 | four-bin accuracy | ECE |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in shifted:
        lines.append(f"| {r['shift']} | {r['n']} | {r['top1']:.2%} | {r['top5']:.2%} | "
                     f"{r['bin_accuracy']:.2%} | {r['ece']:.2%} |")
    return "\n".join(lines) + "\n\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _variants_md(variants: list[dict[str, Any]], chosen: dict[str, Any],
                 provenance: dict[str, Any] | None = None) -> str:
    provenance = provenance or {}
    rule = provenance.get("selection", "chosen on the validation split only")
    lines = ["## Variants tried", "",
             f"Float heads on the int8 backbone's features. Selection: {rule}.", ""]
    if "shift" in provenance:
        shift = provenance["shift"]
        lines += [f"Shifted: {shift['what']}. Validation seeds {shift['val_seeds']}, test "
                  f"seeds {shift['test_seeds']} (mean over the draws).", ""]
    lines += ["| variant | val top-1 | shifted val top-1 | test top-1 | shifted test top-1 "
              "| test bin acc. | shifted test bin acc. | train s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in variants:
        mark = " **(chosen)**" if v is chosen else ""
        lines.append(f"| {v['variant']}{mark} | {_pct(v['val_top1'])} | "
                     f"{_pct(v.get('shift_val_top1'))} | {_pct(v['test_top1'])} | "
                     f"{_pct(v.get('shift_test_top1'))} | {_pct(v.get('test_bin'))} | "
                     f"{_pct(v.get('shift_test_bin'))} | {v['train_seconds']} |")
    return "\n".join(lines)


def _manifest(out: Path, ds: Dataset, remote: RemoteFile, head: bytes, chosen: dict,
              hyper: Hyper, variants: list, speed: float, seconds: float,
              calibration: Calibration, checks: dict[str, float],
              bin_hint: str | None = None) -> dict[str, Any]:
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
            # The optimiser the chosen head was trained with (the many-view heads take
            # larger steps than the study's --epochs/--batch-size/--lr).
            "hyperparameters": {"epochs": chosen.get("epochs", hyper.epochs),
                                "batch_size": chosen.get("batch_size", hyper.batch_size),
                                "lr": chosen.get("lr", hyper.lr),
                                "dropout": chosen.get("dropout", hyper.dropout),
                                "weight_decay": chosen["weight_decay"],
                                "hidden": chosen["hidden"], "ensemble": chosen["ensemble"],
                                "views": chosen["views"]},
            "variants": variants,
            "chosen": chosen["variant"],
            **({"selection": SELECTION_RULE, "shift": {
                "what": SHIFT_PROXY, "val_seeds": list(SHIFT_VAL_SEEDS),
                "test_seeds": list(SHIFT_TEST_SEEDS)}} if "shift_val_top1" in chosen else {}),
            "calibration": calibration.record() | {
                "test_ece_float_before": checks["test_ece_float_before"],
                "test_ece_float_after": checks["test_ece_float_after"],
                "int8_val_top1_agreement": checks["top1_agreement"],
                "int8_val_max_prob_diff": checks["max_prob_diff"]},
            "metrics": {"val_top1_float": chosen["val_top1"],
                        "test_top1_float": chosen["test_top1"]}
            | ({"shift_val_top1_float": chosen["shift_val_top1"],
                "shift_test_top1_float": chosen["shift_test_top1"],
                "shift_test_bin_accuracy_float": chosen["shift_test_bin"]}
               if "shift_val_top1" in chosen else {}),
            "benchmark": {"feature_images_per_s": round(speed, 1) if speed == speed else None,
                          "head_train_s": chosen["train_seconds"],
                          "total_s": round(seconds, 1)},
        },
        "how_to_train": f"smartbin train --data /path/to/{ds.root.name}"
                        + (f" --bins {bin_hint}" if bin_hint else "") + f" --out model/{out.name}",
    }
