"""`smartbin evaluate`: how good a bundle is on labelled photos, before it is deployed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.bins import BINS
from bin_controller.config import load_config
from bin_controller.errors import DatasetError
from bin_controller.vision.bundle import Bundle
from bin_controller.vision.classifier import Classifier, dequantize
from bin_controller.vision.preprocess import load_image, prepare_image
from training import calibration, plots
from training.dataset import SPLITS, Sample, load_dataset, load_split
from training.features import Progress
from training.head import Dense, forward, softmax
from training.shift import shifted

SPLIT_FILE = "split.json"
FLOAT_HEAD = "head_float.npz"


def save_float_head(bundle_dir: Path, layers: list[Dense]) -> None:
    arrays = {}
    for i, layer in enumerate(layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = layer.weight, layer.bias
        arrays[f"relu{i}"] = np.array(layer.relu)
    np.savez(bundle_dir / FLOAT_HEAD, **arrays)


def load_float_head(bundle_dir: Path) -> list[Dense] | None:
    path = bundle_dir / FLOAT_HEAD
    if not path.is_file():
        return None
    with np.load(path) as npz:
        n = len([k for k in npz.files if k.startswith("w")])
        return [Dense(npz[f"w{i}"], npz[f"b{i}"], bool(npz[f"relu{i}"])) for i in range(n)]


def samples_for(bundle: Bundle, data: Path, split: str) -> list[Sample]:
    """The bundle's recorded split when it has one; otherwise every photo under data."""
    record = bundle.path / SPLIT_FILE
    if record.is_file() and split in SPLITS:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if recorded["classes"] != bundle.label_names:
            raise DatasetError(f"{record}: classes differ from the bundle's labels")
        return load_split(record, data)[split]
    ds = load_dataset(data)
    if ds.classes != sorted(bundle.label_names) and ds.classes != bundle.label_names:
        missing = sorted(set(ds.classes) - set(bundle.label_names))
        raise DatasetError(f"{data}: classes {missing[:5]} are not labels of {bundle.name}")
    index = {name: i for i, name in enumerate(bundle.label_names)}
    samples = [s for part in SPLITS for s in ds.splits[part]]
    return [Sample(s.path, s.rel, index[ds.classes[s.label]], s.sha256) for s in samples]


def _float_scores(classifier: Classifier, layers: list[Dense], pixels: np.ndarray) -> np.ndarray:
    """The float head on the int8 backbone's features: the reference for the int8 head."""
    stage = classifier.stages[0]
    raw = stage.run(classifier._to_input(pixels))
    feats = dequantize(raw.reshape(1, -1), stage.output_quant)
    return softmax(forward(layers, feats)[-1])[0]


