"""The few-shot curve: the teach method against its two baselines, on the same draws.

Each draw picks N photos per class to teach from and scores every other photo, on the
view the bin sees; the three methods see the same draws. `smartbin bench teach --data DIR`
(or `python -m training.teach_bench`, same options) runs it on a folder of class folders
(features cached), prints a Markdown table, and times a whole teach of 26 classes x 10
photos from photo files (features not cached) to a written bundle, with an estimate for a
Raspberry Pi 4; `--json` and `--plot` write the numbers and the curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.bins import BINS
from bin_controller.errors import SmartbinError
from training.features import DEPLOY_CROP
from training.head import Dense, forward, softmax
from training.teach import VIEW_ORDER
from training.teach import teach_views as views_for
from training.teach_method import (
    LOGREG_C,
    expected_calibration_error,
    fit_few_shot,
    logistic_regression,
    nearest_class_mean,
)

METHODS = ("teach", "ncm", "logreg")
TITLES = {
    "teach": "teach (imprint + fit, CV-chosen, {views})",
    "ncm": "nearest class mean (imprinting alone)",
    "logreg": "logistic regression (C=1, standardised features)",
    "logreg_views": "logistic regression (C=1, standardised features) on the teach's views",
}
# The view the bin sees: the baselines learn from it, and held-out photos are scored on it.
# The teach's views are its own rule by default (training.teach.teach_views: more views
# for fewer photos, within a budget of backbone passes).
DEPLOY_VIEW = "full"
# Photos and classes of the timed teach: the 26 classes x 10 photos.
TIMED_CLASSES, TIMED_SHOTS = 26, 10

Teacher = Callable[[Mapping[str, np.ndarray], np.ndarray, int, int], list[Dense]]


def _bin_decision(probs: np.ndarray, bin_of: np.ndarray) -> np.ndarray:
    """The bin the bin picks: the one with the highest summed label probability."""
    per_bin = np.zeros((len(probs), len(BINS)))
    for label, b in enumerate(bin_of):
        per_bin[:, b] += probs[:, label]
    return per_bin.argmax(1)


def _draw(labels: np.ndarray, n_classes: int, shot: int,
          rng: np.random.Generator) -> np.ndarray:
    """Indices of `shot` photos per class (all of a class's photos but one when it has
    fewer, so that every class keeps a photo to be scored on)."""
    picked = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, min(shot, len(idx) - 1), replace=False))
    return np.sort(np.concatenate(picked))


def few_shot_curve(features: Mapping[str, np.ndarray], labels: np.ndarray, *,
                   bin_of: Sequence[int] | None = None, shots: Sequence[int] = (1, 5, 10, 20),
                   draws: int = 5, seed: int = 0, deploy_view: str = DEPLOY_VIEW,
                   teach_views: Sequence[str] | None = None, ablations: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Mean top-1 and bin accuracy over draws, per method and shot, on held-out photos.

    features: raw pooled features [n_photos, width] per view (row i = photo i); labels:
    class per photo; bin_of: bin index (into BINS) per class, for the bin accuracy.
    The baselines learn from `deploy_view` only; the teach from `teach_views`, or when
    None from the views a teach of that many photos takes (`training.teach.teach_views`).
    With `ablations`, logistic regression on the teach's views is run too, to show how
    much of the gain is the views and how much the method.
    Returns {"curve": {method: {shot: {"top1", "top1_sd", "bin_accuracy", "ece"}}},
    "teach": per draw settings/temperature/seconds, "n_photos", "draws", "shots"}.
    """
    y = np.asarray(labels, int)
    n_classes = int(y.max()) + 1
    bins = np.asarray(bin_of if bin_of is not None else [0] * n_classes, int)
    crop = DEPLOY_CROP.get(deploy_view, "none")

    def views_of(n_photos: int) -> tuple[str, ...]:
        return tuple(teach_views) if teach_views else views_for(crop, n_photos)

    def teach(f: Mapping[str, np.ndarray], yy: np.ndarray, n: int, s: int) -> list[Dense]:
        return fit_few_shot({v: f[v] for v in views_of(len(yy))}, yy, n,
                            deploy_view=deploy_view, seed=s).layers

    def logreg_views(f: Mapping[str, np.ndarray], yy: np.ndarray, n: int,
                     _s: int) -> list[Dense]:
        views = views_of(len(yy))
        return logistic_regression(np.concatenate([f[v] for v in views]),
                                   np.tile(yy, len(views)), n)

    methods: dict[str, Teacher] = {
        "teach": teach,
        "ncm": lambda f, yy, n, s: nearest_class_mean(f[deploy_view], yy, n),
        "logreg": lambda f, yy, n, s: logistic_regression(f[deploy_view], yy, n),
    }
    if ablations:
        methods["logreg_views"] = logreg_views
    scores: dict[str, dict[int, list[tuple[float, float, float]]]] = {
        m: {s: [] for s in shots} for m in methods}
    teach_log: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for shot in shots:
        for d in range(draws):
            taught = _draw(y, n_classes, shot, rng)
            held = np.setdiff1d(np.arange(len(y)), taught)
            sub = {v: np.asarray(features[v])[taught] for v in features}
            x_held, y_held = np.asarray(features[deploy_view])[held], y[held]
            for name, teach in methods.items():
                started = time.perf_counter()
                layers = teach(sub, y[taught], n_classes, seed + d)
                seconds = time.perf_counter() - started
                probs = softmax(forward(layers, x_held)[-1])
                top1 = float((probs.argmax(1) == y_held).mean())
                bin_acc = float((_bin_decision(probs, bins) == bins[y_held]).mean())
                ece = expected_calibration_error(probs, y_held)
                scores[name][shot].append((top1, bin_acc, ece))
                if name == "teach":
                    teach_log.append({"shot": shot, "draw": d, "seconds": round(seconds, 3),
                                      "top1": top1, "views": len(views_of(len(taught)))})
            if log:
                log(f"{shot} photos/class, draw {d + 1}/{draws}: " + ", ".join(
                    f"{m} {scores[m][shot][-1][0]:.1%}" for m in methods))
    curve = {m: {s: {"top1": float(np.mean([r[0] for r in rs])),
                     "top1_sd": float(np.std([r[0] for r in rs])),
                     "bin_accuracy": float(np.mean([r[1] for r in rs])),
                     "ece": float(np.mean([r[2] for r in rs]))}
                 for s, rs in per.items()} for m, per in scores.items()}
    # What always answering the commonest bin would score: the floor for bin accuracy.
    majority = float(np.bincount(bins[y]).max() / len(y))
    return {"curve": curve, "teach": teach_log, "n_photos": len(y), "draws": draws,
            "majority_bin_accuracy": majority,
            "shots": list(shots), "deploy_view": deploy_view,
            "teach_views": {s: list(views_of(s * n_classes)) for s in shots}}


