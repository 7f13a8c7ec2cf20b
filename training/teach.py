"""`smartbin teach`: a few photos in, a new version of a bundle out, checked before it is used.

The base bundle's backbone stage stays as it is and its head's labels are kept exactly
(their rows are the teach's `base_head`); the photos add labels next to them. Every photo
given is used (no 8:1:1 split: at ten photos a class there is nothing to spare); the
features of each photo are computed once and cached like `smartbin train`'s.

A taught bundle is checked before it is written or installed (`check`): on a per-class
holdout of the photos when every class has at least `HOLDOUT_MIN` (a second teach without
them, scored on them), else on the teach's own cross-validation, and on the base bundle's
test split (`split.json` and `--base-data`). It is refused when it is more than `margin`
points worse than the base on the base's labels: a new label that takes old items is the
way a teach makes the bin worse.

With a base that has no weights (`garbage120`) the base only gives the vocabulary (names,
English names, bins); the photos' labels become the head, on the study's backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.bins import BINS, PREFIX_TO_BIN, bin_from_prefix
from bin_controller.errors import BundleError, DatasetError, SmartbinError
from bin_controller.vision import tflite_format
from bin_controller.vision.backends import make_interpreter
from bin_controller.vision.bundle import Bundle, Label, load_bundle, write_manifest
from bin_controller.vision.classifier import Quant, StageRunner, dequantize, quantize
from bin_controller.vision.fetch import cache_dir, sha256_bytes
from hardware_sim.sources import IMAGE_SUFFIXES
from training.dataset import Sample, load_split
from training.evaluate import SPLIT_FILE, save_float_head
from training.export_head import export_head
from training.features import FeatureCache, StageFeatures, extract
from training.head import Dense
from training.teach_method import TeachResult, fit_few_shot

# A class needs this many photos before one in five is held out to check the teach;
# below it the teach's cross-validation is the check (held-out photos of a class of four
# would be a single photo, one coin toss of a score).
HOLDOUT_MIN = 5
HOLDOUT_FRACTION = 0.2
DEFAULT_MARGIN = 2.0  # points of top-1 on the old labels a teach may lose
# The views a teach learns from, in the order they are added: what the bin sees and its
# mirror image, then crops and turned copies (waste has no up). With few photos more views
# help (TrashNet, 20 draws, top-1 at 5 / 10 photos per class: 2 views 60.6 / 66.2, 8 views
# 61.1 / 67.5, 14 no better), but each costs a backbone pass per photo, so a teach takes
# as many as VIEW_BUDGET passes allow, from 2 to MAX_VIEWS: 26 labels x 10 photos get 2.
# A bin that crops its frames square keeps the two: the whole frame squashed square is an
# item it never sees, and the eight turns of the square, which nothing here has measured
# helping, cost the demo 2 of its 40 old items in the teach scenario (drink cans taken by
# the taught grapes). The background
# swaps `train` uses (training.shift) are left out: a teach learns from the bin's own
# camera, the place it will sort in, and on those draws four of them cost 3 points
# (57.3 / 62.9).
VIEW_ORDER = {
    "none": ("full", "full_flip", "center", "flip", "full_r180", "full_vflip", "c_r90",
             "c_r270"),
    "center": ("center", "flip"),
}
VIEW_BUDGET = 480
MAX_VIEWS = 8
# The study's backbone, for a base without weights or no base at all.
STUDY_INPUT = {"size": [224, 224], "color": "RGB", "crop": "none", "crop_fraction": 1.0,
               "mean": 128.0, "std": 128.0}

Log = Callable[[str], None]
# (phase, done, total): features (a backbone pass per photo and view), fitting (the head
# fits: the holdout check's and the final one), checking (the base's test photos).
Progress = Callable[[str, int, int], None]


def teach_views(crop: str, n_photos: int) -> tuple[str, ...]:
    """The views a teach of n_photos learns from, for a bin that crops its frames so
    (`input.crop`): the deploy view and its mirror first."""
    order = VIEW_ORDER.get(crop, VIEW_ORDER["none"])
    return order[:min(MAX_VIEWS, max(2, VIEW_BUDGET // max(n_photos, 1)))]


@dataclass
class TeachOutcome:
    out: Path | None
    manifest: dict[str, Any]
    evaluation: dict[str, Any]
    accepted: bool
    seconds: float


class Rejected(SmartbinError):
    """The taught bundle is worse than its base on the base's labels."""

    def __init__(self, message: str, evaluation: dict[str, Any]) -> None:
        super().__init__(message)
        self.evaluation = evaluation


