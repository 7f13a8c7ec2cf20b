"""`smartbin train --method keras`: the study's backbones and strategies in tf.keras, int8 export.

Two ImageNet backbones, as the study compared them, each with its three transfer strategies:

- MobileNetV2, Rescaling(1/127.5, -1): `connect` freezes every backbone layer, `140after` the
  first 140, `all` none.
- ResNet50, its own `preprocess_input` (RGB -> BGR, ImageNet mean subtracted): `connect`
  freezes every backbone layer, `80after` the first 80, `all` none.

Both take raw RGB pixels (the preprocessing is inside the model) and end in global average
pooling, dropout and dense softmax. Each model is converted to a full-int8 TFLite file (uint8
in and out) calibrated on training images; its agreement with the float model is measured on
the test split, and the bundle is evaluated like any other. `--compare` trains every
(backbone, strategy) pair on one split and writes the study's table with int8 size and
latency. Needs TensorFlow (the `train` extra); the bin itself never does.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.errors import SmartbinError
from bin_controller.vision.bundle import InputSpec, write_manifest
from bin_controller.vision.fetch import sha256_bytes
from bin_controller.vision.preprocess import load_image, prepare_image
from training.calibration import DEFAULT_TARGET_ACCURACY
from training.dataset import Dataset, Sample, load_dataset
from training.evaluate import SPLIT_FILE
from training.train import finalize

REPRESENTATIVE = 100
FREEZE_ALL = -1  # a strategy's frozen-layer count meaning "the whole backbone"


@dataclass(frozen=True)
class Arch:
    name: str  # as --arch takes it
    title: str
    # strategy -> how many backbone layers, from the input on, are frozen (FREEZE_ALL: all)
    strategies: dict[str, int]
    keras_name: str  # keras.applications constructor
    weights_file: str  # what Keras downloads for include_top=False, named for offline use
    preprocessing: str

    def backbone(self, keras: Any, size: int, weights: str | None) -> Any:
        build = getattr(keras.applications, self.keras_name)
        return build(input_shape=(size, size, 3), include_top=False, weights=weights)

    def preprocess(self, keras: Any, inputs: Any) -> Any:
        if self.name == "resnet50":
            # The library's own function, so the model sees exactly what its ImageNet
            # weights were trained on; inside the model, the int8 file takes uint8 RGB.
            fn = keras.applications.resnet50.preprocess_input
            return keras.layers.Lambda(fn, name="resnet50_preprocess")(inputs)
        return keras.layers.Rescaling(1 / 127.5, offset=-1, name="mobilenet_v2_rescale")(inputs)


ARCHS: dict[str, Arch] = {
    "mobilenet_v2": Arch(
        "mobilenet_v2", "MobileNetV2", {"connect": FREEZE_ALL, "140after": 140, "all": 0},
        "MobileNetV2", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        "Rescaling(1/127.5, -1)"),
    "resnet50": Arch(
        "resnet50", "ResNet50", {"connect": FREEZE_ALL, "80after": 80, "all": 0},
        "ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "resnet50.preprocess_input (RGB->BGR, ImageNet mean subtracted)"),
}


def check_pair(arch: str, strategy: str) -> Arch:
    spec = ARCHS.get(arch)
    if spec is None:
        raise SmartbinError(f"--arch {arch}: use {' or '.join(ARCHS)}")
    if strategy not in spec.strategies:
        raise SmartbinError(f"--strategy {strategy} is not a {arch} strategy: use "
                            f"{', '.join(spec.strategies)}")
    return spec


def all_pairs() -> list[tuple[str, str]]:
    return [(a, s) for a, spec in ARCHS.items() for s in spec.strategies]


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
    """`--pairs resnet50:connect,mobilenet_v2:all` (default: every pair)."""
    if not text:
        return all_pairs()
    pairs = []
    for part in text.split(","):
        arch, sep, strategy = part.strip().partition(":")
        if not sep:
            raise SmartbinError(f"--pairs {part!r}: write ARCH:STRATEGY, e.g. resnet50:80after")
        check_pair(arch, strategy)
        if (arch, strategy) not in pairs:
            pairs.append((arch, strategy))
    return pairs


def resolve_weights(given: list[str] | None, archs: list[str]) -> dict[str, str | None]:
    """Each arch's weights: 'imagenet' (Keras downloads), a file, or None (random).

    `--weights` may be repeated; `imagenet` and `none` apply to every arch, `ARCH=FILE`
    to one, and a bare FILE only when a single arch is trained (a ResNet50 file cannot
    initialise MobileNetV2)."""
    chosen: dict[str, str | None] = dict.fromkeys(archs, "imagenet")
    for item in given or []:
        arch, sep, value = item.partition("=")
        if sep and arch in ARCHS:
            targets = [arch] if arch in archs else []
        else:
            value, targets = item, archs
        if value.lower() in ("imagenet", "none"):
            for a in targets:
                chosen[a] = None if value.lower() == "none" else "imagenet"
            continue
        if not Path(value).is_file():
            raise SmartbinError(f"--weights {item}: no such file (or use 'imagenet', 'none')")
        if len(targets) > 1:
            raise SmartbinError(f"--weights {item}: say which backbone the file is for, "
                                f"e.g. --weights resnet50={value}")
        for a in targets:
            chosen[a] = value
    return chosen


def _freeze(base: Any, frozen: int) -> None:
    if frozen == FREEZE_ALL:
        base.trainable = False
        return
    base.trainable = True
    for layer in base.layers[:frozen]:
        layer.trainable = False


def build_model(tf: Any, n_classes: int, *, size: int, strategy: str, weights: str | None,
                dropout: float, arch: str = "mobilenet_v2") -> Any:
    keras = tf.keras
    spec = check_pair(arch, strategy)
    if weights and weights != "imagenet" and not Path(weights).is_file():
        raise SmartbinError(f"--weights {weights}: no such file (or use 'imagenet', 'none')")
    try:
        base = spec.backbone(keras, size, "imagenet" if weights == "imagenet" else None)
    except Exception as exc:  # Keras reports a failed download as a bare Exception
        if weights != "imagenet":
            raise
        raise SmartbinError(f"--weights imagenet: Keras could not get the {spec.title} "
                            f"weights ({str(exc).splitlines()[0]}); offline, pass the file: "
                            f"--weights {arch}=PATH/{spec.weights_file}") from exc
    if weights and weights != "imagenet":
        try:
            base.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise SmartbinError(f"--weights {weights}: not {spec.title} weights without the "
                                f"top ({str(exc).splitlines()[0][:200]})") from exc
    _freeze(base, spec.strategies[strategy])
    inputs = keras.Input((size, size, 3))
    x = spec.preprocess(keras, inputs)
    # A frozen backbone keeps its batch-norm statistics (inference mode), as in the study.
    x = base(x, training=False) if strategy == "connect" else base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def backbone_of(model: Any) -> Any:
    """The backbone sub-model inside a model build_model made."""
    return next(layer for layer in model.layers if hasattr(layer, "layers"))


def param_counts(model: Any) -> tuple[int, int]:
    """(trainable, non-trainable) as Keras's summary counts them: the non-trainable
    include batch-norm moving statistics, which no strategy trains."""
    def count(weights: list[Any]) -> int:
        return int(sum(int(np.prod(w.shape)) for w in weights))
    return count(model.trainable_weights), count(model.non_trainable_weights)


def export_int8(tf: Any, model: Any, representative: np.ndarray) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def samples():
        for image in representative:
            yield [image[None].astype(np.float32)]

    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return converter.convert()


def int8_vs_float(bundle: Path, samples: list[Sample], float_probs: np.ndarray) -> \
        tuple[float | None, float | None]:
    """How the written bundle, run as the bin runs it (file, crop, the manifest's input
    spec, the int8 file), compares with the float model: the share of images with the same
    top-1, and the mean over images of the largest probability difference. The second
    still says something when an undertrained model gives every image one class."""
    from bin_controller.vision.classifier import Classifier

    if not samples:
        return None, None
    classifier = Classifier(bundle)
    same, diff = [], []
    for sample, ref in zip(samples, float_probs, strict=True):
        p = classifier.classify_file(sample.path)
        same.append(p.index == int(np.argmax(ref)))
        diff.append(float(np.abs(p.probabilities - ref).max()))
    return round(float(np.mean(same)), 4), round(float(np.mean(diff)), 4)


def bench_bundle(path: Path, runs: int, threads: list[int]) -> list[dict[str, Any]]:
    """Latency per image as `smartbin bench classify` measures it: the same sample frame,
    warm-up and percentiles, bare invoke() and the whole classify_array call."""
    from bin_controller.tools import bench
    from bin_controller.vision.classifier import Classifier
    from bin_controller.vision.preprocess import prepare_array

    frame = bench._sample_frame(np.random.default_rng(0))
    rows = []
    for n in threads:
        c = Classifier(path, num_threads=n)
        bare = bench.percentiles(bench.time_runs(
            bench.bare_invoke(c, prepare_array(frame, c.input_spec)), runs))
        arr = bench.percentiles(bench.time_runs(partial(c.classify_array, frame), runs))
        rows.append({"threads": n, "backend": c.backend, "runs": runs,
                     "bare_p50_ms": round(bare[0], 2), "bare_p95_ms": round(bare[1], 2),
                     "p50_ms": round(arr[0], 2), "p95_ms": round(arr[1], 2)})
    return rows


def _pixels(samples: list[Sample], size: int) -> np.ndarray:
    spec = InputSpec(size, size, crop="center")
    return np.stack([prepare_image(load_image(s.path), spec) for s in samples])


def _top1(probs: np.ndarray, y: np.ndarray) -> float | None:
    return round(float((probs.argmax(1) == y).mean()), 4) if len(y) else None


@dataclass
class Prepared:
    """One split's images, shared by every pair a comparison trains."""

    ds: Dataset
    pixels: dict[str, np.ndarray]  # uint8, what the int8 model and the bin see
    x: dict[str, np.ndarray]  # the same as float32, what Keras trains on
    y: dict[str, np.ndarray]
    size: int