def markdown(result: dict[str, Any]) -> str:
    """The curve as a Markdown table: top-1 / bin accuracy per shot, then the gap."""
    shots = result["shots"]
    curve = result["curve"]
    views = _views_text(result["teach_views"])
    head = "| method | " + " | ".join(f"{s} photo{'s' if s > 1 else ''}/class" for s in shots)
    lines = [head + " |", "| --- |" + " ---: |" * len(shots)]
    for m, per in curve.items():
        title = TITLES[m].format(views=views)
        cells = [f"{per[s]['top1']:.1%} / {per[s]['bin_accuracy']:.1%}" for s in shots]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    gap = [min(curve["teach"][s]["top1"] - curve[b][s]["top1"] for b in ("ncm", "logreg"))
           for s in shots]
    lines.append("| teach minus the better baseline, top-1 | "
                 + " | ".join(f"{g * 100:+.1f} pt" for g in gap) + " |")
    lines.append("| ECE of the teach (calibrated) on held-out photos | "
                 + " | ".join(f"{curve['teach'][s]['ece']:.3f}" for s in shots) + " |")
    lines += ["", f"Top-1 / bin accuracy on the held-out photos ({result['deploy_view']} "
              f"view), mean of {result['draws']} draws over {result['n_photos']} photos; the "
              "same draws for every method. Always answering the commonest bin would score "
              f"{result['majority_bin_accuracy']:.1%} bin accuracy."]
    return "\n".join(lines)


def _views_text(teach_views: Mapping[Any, Sequence[str]] | Sequence[str]) -> str:
    """How many views the teach took, e.g. `8 views`, or per shot when that varied:
    `8 views at 1, 5, 10 photos/class, 4 at 20`."""
    if not isinstance(teach_views, Mapping):
        return "+".join(teach_views)
    groups: dict[int, list[str]] = {}
    for shot, views in teach_views.items():
        groups.setdefault(len(views), []).append(str(shot))
    if len(groups) == 1:
        return f"{next(iter(groups))} views"
    return ", ".join(f"{n} {'views ' if i == 0 else ''}at {', '.join(shots)}"
                     + (" photos/class" if i == 0 else "")
                     for i, (n, shots) in enumerate(groups.items()))