# ------------------------------------------------------------------ photos and labels


@dataclass(frozen=True)
class _Folder:
    name: str
    label: Label
    base_index: int | None  # the label's row in the base head, if it has one


def _photos(data: Path, log: Log) -> dict[str, list[Path]]:
    """Class folder -> its photo files; an empty folder or a photo that does not decode
    is the user's to fix, so it is an error, not a skip."""
    from PIL import Image

    if not data.is_dir():
        raise DatasetError(f"{data}: no such folder (expected one subfolder of photos per "
                           "label, named like 可回收物_易拉罐)")
    out: dict[str, list[Path]] = {}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()
                         and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not p.name.startswith("."))
        photos = []
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                log(f"skipped {path.relative_to(data)}: not an image file")
                continue
            try:
                with Image.open(path) as im:
                    im.load()  # verify() misses truncated pixel data
            except Exception as exc:
                raise DatasetError(f"{path}: cannot be read as a photo ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:80]}); replace or remove "
                                   "it") from exc
            photos.append(path)
        if not photos:
            raise DatasetError(f"{folder}: empty class folder (no photos); put photos of "
                               f"{folder.name!r} in it or remove it")
        out[folder.name] = photos
    if not out:
        raise DatasetError(f"{data}: no class folders (expected one subfolder of photos per "
                           "label, named like 可回收物_易拉罐)")
    return out


def _item(name: str) -> tuple[str | None, str]:
    """(bin named by the standard's prefix, the rest): `可回收物_glass` -> recyclable, glass."""
    prefix, _, rest = name.partition("_")
    if rest and prefix in PREFIX_TO_BIN:
        return PREFIX_TO_BIN[prefix], rest
    return None, name


def _bins_file(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    from bin_controller.vision.bundle import find_bin_map

    found = find_bin_map(path)
    try:
        raw = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{found}: cannot read the bin map: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v in BINS
                                            for v in raw.values()):
        raise DatasetError(f"{found}: a bin map is a JSON object of class folder -> bin "
                           f"({', '.join(BINS)})")
    return raw


def match_labels(folders: Sequence[str], vocabulary: Sequence[Label],
                 bins: dict[str, str], where: Path) -> list[_Folder]:
    """Each class folder's label: one of the base's (by name, or by the name after the
    standard's prefix, as `smartbin review export` writes `可回收物_glass` for `glass`), or a
    new one whose bin comes from the folder's prefix or --bins."""
    by_name = {lab.name: i for i, lab in enumerate(vocabulary)}
    by_item: dict[str, int] = {}
    for i, lab in enumerate(vocabulary):
        by_item.setdefault(_item(lab.name)[1], i)
    out = []
    for name in folders:
        prefix_bin, item = _item(name)
        given = bins.get(name)
        if given and prefix_bin and given != prefix_bin:
            raise DatasetError(f"{where / name}: the folder's prefix says {prefix_bin} but "
                               f"--bins says {given}; rename the folder or fix the bin map")
        index = by_name.get(name)
        if index is None and prefix_bin is not None:
            index = by_item.get(item)
        if index is not None:
            known = vocabulary[index]
            said = given or prefix_bin
            if said and said != known.bin:
                raise DatasetError(
                    f"{where / name}: {known.name!r} goes in {known.bin} in the base bundle, "
                    f"but this folder says {said}; use the base's bin, or a new label name")
            out.append(_Folder(name, known, index))
            continue
        bin_name = given or prefix_bin or bin_from_prefix(name)
        if bin_name is None:
            raise DatasetError(
                f"{where / name}: class folder {name!r} has no bin: name it with the "
                f"standard's prefix (e.g. 其他垃圾_{name}) or give --bins FILE with "
                f'{{"{name}": "other"}}')
        out.append(_Folder(name, Label(name, item.replace("_", " "), bin_name), None))
    return out


# ------------------------------------------------------------------ models


@dataclass
class _Backbone:
    stage: dict[str, Any]  # the manifest's stage entry, copied into the new bundle
    file: Path | None  # a stage file to copy beside it
    extractor: StageFeatures
    cache_key: str