def evaluate(bundle_ref: str | Path, data: Path, *, split: str = "test",
             out: Path | None = None, backbone: str | None = None, backend: str = "auto",
             progress: bool | None = None, shift: int | None = None,
             target_accuracy: float = calibration.DEFAULT_TARGET_ACCURACY) -> dict[str, Any]:
    """The bundle on a split of labelled photos; with `shift`, on those photos moved off
    their backdrop by training.shift.shifted(seed=shift): a proxy for other sites' photos."""
    if out is not None:
        plots.require()
    config = load_config(None)
    classifier = Classifier(bundle_ref, backend=backend, backbone=backbone, top_k=5,
                            models_dir=config.model.dir)
    bundle = classifier.bundle
    samples = samples_for(bundle, Path(data), split)
    if not samples:
        raise DatasetError(f"{data}: no images in split {split!r}")
    layers = load_float_head(bundle.path) if len(classifier.stages) == 2 else None
    n_cls = len(bundle.labels)
    truth, pred, top5, latency, agree, pred_bin, probs = [], [], [], [], [], [], []
    bar = Progress(len(samples), "evaluate", enabled=progress)
    for s in samples:
        image = None
        if shift is None:
            p = classifier.classify_file(s.path)
        else:
            image = shifted(load_image(s.path), s.sha256, shift)
            p = classifier.classify_array(np.asarray(image))
        truth.append(s.label)
        pred.append(p.index)
        pred_bin.append(BINS.index(p.bin))
        top5.append(s.label in np.argsort(-p.probabilities)[:5])
        probs.append(p.probabilities)
        latency.append(p.latency_ms)
        if layers is not None:
            pixels = prepare_image(image if image is not None else load_image(s.path),
                                   bundle.input)
            fs = _float_scores(classifier, layers, pixels)
            if bundle.test_time_flip:
                fs = fs + _float_scores(classifier, layers,
                                        np.ascontiguousarray(pixels[:, ::-1]))
            agree.append(int(np.argmax(fs)) == p.index)
        bar.step()
    truth_a, pred_a = np.array(truth), np.array(pred)
    confusion = np.zeros((n_cls, n_cls), int)
    np.add.at(confusion, (truth_a, pred_a), 1)
    bin_of = np.array([BINS.index(label.bin) for label in bundle.labels])
    bin_conf = np.zeros((4, 4), int)
    np.add.at(bin_conf, (bin_of[truth_a], np.array(pred_bin)), 1)
    per_class = {}
    for i, label in enumerate(bundle.labels):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        if actual == 0 and predicted == 0:
            continue
        per_class[label.name] = {
            "n": actual,
            "precision": round(tp / predicted, 4) if predicted else None,
            "recall": round(tp / actual, 4) if actual else None,
        }
    lat = np.array(latency)
    calib = calibration.summary(np.array(probs), truth_a, bin_of, target=target_accuracy)
    calib["configured_threshold"] = config.model.confidence_threshold
    calib["advice"] = calibration.advice(calib, config.model.confidence_threshold)
    report = {
        "model": bundle.name, "version": bundle.version, "backend": classifier.backend,
        "split": split, "shift": shift, "n": len(samples),
        "top1": round(float((truth_a == pred_a).mean()), 4),
        "top5": round(float(np.mean(top5)), 4),
        # The bin as the bin decides it (highest summed bin probability) ...
        "bin_accuracy": round(float((bin_of[truth_a] == np.array(pred_bin)).mean()), 4),
        # ... and, for comparison, the bin of the single most likely label.
        "bin_accuracy_top_label": round(float((bin_of[truth_a] == bin_of[pred_a]).mean()), 4),
        "int8_float_agreement": round(float(np.mean(agree)), 4) if agree else None,
        # Expected calibration error of the top label's probability, and of the bin's.
        "ece": calib["ece"], "bin_ece": calib["bin_ece"],
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                       "p95": round(float(np.percentile(lat, 95)), 2),
                       "mean": round(float(lat.mean()), 2)},
        "test_time_flip": bundle.test_time_flip,
        "per_class": per_class,
        "bin_confusion": {"bins": list(BINS), "matrix": bin_conf.tolist()},
        "confusion": {"labels": bundle.label_names, "matrix": confusion.tolist()},
        "calibration": calib,
    }
    if out is not None:
        write_report(report, Path(out), bundle)
    return report