def _extractor(backbone: str | None) -> tuple[Any, Any]:
    from bin_controller.vision import tflite_format
    from training.features import StageFeatures
    from training.train import POOLED, _backbone

    remote, original = _backbone(backbone)
    derived = tflite_format.truncate_at_tensor(original, POOLED)
    return remote, StageFeatures(derived, size=224, mean=128.0, std=128.0)


def _invoke_seconds(extractor: Any, runs: int = 20) -> float:
    """Median seconds of one bare backbone run (no photo decoding or resizing), after
    warm-up: what the Raspberry Pi estimate replaces by the Pi's own invoke time."""
    pixels = np.full((224, 224, 3), 128, np.uint8)
    for _ in range(3):
        extractor.raw_pixels(pixels)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        extractor.raw_pixels(pixels)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def time_teach(samples: list, views: Sequence[str] | None, backbone: str | None, *,
               deploy_view: str = DEPLOY_VIEW) -> dict[str, Any]:
    """Seconds of a whole teach from photo files to a written bundle: backbone load,
    features (empty cache), fit with its cross-validation, int8 export, bundle written.
    Labels are the samples' own; call with 26 groups of 10 photos. views: None for the
    teach's own rule."""
    from bin_controller.vision.bundle import load_bundle, write_manifest
    from training.export_head import export_head
    from training.features import FeatureCache, extract

    views = tuple(views) if views else views_for(DEPLOY_CROP.get(deploy_view, "none"), len(samples))
    started = time.perf_counter()
    remote, extractor = _extractor(backbone)
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        feats, stats = extract(samples, tuple(views), extractor,
                               FeatureCache(Path(tmp) / "cache", remote.sha256), progress=False)
        extracted = time.perf_counter()
        labels = np.array([s.label for s in samples])
        n_classes = int(labels.max()) + 1
        result = fit_few_shot(feats, labels, n_classes, deploy_view=deploy_view)
        fitted = time.perf_counter()
        q = extractor.quant
        head = export_head(result.layers, feats[deploy_view], input_scale=q.scale,
                           input_zero_point=q.zero_point - 128 if q.dtype is np.uint8
                           else q.zero_point)
        out = Path(tmp) / "bundle"
        out.mkdir()
        (out / "head.tflite").write_bytes(head)
        write_manifest(out, _timed_manifest(remote, head, n_classes, result.record()))
        done = time.perf_counter()
        load_bundle(out)  # the written bundle is one the bin can load
    invoke_s = _invoke_seconds(extractor)
    images = len(samples) * len(views)
    return {"photos": len(samples), "classes": n_classes, "views": len(views),
            "images": images, "load_backbone_s": loaded - started,
            "features_s": extracted - loaded, "images_per_s": stats["images_per_s"],
            "invoke_s": invoke_s, "fit_s": fitted - extracted, "export_s": done - fitted,
            "total_s": done - started, "settings": result.settings.describe(),
            "cv": result.cv_scheme, "pi4": pi4_estimate(
                images=images, features_s=extracted - loaded, invoke_s=invoke_s,
                other_s=(loaded - started) + (done - extracted))}


def _timed_manifest(remote: Any, head: bytes, n_classes: int,
                    teach: dict[str, Any]) -> dict[str, Any]:
    """A bundle manifest like the teach's, for labels made up for the timing."""
    from bin_controller.bins import BINS as BIN_NAMES
    from bin_controller.vision.fetch import sha256_bytes
    from training.train import POOLED

    return {
        "format": 1, "name": "teach-timing", "version": "0",
        "input": {"size": [224, 224], "color": "RGB", "crop": "none", "crop_fraction": 1.0,
                  "mean": 128.0, "std": 128.0},
        "output": "probabilities",
        "labels": [{"name": f"group_{k}", "bin": BIN_NAMES[k % len(BIN_NAMES)]}
                   for k in range(n_classes)],
        "stages": [
            {"role": "backbone", "source": {"url": remote.url, "sha256": remote.sha256,
                                            "member": remote.member}, "output": POOLED},
            {"role": "head", "file": "head.tflite", "sha256": sha256_bytes(head)},
        ],
        "provenance": {"teach": teach},
    }