def _base_backbone(base: Bundle, backbone: str | None, backend: str,
                   threads: int = 2) -> tuple[_Backbone,
                                                                               list[Dense]]:
    """The base's first stage as the feature extractor, and its head as dense layers."""
    if len(base.stages) != 2:
        raise BundleError(f"{base.path}: teach needs a bundle of a backbone stage and a head "
                          f"stage; {base.name} has {len(base.stages)} stage(s)")
    models = base.stage_models(backbone=backbone)
    try:
        head = tflite_format.read_dense_head(models[1])
    except tflite_format.TFLiteFormatError as exc:
        raise BundleError(f"{base.stage_where(base.stages[1])}: not a dense head a teach can "
                          f"extend ({exc})") from exc
    spec = base.input
    if spec.width != spec.height:
        raise BundleError(f"{base.path}: teach needs a square input, not "
                          f"{spec.width}x{spec.height}")
    extractor = StageFeatures(models[0], size=spec.width, mean=spec.mean, std=spec.std,
                              backend=backend, num_threads=threads)
    stage = dict(base.manifest["stages"][0])
    first = base.stages[0]
    if first.source is not None:
        # The key `smartbin train` uses for the same backbone, so their caches are shared.
        from training.train import POOLED

        key = first.source.sha256 if first.output == POOLED else hashlib.sha256(
            f"{first.source.sha256}:{first.output}".encode()).hexdigest()
        file = None
    else:
        key = hashlib.sha256(f"{first.sha256}:{first.output}:{spec}".encode()).hexdigest()
        file = base.path / str(first.file)
    layers = [Dense(d.weight.astype(np.float32), d.bias.astype(np.float32), d.relu)
              for d in head]
    return _Backbone(stage, file, extractor, key), layers


def _study_backbone(backbone: str | None, backend: str, threads: int = 2) -> _Backbone:
    from training.train import POOLED, _backbone

    remote, original = _backbone(backbone)
    try:
        derived = tflite_format.truncate_at_tensor(original, POOLED)
    except tflite_format.TFLiteFormatError as exc:
        raise SmartbinError(f"backbone: {exc}") from exc
    extractor = StageFeatures(derived, size=224, mean=128.0, std=128.0, backend=backend,
                              num_threads=threads)
    stage = {"role": "backbone", "source": {"url": remote.url, "sha256": remote.sha256,
                                            "member": remote.member}, "output": POOLED}
    return _Backbone(stage, None, extractor, remote.sha256)


class _Head:
    """An int8 head run on cached backbone outputs: exactly what the bin computes after
    the backbone, for a whole set of photos in milliseconds."""

    def __init__(self, model: bytes, features: Quant, backend: str) -> None:
        _, interpreter = make_interpreter(backend, model, num_threads=1, where="head")
        self.runner = StageRunner(interpreter, "head")
        self.features = features

    def probabilities(self, real: np.ndarray) -> np.ndarray:
        q = quantize(real, self.runner.input_quant)
        out = [dequantize(self.runner.run(row).reshape(-1), self.runner.output_quant)
               for row in q]
        return np.stack(out) if out else np.zeros((0, 0))


def _scores(head: _Head, feats: dict[str, np.ndarray], deploy: str, flip: str | None,
            rows: np.ndarray) -> np.ndarray:
    p = head.probabilities(feats[deploy][rows])
    if flip is not None:
        p = (p + head.probabilities(feats[flip][rows])) / 2
    return p


def _balanced(layers: list[Dense], n_hidden: int) -> list[Dense]:
    """The same function with int8-friendly magnitudes.

    With a two-layer base head the new labels reach the raw features through identity
    units added to the hidden layer (weights 1), and int8 export uses one scale per layer:
    beside hidden weights of 0.02 (the demo's) those ones would leave the old units two
    quantization steps. relu(a x) = a relu(x) for a > 0, so the pass-through units are
    scaled by a and their outgoing weights by 1/a, a chosen to balance the largest weight
    of each layer against the base's own.
    """
    if len(layers) != 2 or layers[0].weight.shape[0] == n_hidden:
        return layers
    hidden, out = layers
    m1 = float(np.abs(hidden.weight[:n_hidden]).max())
    p1 = float(np.abs(hidden.weight[n_hidden:]).max())
    m2 = float(np.abs(out.weight[:, :n_hidden]).max())
    p2 = float(np.abs(out.weight[:, n_hidden:]).max())
    if min(m1, p1, m2, p2) <= 0:
        return layers
    a = float(np.sqrt(m1 * p2 / (m2 * p1)))
    w1, b1, w2 = hidden.weight.copy(), hidden.bias.copy(), out.weight.copy()
    w1[n_hidden:] *= a
    b1[n_hidden:] *= a
    w2[:, n_hidden:] /= a
    return [Dense(w1, b1, relu=True), Dense(w2, out.bias.copy())]


