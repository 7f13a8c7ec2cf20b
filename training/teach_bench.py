"""The few-shot curve: the teach method against its two baselines, on the same draws.

Each draw picks N photos per class to teach from and scores every other photo, on the
view the bin sees; the three methods see the same draws. `python -m training.teach_bench
--data DIR` runs it on a folder of class folders (features cached) and prints a Markdown
table; `--time-teach` also times a whole teach of 26 classes x 10 photos from photo files
(features not cached) to an int8 head.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.bins import BINS
from training.head import Dense, forward, softmax
from training.teach_method import (
    expected_calibration_error,
    fit_few_shot,
    logistic_regression,
    nearest_class_mean,
)

METHODS = ("teach", "ncm", "logreg")
TITLES = {
    "teach": "teach (imprint + fit, CV-chosen, {views})",
    "ncm": "nearest class mean (imprinting alone)",
    "logreg": "logistic regression (C=1)",
    "logreg_views": "logistic regression (C=1) on the teach's views",
}
# Views the teach trains on by default: the bin's own view and its mirror image. More
# views help a little (see the README) but each costs a backbone pass per photo, and a
# teach of 260 photos must stay within 15 s on a 2-core machine.
TEACH_VIEWS = ("full", "full_flip")
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
                   teach_views: Sequence[str] = TEACH_VIEWS, ablations: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Mean top-1 and bin accuracy over draws, per method and shot, on held-out photos.

    features: raw pooled features [n_photos, width] per view (row i = photo i); labels:
    class per photo; bin_of: bin index (into BINS) per class, for the bin accuracy.
    The baselines learn from `deploy_view` only; the teach from `teach_views`. With
    `ablations`, logistic regression on the teach's views is run too, to show how much
    of the gain is the views and how much the method.
    Returns {"curve": {method: {shot: {"top1", "top1_sd", "bin_accuracy", "ece"}}},
    "teach": per draw settings/temperature/seconds, "n_photos", "draws", "shots"}.
    """
    y = np.asarray(labels, int)
    n_classes = int(y.max()) + 1
    bins = np.asarray(bin_of if bin_of is not None else [0] * n_classes, int)
    methods: dict[str, Teacher] = {
        "teach": lambda f, yy, n, s: fit_few_shot({v: f[v] for v in teach_views}, yy, n,
                                                  deploy_view=deploy_view, seed=s).layers,
        "ncm": lambda f, yy, n, s: nearest_class_mean(f[deploy_view], yy, n),
        "logreg": lambda f, yy, n, s: logistic_regression(f[deploy_view], yy, n),
    }
    if ablations:
        methods["logreg_views"] = lambda f, yy, n, s: logistic_regression(
            np.concatenate([f[v] for v in teach_views]), np.tile(yy, len(teach_views)), n)
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
                                      "top1": top1})
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
            "shots": list(shots), "teach_views": list(teach_views), "deploy_view": deploy_view}


def markdown(result: dict[str, Any]) -> str:
    """The curve as a Markdown table: top-1 / bin accuracy per shot, then the gap."""
    shots = result["shots"]
    curve = result["curve"]
    views = "+".join(result["teach_views"])
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


def _extractor(backbone: str | None):
    from bin_controller.vision import tflite_format
    from training.features import StageFeatures
    from training.train import POOLED, _backbone

    remote, original = _backbone(backbone)
    derived = tflite_format.truncate_at_tensor(original, POOLED)
    return remote, StageFeatures(derived, size=224, mean=128.0, std=128.0)


def time_teach(samples: list, views: Sequence[str], backbone: str | None, *,
               deploy_view: str = DEPLOY_VIEW) -> dict[str, float]:
    """Seconds of a whole teach from photo files: features (empty cache), fit, int8
    export. Labels are the samples' own; call with 26 groups of 10 photos."""
    from training.export_head import export_head
    from training.features import FeatureCache, extract

    started = time.perf_counter()
    remote, extractor = _extractor(backbone)
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        feats, stats = extract(samples, tuple(views), extractor,
                               FeatureCache(Path(tmp), remote.sha256), progress=False)
    extracted = time.perf_counter()
    labels = np.array([s.label for s in samples])
    result = fit_few_shot(feats, labels, int(labels.max()) + 1, deploy_view=deploy_view)
    fitted = time.perf_counter()
    q = extractor.quant
    export_head(result.layers, feats[deploy_view], input_scale=q.scale,
                input_zero_point=q.zero_point - 128 if q.dtype is np.uint8 else q.zero_point)
    done = time.perf_counter()
    return {"photos": len(samples), "views": len(views), "load_backbone_s": loaded - started,
            "features_s": extracted - loaded, "images_per_s": stats["images_per_s"],
            "fit_s": fitted - extracted, "export_s": done - fitted, "total_s": done - started,
            "settings": result.settings.describe(), "cv": result.cv_scheme}