# The Raspberry Pi 4 estimate. Assumed, not measured here: one int8 MobileNetV2 224 x 224
# invoke on the Pi 4's four Cortex-A72 cores with TFLite/XNNPACK takes 20-40 ms in the
# commonly published benchmark figures; the middle is used. The rest of the teach (photo
# decoding and resizing, the numpy fit, the export) runs at single-core speed, assumed
# PI4_CPU_SLOWDOWN times slower than on the development machine (a 1.5 GHz A72 against a
# recent x86 core). Both are assumptions: the estimate says how far off 15 s the Pi would
# be, not what it measures.
PI4_INVOKE_S = 0.030
PI4_INVOKE_RANGE_S = (0.020, 0.040)
PI4_CPU_SLOWDOWN = 4.0


def pi4_estimate(*, images: int, features_s: float, invoke_s: float,
                 other_s: float) -> dict[str, float]:
    """Seconds a teach would take on a Raspberry Pi 4, from this machine's measurements:
    per backbone image the Pi's assumed invoke time plus this machine's per-image overhead
    (decoding, resizing) slowed down, plus the rest of the teach slowed down."""
    per_image_here = features_s / images if images else 0.0
    overhead = max(per_image_here - invoke_s, 0.0) * PI4_CPU_SLOWDOWN

    def total(invoke: float) -> float:
        return images * (invoke + overhead) + other_s * PI4_CPU_SLOWDOWN

    return {"seconds": total(PI4_INVOKE_S), "low_s": total(PI4_INVOKE_RANGE_S[0]),
            "high_s": total(PI4_INVOKE_RANGE_S[1]), "assumed_invoke_s": PI4_INVOKE_S,
            "assumed_cpu_slowdown": PI4_CPU_SLOWDOWN}