def _export(layers: list[Dense], calibration: np.ndarray, quant: Quant, name: str) -> bytes:
    zero = quant.zero_point - 128 if quant.dtype is np.uint8 else quant.zero_point
    return export_head(layers, calibration, input_scale=quant.scale, input_zero_point=zero,
                       description=f"smartbin taught head for {name}")


# ------------------------------------------------------------------ the teach


def _version(base_version: str | None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    root = (base_version or "0").split("+teach.", 1)[0]
    return f"{root}+teach.{stamp}"


def _accuracy(probs: np.ndarray, truth: np.ndarray) -> float | None:
    return round(float((probs.argmax(1) == truth).mean()), 4) if len(truth) else None


def _holdout(labels: np.ndarray, seed: int) -> np.ndarray | None:
    """Per class, one photo in five held out; None when a class is too small for it."""
    counts = np.bincount(labels)
    if counts[counts > 0].min() < HOLDOUT_MIN:
        return None
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:max(1, int(len(idx) * HOLDOUT_FRACTION))])
    return np.sort(np.concatenate(held))


def teach(data: Path, out: Path | None, *, base: str | Path | None = None,
          models_dir: str | Path | None = None, bins: Path | None = None,
          backbone: str | None = None, base_data: Path | None = None,
          margin: float = DEFAULT_MARGIN, seed: int = 0, backend: str = "auto",
          threads: int = 2,
          name: str | None = None, progress: bool | None = None,
          log: Log = print, on_progress: Progress | None = None) -> TeachOutcome:
    """Teach, check and (when accepted) write the new bundle to `out`; a rejected teach
    raises Rejected and writes nothing."""
    started = time.perf_counter()
    data = Path(data)
    base_bundle = load_bundle(base, models_dir=models_dir) if base is not None else None
    ready = base_bundle is not None and base_bundle.status == "ready"
    vocabulary = base_bundle.labels if base_bundle is not None else []
    files = _photos(data, log)
    folders = match_labels(list(files), vocabulary, _bins_file(bins), data)
    base_name = base_bundle.name if base_bundle is not None else "the base"
    # Labels of the new bundle: the base head's, in its order, then every other label that
    # has photos (a weightless base's labels too), in the base's order, then new ones.
    base_head: list[Dense] | None = None
    if ready:
        assert base_bundle is not None
        bb, base_head = _base_backbone(base_bundle, backbone, backend, threads)
        labels = list(base_bundle.labels)
        if base_head[-1].weight.shape[0] != len(labels):
            raise BundleError(f"{base_bundle.path}: the head has {base_head[-1].weight.shape[0]}"
                              f" outputs for {len(labels)} labels")
    else:
        bb = _study_backbone(backbone, backend, threads)
        labels = []
    n_base = len(labels)
    taught = sorted((f for f in folders if f.base_index is None or not ready),
                    key=lambda f: (f.base_index is None, f.base_index or 0, f.name))
    if not taught:
        raise DatasetError(f"{data}: every class folder is a label {base_name} already "
                           "knows; a teach adds labels, so give photos of at least one new "
                           "label (with photos of old ones beside them)")
    labels += [f.label for f in taught]
    if len(labels) < 2:
        raise DatasetError(f"{data}: one label is not a classifier; give photos of at least "
                           "two labels")
    index = {f.name: (f.base_index if ready and f.base_index is not None
                      else n_base + taught.index(f)) for f in folders}
    samples = [Sample(p, str(p.relative_to(data)), index[folder],
                      hashlib.sha256(p.read_bytes()).hexdigest())
               for folder in sorted(files) for p in files[folder]]
    y = np.array([s.label for s in samples])
    log(f"teach: {len(samples)} photos of {len(folders)} labels; the new bundle has "
        f"{len(labels)} labels ({n_base} kept from {base_bundle.name if ready else 'no base'}"
        f" + {len(taught)} taught)")

    views = teach_views(base_bundle.input.crop if base_bundle is not None else "none",
                        len(samples))
    deploy, flip_view = views[:2]
    tta = ready and base_bundle is not None and base_bundle.test_time_flip
    cache = FeatureCache(cache_dir() / "features", bb.cache_key)
    report = on_progress or (lambda _phase, _done, _total: None)
    feats, stats = extract(samples, views, _counted(bb.extractor, cache, samples, views,
                                                    "features", report),
                           cache, progress=progress)
    if stats["computed"]:
        log(f"features: {stats['computed']} computed ({stats['images_per_s']:.1f} images/s), "
            "the rest from the cache")
    quant = bb.extractor.quant
    out_name = name or (out.name if out is not None else
                        (base_bundle.name if base_bundle is not None else "taught"))
    n_hidden = base_head[0].weight.shape[0] if base_head and len(base_head) == 2 else 0

    def fit(rows: np.ndarray) -> tuple[TeachResult, list[Dense], bytes]:
        result = fit_few_shot({v: feats[v][rows] for v in views}, y[rows], len(labels),
                              deploy_view=deploy, base_head=base_head, seed=seed)
        layers = _balanced(result.layers, n_hidden)
        calib = np.concatenate([feats[v][rows] for v in views])
        return result, layers, _export(layers, calib, quant, out_name)

    flip = flip_view if tta else None
    base_runner = None
    if ready:
        assert base_bundle is not None
        base_runner = _Head(base_bundle.stage_models(backbone=backbone)[1], quant, backend)
    evaluation: dict[str, Any] = {"margin_points": margin}
    checks: list[tuple[str, float, float, int]] = []  # (what, base, new, n) on old labels

    held = _holdout(y, seed)
    fits = 1 if held is None else 2
    report("fitting", 0, fits)
    if held is not None:
        kept = np.setdiff1d(np.arange(len(y)), held)
        _, _, check_head = fit(kept)
        report("fitting", 1, fits)
        probs = _scores(_Head(check_head, quant, backend), feats, deploy, flip, held)
        truth = y[held]
        old = truth < n_base
        row: dict[str, Any] = {"n": len(held), "top1": _accuracy(probs, truth),
                               "new_labels_top1": _accuracy(probs[~old], truth[~old]),
                               "old_labels_n": int(old.sum())}
        if base_runner is not None and old.any():
            base_probs = _scores(base_runner, feats, deploy, flip, held[old])
            row["old_labels_top1_base"] = _accuracy(base_probs, truth[old])
            row["old_labels_top1_new"] = _accuracy(probs[old], truth[old])
            checks.append(("held-out photos", row["old_labels_top1_base"],
                           row["old_labels_top1_new"], int(old.sum())))
        evaluation["holdout"] = row
        log(f"held-out photos (1 in 5 per class, taught without them): top-1 "
            f"{row['top1']:.1%} (n={row['n']}), new labels "
            + (f"{row['new_labels_top1']:.1%}" if row["new_labels_top1"] is not None else "-")
            + (f", old labels {row['old_labels_top1_base']:.1%} -> "
               f"{row['old_labels_top1_new']:.1%}" if "old_labels_top1_base" in row else ""))

    result, layers, head = fit(np.arange(len(y)))
    report("fitting", fits, fits)
    evaluation["cv"] = {"scheme": result.cv_scheme, "top1": result.cv_top1,
                        "ece": result.cv_ece}
    if held is None:
        log(f"too few photos for a holdout (fewer than {HOLDOUT_MIN} in a class); "
            f"cross-validation: {result.cv_scheme}"
            + (f", top-1 {result.cv_top1:.1%}" if result.cv_top1 is not None else ""))

    if ready and base_runner is not None:
        assert base_bundle is not None
        base_test = _base_test(base_bundle, base_data, samples, bb, cache, views[:2],
                               progress, report)
        if base_test is not None:
            test_samples, test_feats, source = base_test
            truth = np.array([s.label for s in test_samples])
            rows = np.arange(len(truth))
            new_head = _Head(head, quant, backend)
            before = _accuracy(_scores(base_runner, test_feats, deploy, flip, rows), truth)
            after = _accuracy(_scores(new_head, test_feats, deploy, flip, rows), truth)
            evaluation["base_test"] = {"source": source, "n": len(truth),
                                       "old_labels_top1_base": before,
                                       "old_labels_top1_new": after}
            assert before is not None and after is not None
            checks.append((source, before, after, len(truth)))
            log(f"{source} (n={len(truth)}): old labels {before:.1%} -> {after:.1%}")
        elif (base_bundle.path / SPLIT_FILE).is_file():
            log(f"the base's test split was not checked: give --base-data with the photos "
                f"{base_bundle.name} was trained on")

    # One decision on every held-out photo of an old label together: six held-out photos
    # alone move 17 points per photo, which no margin of a few points can read.
    n_old = sum(n for *_, n in checks)
    pooled = None
    if n_old:
        pooled = (sum(b * n for _, b, _, n in checks) / n_old,
                  sum(a * n for _, _, a, n in checks) / n_old)
    evaluation["checked_on_old_labels"] = [{"on": w, "base": b, "new": a, "n": n}
                                           for w, b, a, n in checks]
    evaluation["old_labels_top1"] = None if pooled is None else {
        "base": round(pooled[0], 4), "new": round(pooled[1], 4), "n": n_old}
    worse = pooled is not None and (pooled[0] - pooled[1]) * 100 > margin
    evaluation["accepted"] = not worse
    if worse:
        assert pooled is not None
        text = "; ".join(f"{w} (n={n}) {b:.1%} -> {a:.1%}" for w, b, a, n in checks)
        raise Rejected(f"rejected: the taught bundle is worse on {base_name}'s labels by "
                       f"{(pooled[0] - pooled[1]) * 100:.1f} points, more than {margin:g} "
                       f"({pooled[0]:.1%} -> {pooled[1]:.1%} on {n_old} photos: {text}); "
                       "nothing was written or installed; check the photos' labels (or "
                       "--margin)", evaluation)
    if not checks and ready:
        log("old labels not checked on held-out photos (no holdout, no base test split)")

    seconds = time.perf_counter() - started
    manifest = _manifest(out_name, base_bundle, ready, bb, labels, head, result, samples,
                         evaluation, data, seconds, views)
    if out is not None:
        write_bundle(out, manifest, head, layers, bb.file)
        log(f"wrote {out} ({manifest['version']}) in {seconds:.1f} s")
    return TeachOutcome(out, manifest, evaluation, True, seconds)