def _timed_samples(samples: list, seed: int) -> list:
    """26 groups of 10 photos made from the dataset's photos, labelled by group: the
    shape of a real teach (the groups need not be meaningful to time it)."""
    from training.dataset import Sample

    rng = np.random.default_rng(seed)
    picked = rng.choice(len(samples), TIMED_CLASSES * TIMED_SHOTS, replace=False)
    return [Sample(samples[i].path, samples[i].rel, k // TIMED_SHOTS, samples[i].sha256)
            for k, i in enumerate(picked)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.teach_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of class folders")
    parser.add_argument("--bin-map", type=Path, help="class -> bin JSON (e.g. trashnet)")
    parser.add_argument("--backbone", help="MobileNetV2 .tflite file or folder")
    parser.add_argument("--cache", type=Path, help="feature cache folder "
                        "(default: smartbin's cache folder)")
    parser.add_argument("--shots", default="1,5,10,20")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", default=",".join(TEACH_VIEWS),
                        help="views the teach learns from (training.features.TRAIN_VIEWS)")
    parser.add_argument("--ablations", action="store_true",
                        help="also logistic regression on the teach's views")
    parser.add_argument("--time-teach", action="store_true",
                        help="also time a teach of 26 classes x 10 photos, features uncached")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per draw")
    args = parser.parse_args(argv)

    from bin_controller.vision.fetch import cache_dir
    from training.dataset import SPLITS, load_dataset
    from training.features import FeatureCache, extract

    shots = [int(s) for s in args.shots.split(",")]
    views = tuple(v for v in args.views.split(",") if v)
    ds = load_dataset(args.data, bin_map=args.bin_map)
    samples = sorted((s for part in SPLITS for s in ds.splits[part]), key=lambda s: s.rel)
    started = time.perf_counter()
    remote, extractor = _extractor(args.backbone)
    cache = FeatureCache(args.cache or cache_dir() / "features", remote.sha256)
    all_views = tuple(dict.fromkeys((DEPLOY_VIEW, *views)))
    feats, stats = extract(samples, all_views, extractor, cache)
    print(f"features: {len(samples)} photos x {len(all_views)} views, {stats['computed']} "
          f"computed in {stats['seconds']:.1f} s, the rest cached", file=sys.stderr)
    labels = np.array([s.label for s in samples])
    bin_of = [BINS.index(ds.bins[c]) for c in ds.classes]
    result = few_shot_curve(feats, labels, bin_of=bin_of, shots=shots, draws=args.draws,
                            seed=args.seed, teach_views=views, ablations=args.ablations,
                            log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None)
    seconds = time.perf_counter() - started
    print(f"## Few-shot curve: {args.data.name}, {len(ds.classes)} classes\n")
    print(markdown(result))
    fits = [t["seconds"] for t in result["teach"]]
    print(f"\nRun time {seconds:.0f} s (features cached); a teach fit took "
          f"{np.median(fits):.2f} s median, {max(fits):.2f} s at most.")
    if args.time_teach:
        timed = time_teach(_timed_samples(samples, args.seed), views, args.backbone)
        print(f"\nTeach of {TIMED_CLASSES} classes x {TIMED_SHOTS} photos from files "
              f"({timed['views']} views, features not cached): {timed['total_s']:.1f} s = "
              f"backbone load {timed['load_backbone_s']:.1f} s + features "
              f"{timed['features_s']:.1f} s ({timed['images_per_s']:.0f} images/s) + fit "
              f"{timed['fit_s']:.1f} s ({timed['cv']}; chose {timed['settings']}) + int8 "
              f"export {timed['export_s'] * 1000:.0f} ms.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