def _timed_samples(samples: list, seed: int) -> list:
    """26 groups of 10 photos made from the dataset's photos, labelled by group: the
    shape of a real teach (the groups need not be meaningful to time it). A smaller
    dataset gives fewer groups: every photo once, in groups of 10."""
    from training.dataset import Sample

    rng = np.random.default_rng(seed)
    n = min(TIMED_CLASSES * TIMED_SHOTS, len(samples))
    picked = rng.choice(len(samples), n, replace=False)
    return [Sample(samples[i].path, samples[i].rel, k // TIMED_SHOTS, samples[i].sha256)
            for k, i in enumerate(picked)]


def timing_text(timed: dict[str, Any]) -> str:
    pi = timed["pi4"]
    return (
        f"Teach of {timed['classes']} classes x {TIMED_SHOTS} photos ({timed['photos']} "
        f"photos, {timed['views']} views each, features not cached) to a written bundle: "
        f"{timed['total_s']:.1f} s = backbone load {timed['load_backbone_s']:.1f} s + "
        f"features {timed['features_s']:.1f} s + fit {timed['fit_s']:.1f} s "
        f"({timed['cv']}; chose {timed['settings']}) + int8 export and bundle "
        f"{timed['export_s'] * 1000:.0f} ms.\n"
        f"Feature rate: {timed['images_per_s']:.0f} images/s "
        f"({timed['images_per_s'] / timed['views']:.0f} photos/s at {timed['views']} views); "
        f"a bare backbone invoke {timed['invoke_s'] * 1000:.1f} ms.\n"
        f"Raspberry Pi 4 estimate (not measured): {pi['seconds']:.0f} s "
        f"({pi['low_s']:.0f}-{pi['high_s']:.0f} s), assuming an int8 MobileNetV2 invoke of "
        f"{pi['assumed_invoke_s'] * 1000:.0f} ms ({PI4_INVOKE_RANGE_S[0] * 1000:.0f}-"
        f"{PI4_INVOKE_RANGE_S[1] * 1000:.0f} ms in published TFLite figures for 4 Cortex-A72 "
        f"cores) and the rest {pi['assumed_cpu_slowdown']:g}x slower than here.")


def parse_shots(text: str) -> list[int]:
    """`1,5,10` as photos per class, each at least 1; one line naming the option if not."""
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise SmartbinError(f"--shots {text!r}: give photos per class as whole numbers of "
                            "at least 1, comma-separated, e.g. 1,5,10,20")
    return sorted(set(shots))


def bench(*, data: Path, bins: str | Path | None, backbone: str | None,
          cache: Path | None, shots: Sequence[int], draws: int, seed: int,
          views: Sequence[str] | None, ablations: bool = False, time_it: bool = True,
          json_out: Path | None = None, plot_out: Path | None = None,
          verbose: bool = False) -> dict[str, Any]:
    """The whole bench: features (cached), the curve, the timed teach; prints the table
    and timing, writes the JSON and the plot when asked. Returns the JSON document."""
    from bin_controller.vision.bundle import find_bin_map
    from bin_controller.vision.fetch import cache_dir
    from training import plots
    from training.dataset import SPLITS, load_dataset
    from training.features import TRAIN_VIEWS, FeatureCache, extract

    if views is not None:
        unknown = [v for v in views if v not in TRAIN_VIEWS]
        if unknown or not views:
            raise SmartbinError(f"--views {','.join(views)!r}: auto, or views among "
                                f"{', '.join(TRAIN_VIEWS)}")
    if draws < 1:
        raise SmartbinError(f"--draws {draws}: give at least 1")
    for out in (json_out, plot_out):
        if out is not None and not Path(out).parent.is_dir():
            raise SmartbinError(f"{out}: its folder does not exist; create it or write "
                                "elsewhere")
    if plot_out is not None:
        plots.require()  # before minutes of work, not after
    ds = load_dataset(data, bin_map=find_bin_map(bins) if bins else None)
    samples = sorted((s for part in SPLITS for s in ds.splits[part]), key=lambda s: s.rel)
    started = time.perf_counter()
    remote, extractor = _extractor(backbone)
    store = FeatureCache(cache or cache_dir() / "features", remote.sha256)
    # With the teach's own rule, every view it may take (the fewer photos, the more).
    wanted = views if views is not None else VIEW_ORDER[DEPLOY_CROP[DEPLOY_VIEW]]
    all_views = tuple(dict.fromkeys((DEPLOY_VIEW, *wanted)))
    feats, stats = extract(samples, all_views, extractor, store)
    print(f"features: {len(samples)} photos x {len(all_views)} views, {stats['computed']} "
          f"computed in {stats['seconds']:.1f} s, the rest cached", file=sys.stderr)
    labels = np.array([s.label for s in samples])
    bin_of = [BINS.index(ds.bins[c]) for c in ds.classes]
    result = few_shot_curve(feats, labels, bin_of=bin_of, shots=shots, draws=draws,
                            seed=seed, teach_views=views, ablations=ablations,
                            log=(lambda m: print(m, file=sys.stderr)) if verbose else None)
    seconds = time.perf_counter() - started
    name = Path(data).resolve().name
    print(f"## Few-shot curve: {name}, {len(ds.classes)} classes\n")
    print(markdown(result))
    fits = [t["seconds"] for t in result["teach"]]
    print(f"\nRun time {seconds:.0f} s (features cached); a teach fit took "
          f"{np.median(fits):.2f} s median, {max(fits):.2f} s at most.")
    timed = None
    if time_it:
        timed = time_teach(_timed_samples(samples, seed), views, backbone)
        print("\n" + timing_text(timed))
    doc = {"data": name, "classes": ds.classes, "bins": [ds.bins[c] for c in ds.classes],
           **result, "methods": {m: TITLES[m].format(views=_views_text(result["teach_views"]))
                                 for m in result["curve"]},
           "logreg_c": LOGREG_C, "teach_time": timed}
    if json_out is not None:
        Path(json_out).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if plot_out is not None:
        plots.few_shot_png(doc, Path(plot_out), title=f"Few-shot curve on {name} "
                           f"({len(ds.classes)} classes, held-out photos, mean of {draws} "
                           f"draw{'s' if draws > 1 else ''})")
    return doc


def run(args: argparse.Namespace) -> int:
    """`smartbin bench teach`."""
    bench(data=args.data, bins=args.bins, backbone=args.backbone, cache=args.cache,
          shots=parse_shots(args.shots), draws=args.draws, seed=args.seed,
          views=None if args.views == "auto" else tuple(v for v in args.views.split(",") if v),
          ablations=args.ablations,
          time_it=not args.no_time, json_out=args.json, plot_out=args.plot,
          verbose=args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    from bin_controller.cli import add_bench_teach_options

    parser = argparse.ArgumentParser(prog="python -m training.teach_bench",
                                     description=(__doc__ or "").splitlines()[0])
    add_bench_teach_options(parser)
    # The spellings of the README's earlier command line.
    parser.add_argument("--bin-map", dest="bins", help=argparse.SUPPRESS)
    parser.add_argument("--time-teach", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SmartbinError as exc:
        print(f"teach_bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