def _base_test(base: Bundle, base_data: Path | None, taught: list[Sample], bb: _Backbone,
               cache: FeatureCache, views: tuple[str, ...], progress: bool | None,
               report: Progress) -> tuple[list[Sample], dict[str, np.ndarray], str] | None:
    """The base's test photos (its recorded split under base_data, or every photo of its
    labels there), minus any the teach was given."""
    if base_data is None:
        return None
    record = base.path / SPLIT_FILE
    if record.is_file():
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if recorded.get("classes") != base.label_names:
            raise DatasetError(f"{record}: classes differ from the bundle's labels")
        samples = load_split(record, Path(base_data))["test"]
        source = f"{base.name}'s test split"
    else:
        folders = match_labels(list(_photos(Path(base_data), lambda _m: None)), base.labels,
                               {}, Path(base_data))
        files = _photos(Path(base_data), lambda _m: None)
        new = [f.name for f in folders if f.base_index is None]
        if new:
            raise DatasetError(f"{base_data}: --base-data holds photos of the base's labels "
                               f"only; {new[0]!r} is not a label of {base.name}")
        samples = [Sample(p, str(p.relative_to(base_data)), int(f.base_index or 0),
                          hashlib.sha256(p.read_bytes()).hexdigest())
                   for f in folders for p in files[f.name]]
        source = f"photos of {base.name}'s labels in {Path(base_data).name}"
    given = {s.sha256 for s in taught}
    samples = [s for s in samples if s.sha256 not in given]
    if not samples:
        return None
    feats, _ = extract(samples, views, _counted(bb.extractor, cache, samples, views,
                                                "checking", report), cache, progress=progress)
    return samples, feats, source