def write_report(report: dict[str, Any], out: Path, bundle: Bundle,
                 extra_md: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                     encoding="utf-8")
    names = [label.name_en or label.name for label in bundle.labels]
    shift = report.get("shift")
    where = f"{bundle.name} {bundle.version}, {report['split']} split" \
        + (f" shifted (seed {shift})" if shift is not None else "") + f" (n={report['n']})"
    plots.confusion_png(np.array(report["confusion"]["matrix"]), names, out / "confusion.png",
                        f"{where}: confusion matrix")
    plots.confusion_png(np.array(report["bin_confusion"]["matrix"]), list(BINS),
                        out / "bin_confusion.png", f"{where}: four bins")
    calib = report["calibration"]
    plots.reliability_png({"top label": (calib["reliability"], calib["ece"]),
                           "bin": (calib["bin_reliability"], calib["bin_ece"])},
                          out / "reliability.png", f"{where}: reliability")
    chosen = calib["threshold_for_target"]
    plots.coverage_png(calib["coverage"], out / "coverage.png",
                       f"{where}: accuracy against coverage",
                       target=calib["target_accuracy"],
                       chosen=chosen["threshold"] if chosen else None,
                       current=calib["configured_threshold"])
    lines = [
        f"# Evaluation of {bundle.name} {bundle.version}",
        "",
        f"Split `{report['split']}`"
        + (f", shifted off its backdrop (seed {shift}; a proxy for other sites' photos)"
           if shift is not None else "")
        + f", {report['n']} photos, backend {report['backend']}, "
        f"test-time flip {'on' if report['test_time_flip'] else 'off'}.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| top-1 | {report['top1']:.2%} |",
        f"| top-5 | {report['top5']:.2%} |",
        f"| four-bin accuracy (bin probability) | {report['bin_accuracy']:.2%} |",
        f"| four-bin accuracy (bin of the top label) | {report['bin_accuracy_top_label']:.2%} |",
        "| int8 vs float head agreement | "
        + (f"{report['int8_float_agreement']:.2%}" if report["int8_float_agreement"] is not None
           else "n/a") + " |",
        f"| latency per image p50 / p95 | {report['latency_ms']['p50']} / "
        f"{report['latency_ms']['p95']} ms |",
        f"| expected calibration error, top label / bin | {report['ece']:.2%} / "
        f"{report['bin_ece']:.2%} |",
        "",
        "| class | n | precision | recall |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in report["per_class"].items():
        p = "-" if row["precision"] is None else f"{row['precision']:.2%}"
        r = "-" if row["recall"] is None else f"{row['recall']:.2%}"
        lines.append(f"| {name} | {row['n']} | {p} | {r} |")
    lines += ["", "Bin confusion (rows: truth, columns: predicted)", "",
              "| | " + " | ".join(BINS) + " |", "| --- " * 5 + "|"]
    for b, row in zip(BINS, report["bin_confusion"]["matrix"], strict=True):
        lines.append(f"| {b} | " + " | ".join(map(str, row)) + " |")
    lines += ["", "![confusion](confusion.png)", "![bins](bin_confusion.png)", ""]
    lines += _calibration_md(calib)
    if extra_md:
        lines += [extra_md, ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


# Rows of the threshold table in report.md (the whole curve is in report.json).
TABLE_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _calibration_md(calib: dict[str, Any]) -> list[str]:
    target = calib["target_accuracy"]
    chosen = calib["threshold_for_target"]
    rows = {calibration.at_threshold(calib["coverage"], t)["threshold"] for t in TABLE_THRESHOLDS}
    rows.add(calibration.at_threshold(calib["coverage"], calib["configured_threshold"])
             ["threshold"])
    if chosen:
        rows.add(chosen["threshold"])
    lines = ["## Confidence and the fallback bin", "",
             "The bin sends an item to the fallback bin when its bin probability (the sum over "
             "the bin's labels) is below `model.confidence_threshold`. Expected calibration "
             f"error: {calib['ece']:.2%} for the top label, {calib['bin_ece']:.2%} for the bin "
             "(the mean gap between confidence and accuracy; 0 is perfectly calibrated).", "",
             f"**{calib['advice']}**", "",
             "| threshold | to the fallback bin | bin accuracy of the rest |",
             "| ---: | ---: | ---: |"]
    for row in calib["coverage"]:
        if row["threshold"] in rows:
            acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
            mark = " (target)" if chosen and row["threshold"] == chosen["threshold"] else ""
            lines.append(f"| {row['threshold']:g}{mark} | {row['fallback_fraction']:.2%} | "
                         f"{acc} |")
    lines += ["", "![reliability](reliability.png)",
              f"![accuracy against coverage, target {target:.0%}](coverage.png)", ""]
    return lines