def prepare(args: argparse.Namespace, log: Callable[[str], None]) -> Prepared:
    size = args.image_size
    ds = load_dataset(args.data, seed=args.seed, bin_map=args.bins)
    for rel, reason in ds.skipped:
        log(f"skipped {rel}: {reason}")
    for warning in ds.warnings:
        log(f"warning: {warning}")
    pixels = {k: _pixels(v, size) for k, v in ds.splits.items()}
    return Prepared(ds, pixels, {k: v.astype(np.float32) for k, v in pixels.items()},
                    {k: np.array([s.label for s in v]) for k, v in ds.splits.items()}, size)


def train_pair(tf: Any, data: Prepared, args: argparse.Namespace, *, arch: str,
               strategy: str, weights: str | None, out: Path) -> dict[str, Any]:
    """Train one (arch, strategy), export int8, write and evaluate its bundle; its table row."""
    spec = check_pair(arch, strategy)
    ds, x, y, size = data.ds, data.x, data.y, data.size
    tf.keras.backend.clear_session()
    # Every pair starts from the same seed, so a row does not depend on the ones before it.
    tf.keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()
    model = build_model(tf, len(ds.classes), size=size, strategy=strategy, weights=weights,
                        dropout=args.dropout, arch=arch)
    trainable, frozen = param_counts(model)
    base = backbone_of(model)
    frozen_layers = sum(not layer.trainable for layer in base.layers) if base.trainable \
        else len(base.layers)
    model.compile(optimizer=tf.keras.optimizers.Adam(args.lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  run_eagerly=args.eager)
    fit = model.fit(x["train"], y["train"], batch_size=args.batch_size, epochs=args.epochs,
                    verbose=2, validation_data=(x["val"], y["val"]) if len(y["val"]) else None)
    train_s = time.perf_counter() - started
    probs = {k: model.predict(v, verbose=0) if len(v) else np.zeros((0, len(ds.classes)))
             for k, v in x.items()}
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(data.pixels["train"]))[:REPRESENTATIVE]
    tflite = export_int8(tf, model, data.pixels["train"][pick])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.tflite").write_bytes(tflite)

    h = fit.history
    history = [{"epoch": i + 1, "loss": h["loss"][i], "train_acc": h["accuracy"][i],
                **({"val_loss": h["val_loss"][i], "val_acc": h["val_accuracy"][i]}
                   if "val_loss" in h else {})}
               for i in range(len(h["loss"]))]
    val_curve = h.get("val_accuracy", [])
    # The first epoch that reached the best validation accuracy (ties: the earlier one).
    best_epoch = int(np.argmax(val_curve)) + 1 if val_curve else None
    top1 = {k: _top1(probs[k], y[k]) for k in ("train", "val", "test")}
    name = f"{arch} {strategy}"
    variant = {"variant": f"keras {name}", "val_top1": top1["val"] or 0.0,
               "test_top1": top1["test"] or 0.0, "train_seconds": round(train_s, 1)}
    weights_text = weights or "none"
    manifest = {
        "format": 1, "name": out.name, "version": time.strftime("%Y.%m.%d"),
        "description": f"{spec.title} ({strategy}) + dropout/dense, full int8, trained on "
                       f"{ds.root.name}.",
        "labels": [{"name": c, "name_en": c.split("_", 1)[-1], "bin": ds.bins[c]}
                   for c in ds.classes],
        # The model does its own preprocessing (Rescaling or preprocess_input), so its
        # uint8 input takes raw RGB pixels: mean 0, std 1.
        "input": {"size": [size, size], "color": "RGB", "crop": "center",
                  "crop_fraction": 1.0, "mean": 0.0, "std": 1.0},
        "output": "probabilities",
        "stages": [{"role": "classifier", "file": "model.tflite",
                    "sha256": sha256_bytes(tflite)}],
        "provenance": {
            "dataset": ds.root.name,
            "split": {k: len(v) for k, v in ds.splits.items()} | {"seed": ds.seed,
                                                                   "file": SPLIT_FILE},
            "backbone": arch, "strategy": strategy,
            "method": f"keras: {spec.title} weights={weights_text}, strategy {strategy} "
                      f"({frozen_layers} of {len(base.layers)} backbone layers frozen), "
                      f"{spec.preprocessing}, GAP, Dropout {args.dropout}, Dense softmax; "
                      f"full-int8 TFLite export",
            "hyperparameters": {"epochs": args.epochs, "batch_size": args.batch_size,
                                "lr": args.lr, "dropout": args.dropout, "arch": arch,
                                "strategy": strategy, "image_size": size,
                                "weights": weights_text},
            "variants": [variant], "chosen": variant["variant"],
            "metrics": {"train_top1_float": top1["train"], "val_top1_float": top1["val"],
                        "test_top1_float": top1["test"], "epochs_to_best_val": best_epoch},
            "benchmark": {"train_s": round(train_s, 1)},
        },
        "how_to_train": f"smartbin train --method keras --arch {arch} --strategy {strategy} "
                        f"--data /path/to/{ds.root.name} --out model/{out.name}",
    }
    (out / SPLIT_FILE).write_text(json.dumps(ds.record(), ensure_ascii=False) + "\n",
                                  encoding="utf-8")
    write_manifest(out, manifest)
    agreement, prob_diff = int8_vs_float(out, ds.splits["test"], probs["test"])
    manifest["provenance"]["metrics"].update(int8_float_agreement=agreement,
                                             int8_float_max_prob_diff=prob_diff)
    write_manifest(out, manifest)
    report = finalize(out, args.data, history=history,
                      target_accuracy=getattr(args, "target_accuracy", DEFAULT_TARGET_ACCURACY))
    print(f"{name}: float top-1 on test {top1['test'] or 0:.2%}; int8 bundle top-1 "
          f"{report['top1']:.2%}, bin accuracy {report['bin_accuracy']:.2%}; int8/float "
          f"agreement {agreement or 0:.2%}; {train_s:.0f} s training; wrote {out}",
          flush=True)
    return {"arch": arch, "strategy": strategy, "bundle": out.name,
            "weights": weights_text,
            "frozen_layers": frozen_layers, "backbone_layers": len(base.layers),
            "trainable_params": trainable, "frozen_params": frozen,
            "train_top1": top1["train"], "val_top1": top1["val"], "test_top1": top1["test"],
            "test_top1_int8": report["top1"], "int8_float_agreement": agreement,
            "int8_float_max_prob_diff": prob_diff,
            "epochs_to_best_val": best_epoch,
            "best_val_top1": round(float(max(val_curve)), 4) if val_curve else None,
            "train_s": round(train_s, 1), "int8_bytes": len(tflite)}