class _Counted:
    """The feature extractor, telling `report` of every backbone pass: `extract` runs one
    per photo and view the cache lacks, so their number is known before it starts."""

    def __init__(self, inner: StageFeatures, phase: str, total: int,
                 report: Progress) -> None:
        self.inner, self.phase, self.total, self.report = inner, phase, total, report
        self.done = 0
        self.spec = inner.spec
        report(phase, 0, total)

    @property
    def quant(self) -> Quant:
        return self.inner.quant

    def raw_pixels(self, pixels: np.ndarray) -> np.ndarray:
        out = self.inner.raw_pixels(pixels)
        self.done += 1
        self.report(self.phase, self.done, self.total)
        return out


def _counted(extractor: StageFeatures, cache: FeatureCache, samples: list[Sample],
             views: tuple[str, ...], phase: str, report: Progress) -> Any:
    total = sum(1 for s in samples for v in views if cache.get(v, s.sha256) is None)
    return _Counted(extractor, phase, total, report)


def _manifest(name: str, base: Bundle | None, ready: bool, bb: _Backbone, labels: list[Label],
              head: bytes, result: TeachResult, samples: list[Sample],
              evaluation: dict[str, Any], data: Path, seconds: float,
              views: Sequence[str]) -> dict[str, Any]:
    source = dict(base.manifest) if base is not None else {}
    parent = None
    if base is not None:
        head_sha = base.stages[1].sha256 if ready and len(base.stages) == 2 else None
        parent = {"name": base.name, "version": base.version, "head_sha256": head_sha}
    label_rows = []
    for lab in labels:
        row: dict[str, Any] = {"name": lab.name, "name_en": lab.name_en, "bin": lab.bin}
        if lab.volume_l is not None:
            row["volume_l"] = lab.volume_l
        label_rows.append(row)
    stage = dict(bb.stage)
    if bb.file is not None:
        stage["file"] = bb.file.name
    names = [lab.name for lab in labels]
    return {
        "format": 1,
        "name": name,
        "version": _version(base.version if base is not None else None),
        "description": (f"{base.name} taught {len(labels) - result.n_base} label(s) from "
                        f"{len(samples)} photos" if base is not None else
                        f"Taught from {len(samples)} photos"),
        "labels": label_rows,
        "input": source.get("input", STUDY_INPUT),
        "output": "probabilities",
        "test_time_flip": bool(base.test_time_flip) if ready and base else False,
        "stages": [stage, {"role": "head", "file": "head.tflite",
                           "sha256": sha256_bytes(head)}],
        "provenance": {
            "method": "teach: base head kept, new labels imprinted and fitted (training."
                      "teach_method), int8 export",
            "parent": parent,
            "dataset": data.name,
            "photos": [{"file": s.rel, "sha256": s.sha256, "label": names[s.label]}
                       for s in samples],
            "teach": {**result.record(), "views": list(views)},
            "evaluation": evaluation,
            "benchmark": {"total_s": round(seconds, 1)},
        },
        "how_to_train": "smartbin teach --data DIR"
                        + (f" --base {base.name}" if base is not None else "")
                        + f" --out {name}",
    }


def write_bundle(out: Path, manifest: dict[str, Any], head: bytes, layers: list[Dense],
                 backbone_file: Path | None) -> None:
    """Write the bundle beside `out` and rename it into place, so `out` is never a
    half-written bundle (a teach killed here leaves the old `out`, or none)."""
    out = Path(out)
    if out.exists() and not (out / "manifest.json").is_file() and (
            not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists and is not a bundle folder; give a new folder "
                           "for --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.teach-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's folder is private; a bundle is read by the service
    try:
        if backbone_file is not None:
            shutil.copyfile(backbone_file, tmp / backbone_file.name)
        (tmp / "head.tflite").write_bytes(head)
        save_float_head(tmp, layers)
        write_manifest(tmp, manifest)
        load_bundle(tmp)  # what is written must load
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ command line


def from_review(cfg: Any, dest: Path) -> dict[str, Any]:
    """Export the bin's reviewed photos (the site dataset) into dest, with the photos of
    `--capture` beside them."""
    from bin_controller.captures import CAPTURES, add_captures
    from bin_controller.errors import StoreError
    from bin_controller.sitelog import SITELOG_NAME
    from bin_controller.tools.review_cmd import opened

    state = Path(cfg.bin.state_dir).expanduser()
    captures = state / CAPTURES
    try:
        with opened(cfg) as reviews:
            exported: dict[str, Any] = reviews.export(dest)
    except StoreError:
        # A bin that has only captured photos so far has no site log yet.
        if (state / SITELOG_NAME).is_file() or not captures.is_dir():
            raise
        exported = {"dir": str(dest), "photos": 0, "classes": {}, "skipped": 0}
    exported["captured"] = add_captures(captures, dest)
    return exported


class _JsonProgress:
    """`--progress-json`: one JSON object a line on stdout, for the service's teach job;
    a phase's first and last step always, between them at most every 0.2 s."""

    def __init__(self) -> None:
        self.last = (None, 0.0)

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase == self.last[0] and 0 < done < total and now - self.last[1] < 0.2:
            return
        self.last = (phase, now)
        self.emit({"phase": phase, "done": done, "total": total})

    @staticmethod
    def emit(message: dict[str, Any]) -> None:
        print(json.dumps(message, ensure_ascii=False), flush=True)


def run(args: Any) -> int:
    """`smartbin teach`, argparse namespace in, exit code out."""
    import sys

    from bin_controller.config import load_config, merge
    from bin_controller.model_updates import ModelsFolder
    from bin_controller.overrides import cli_overrides
    from bin_controller.teaching import nice_self

    nice_self(getattr(args, "nice", 0) or 0)
    progress_json = bool(getattr(args, "progress_json", False))
    capture_label = getattr(args, "capture", None)
    sources = [args.data is not None, bool(args.from_review), capture_label is not None]
    if not any(sources):
        raise SmartbinError("give --data DIR (class folders of photos), --from-review or "
                            "--capture LABEL")
    if sum(sources) > 1:
        raise SmartbinError("give one of --data, --from-review or --capture")
    if capture_label is None and (getattr(args, "item", None) is not None):
        raise SmartbinError("--item goes with --capture (a simulated item on the flap)")
    if args.out is None and not args.install and capture_label is None:
        raise SmartbinError("give --out DIR for the new bundle, or --install to put it in "
                            "the models folder")
    overrides = cli_overrides(args)
    if getattr(args, "simulate", False):
        overrides = merge({"camera": {"type": "simulated"},
                           "hardware": {"pin_factory": "mock"}}, overrides)
    cfg = load_config(args.config, overrides)
    say: Log = print
    if progress_json:
        def say(message: str) -> None:  # stdout carries the JSON lines
            print(message, file=sys.stderr, flush=True)
    if capture_label is not None:
        from training.capture import capture

        got = capture(cfg, capture_label, getattr(args, "bin", None), shots=args.shots,
                      interval_s=args.interval, item=getattr(args, "item", None),
                      seed=args.seed)
        say(f"captured {len(got.files)} photos of {got.label!r} ({got.bin}"
            + (", a new label" if got.new_label else "") + f") in {got.folder}; "
            f"{got.total} photos of it there now")
        if args.out is None and not args.install:
            say("teach from them and the reviewed photos with `smartbin teach --from-review "
                "--install` or MQTT cmd/teach (more items of the label first: a few items, "
                "a few shots each)")
            return 0
    base = args.base if args.base is not None else (
        cfg.model.bundle if args.from_review or args.install or capture_label else None)
    with tempfile.TemporaryDirectory(prefix="smartbin-teach-") as tmp:
        data = args.data
        if args.from_review or capture_label is not None:
            data = Path(tmp) / "site"
            exported = from_review(cfg, data)
            say(f"exported {exported['photos']} reviewed photos of "
                f"{len(exported['classes'])} labels"
                + (f" and {exported['captured']} captured photos"
                   if exported["captured"] else ""))
            if not exported["photos"] and not exported["captured"]:
                raise DatasetError("no reviewed photos with a label to teach from; review "
                                   "some items first (smartbin review label)")
        out = args.out if args.out is not None else Path(tmp) / "bundle" / (
            load_bundle(base, models_dir=cfg.model.dir).name if base else "taught")
        reporter = _JsonProgress() if progress_json else None
        # A Rejected teach is a SmartbinError: one line, exit 2, nothing written.
        try:
            outcome = teach(data, out, base=base, models_dir=cfg.model.dir, bins=args.bins,
                            backbone=args.backbone or cfg.model.backbone or None,
                            base_data=args.base_data, margin=args.margin, seed=args.seed,
                            name=args.name, log=say, on_progress=reporter,
                            threads=getattr(args, "threads", 2),
                            progress=False if progress_json else None)
        except Rejected as exc:
            if reporter is not None:
                reporter.emit({"phase": "rejected", "error": str(exc),
                               "evaluation": exc.evaluation})
            raise
        except SmartbinError as exc:
            if reporter is not None:
                reporter.emit({"phase": "failed", "error": str(exc)})
            raise
        if reporter is not None:
            manifest = outcome.manifest
            reporter.emit({"phase": "written", "out": str(out), "name": manifest["name"],
                           "version": manifest["version"], "evaluation": outcome.evaluation,
                           "photos": len(manifest["provenance"]["photos"]),
                           "labels": [lab["name"] for lab in manifest["labels"]],
                           "seconds": round(outcome.seconds, 2)})
        if args.install:
            installed = ModelsFolder(cfg.model.dir).install(out, keep=args.keep)
            say(f"installed {installed.name} {installed.version} in {cfg.model.dir}"
                + (f" (previous: {installed.previous})" if installed.previous else "")
                + "; send reload_model or restart the service to use it")
    return 0


__all__ = ["DEFAULT_MARGIN", "Rejected", "TeachOutcome", "match_labels", "run", "teach",
           "write_bundle"]