def choose(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The study's rule: best validation top-1; a tie goes to the faster int8 model."""
    def latency(row: dict[str, Any]) -> float:
        return float(row["latency"][0]["p50_ms"])
    best_val = max(r["val_top1"] or 0.0 for r in rows)
    tied = [r for r in rows if (r["val_top1"] or 0.0) == best_val]
    chosen = min(tied, key=latency)
    if len(tied) == 1:
        return chosen, f"best validation top-1 ({best_val:.2%})"
    others = ", ".join(f"{r['arch']} {r['strategy']}" for r in tied if r is not chosen)
    return chosen, (f"validation top-1 {best_val:.2%}, tied with {others}; the faster int8 "
                    f"model ({latency(chosen):.2f} ms per image, "
                    f"{chosen['latency'][0]['threads']} thread)")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def report_md(report: dict[str, Any]) -> str:
    threads = [b["threads"] for b in report["rows"][0]["latency"]]
    lat_cols = " | ".join(f"int8 ms ({t} thr)" for t in threads)
    lines = [
        f"# Backbones and strategies on {report['dataset']}", "",
        f"Split train {report['split']['train']} / val {report['split']['val']} / test "
        f"{report['split']['test']} (seed {report['split']['seed']}), the same for every row. "
        f"{report['image_size']} x {report['image_size']}, {report['epochs']} epochs, Adam "
        f"{report['lr']:g}, batch {report['batch_size']}, dropout {report['dropout']}. "
        f"Top-1 of the float model; int8 latency per image is `smartbin bench classify`'s "
        f"classify-array p50 ({report['bench_runs']} runs, backend "
        f"{report['rows'][0]['latency'][0]['backend']}). Frozen parameters as Keras counts "
        f"them (batch-norm moving statistics included).", "",
        f"| backbone | strategy | frozen layers | trainable params | frozen params | train "
        f"top-1 | val top-1 | test top-1 | int8 test top-1 | epochs to best val | train s | "
        f"int8 KB | {lat_cols} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        + " | ".join("---:" for _ in threads) + " |",
    ]
    for r in report["rows"]:
        mark = " **(chosen)**" if r["chosen"] else ""
        lat = " | ".join(f"{b['p50_ms']:.2f}" for b in r["latency"])
        lines.append(
            f"| {r['arch']}{mark} | {r['strategy']} | {r['frozen_layers']} / "
            f"{r['backbone_layers']} | {r['trainable_params']:,} | {r['frozen_params']:,} | "
            f"{_pct(r['train_top1'])} | {_pct(r['val_top1'])} | {_pct(r['test_top1'])} | "
            f"{_pct(r['test_top1_int8'])} | {r['epochs_to_best_val']} | {r['train_s']} | "
            f"{r['int8_bytes'] / 1024:,.0f} | {lat} |")
    lines += ["", f"Chosen: **{report['chosen']}**, {report['why']}. Its bundle: "
              f"`{report['chosen_bundle']}/`.", ""]
    return "\n".join(lines)


def compare(tf: Any, args: argparse.Namespace, pairs: list[tuple[str, str]],
            weights: dict[str, str | None], threads: list[int]) -> int:
    out: Path = args.out
    data = prepare(args, print)
    print(f"{len(data.ds.classes)} classes; split train {len(data.y['train'])} / val "
          f"{len(data.y['val'])} / test {len(data.y['test'])}; {len(pairs)} pairs", flush=True)
    rows = []
    for arch, strategy in pairs:
        row = train_pair(tf, data, args, arch=arch, strategy=strategy, weights=weights[arch],
                         out=out / f"{arch}-{strategy}")
        row["latency"] = bench_bundle(out / row["bundle"], args.bench_runs, threads)
        rows.append(row)
    chosen, why = choose(rows)
    for r in rows:
        r["chosen"] = r is chosen
    report = {"dataset": data.ds.root.name,
              "split": {k: len(v) for k, v in data.ds.splits.items()} | {"seed": data.ds.seed},
              "image_size": data.size, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "dropout": args.dropout, "bench_runs": args.bench_runs,
              "rows": rows, "chosen": f"{chosen['arch']} {chosen['strategy']}",
              "chosen_bundle": chosen["bundle"], "why": why}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_md(report), encoding="utf-8")
    print(f"chosen: {report['chosen']} ({why}); wrote {out / 'report.md'}")
    return 0


def run(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before TensorFlow takes its seconds.
    if args.compare:
        pairs = parse_pairs(args.pairs)
    else:
        if args.pairs:
            raise SmartbinError("--pairs goes with --compare")
        check_pair(args.arch, args.strategy)
        pairs = [(args.arch, args.strategy)]
    weights = resolve_weights(args.weights, sorted({a for a, _ in pairs}))
    threads = [int(t) for t in args.bench_threads.split(",")]

    import tensorflow as tf

    if args.compare:
        return compare(tf, args, pairs, weights, threads)
    data = prepare(args, print)
    train_pair(tf, data, args, arch=args.arch, strategy=args.strategy,
               weights=weights[args.arch], out=args.out)
    return 0
