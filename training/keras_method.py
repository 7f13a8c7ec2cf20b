"""`smartbin train --method keras`: the study's three strategies in tf.keras, full-int8 export.

MobileNetV2 (ImageNet weights, a local weights file, or none), Rescaling(1/127.5, -1),
global average pooling, dropout, dense softmax. `connect` freezes every backbone layer,
`140after` freezes the first 140, `all` trains everything. The model is converted to a
full-int8 TFLite file (uint8 in and out) calibrated on images from the training split, and
its agreement with the float model is measured on the test split. Needs TensorFlow (the
`train` extra); the bin itself never does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.errors import SmartbinError
from bin_controller.vision.bundle import InputSpec, write_manifest
from bin_controller.vision.fetch import sha256_bytes
from bin_controller.vision.preprocess import load_image, prepare_image
from training.dataset import Sample, load_dataset
from training.evaluate import SPLIT_FILE
from training.train import finalize

FROZEN_140 = 140
REPRESENTATIVE = 100


def _pixels(samples: list[Sample], size: int) -> np.ndarray:
    spec = InputSpec(size, size, crop="center")
    return np.stack([prepare_image(load_image(s.path), spec) for s in samples])


def build_model(tf: Any, n_classes: int, *, size: int, strategy: str, weights: str | None,
                dropout: float) -> Any:
    keras = tf.keras
    if weights and weights not in ("imagenet",) and not Path(weights).is_file():
        raise SmartbinError(f"--weights {weights}: no such file (or use 'imagenet', 'none')")
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False,
        weights="imagenet" if weights == "imagenet" else None)
    if weights and weights != "imagenet":
        base.load_weights(weights)
    if strategy == "connect":
        base.trainable = False
    elif strategy == "140after":
        base.trainable = True
        for layer in base.layers[:FROZEN_140]:
            layer.trainable = False
    elif strategy == "all":
        base.trainable = True
    else:
        raise SmartbinError(f"--strategy {strategy}: use connect, 140after or all")
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    # A frozen backbone keeps its batch-norm statistics (inference mode), as in the study.
    x = base(x, training=False) if strategy == "connect" else base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


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


def run(args: argparse.Namespace) -> int:
    import tensorflow as tf

    started = time.perf_counter()
    size = getattr(args, "image_size", 224)
    tf.keras.utils.set_random_seed(args.seed)
    ds = load_dataset(args.data, seed=args.seed, bin_map=args.bins)
    for rel, reason in ds.skipped:
        print(f"skipped {rel}: {reason}")
    for warning in ds.warnings:
        print(f"warning: {warning}")
    x = {k: _pixels(v, size) for k, v in ds.splits.items()}
    y = {k: np.array([s.label for s in v]) for k, v in ds.splits.items()}
    weights = None if (args.weights or "imagenet").lower() == "none" else \
        (args.weights or "imagenet")
    model = build_model(tf, len(ds.classes), size=size, strategy=args.strategy,
                        weights=weights, dropout=args.dropout)
    model.compile(optimizer=tf.keras.optimizers.Adam(args.lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    fit = model.fit(x["train"].astype(np.float32), y["train"], batch_size=args.batch_size,
                    epochs=args.epochs, verbose=2,
                    validation_data=(x["val"].astype(np.float32), y["val"])
                    if len(y["val"]) else None)
    train_s = time.perf_counter() - started
    float_test = model.predict(x["test"].astype(np.float32), verbose=0)
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(x["train"]))[:REPRESENTATIVE]
    tflite = export_int8(tf, model, x["train"][pick])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.tflite").write_bytes(tflite)
    interpreter = tf.lite.Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    agree = []
    for image, ref in zip(x["test"], float_test, strict=True):
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        agree.append(int(np.argmax(interpreter.get_tensor(outp["index"])[0])) ==
                     int(np.argmax(ref)))
    history = [{"epoch": i + 1, "loss": fit.history["loss"][i],
                "train_acc": fit.history["accuracy"][i],
                **({"val_loss": fit.history["val_loss"][i],
                    "val_acc": fit.history["val_accuracy"][i]}
                   if "val_loss" in fit.history else {})}
               for i in range(len(fit.history["loss"]))]
    val_acc = history[-1].get("val_acc")
    float_top1 = float((float_test.argmax(1) == y["test"]).mean()) if len(y["test"]) else None
    variant = {"variant": f"keras {args.strategy}", "val_top1": round(val_acc or 0, 4),
               "test_top1": round(float_top1 or 0, 4), "train_seconds": round(train_s, 1)}
    manifest = {
        "format": 1, "name": out.name, "version": time.strftime("%Y.%m.%d"),
        "description": f"MobileNetV2 ({args.strategy}) + dropout/dense, full int8, trained "
                       f"on {ds.root.name}.",
        "labels": [{"name": c, "name_en": c.split("_", 1)[-1], "bin": ds.bins[c]}
                   for c in ds.classes],
        # The model rescales inside; its uint8 input takes raw pixels (mean 0, std 1).
        "input": {"size": [size, size], "color": "RGB", "crop": "center",
                  "crop_fraction": 1.0, "mean": 0.0, "std": 1.0},
        "output": "probabilities",
        "stages": [{"role": "classifier", "file": "model.tflite",
                    "sha256": sha256_bytes(tflite)}],
        "provenance": {
            "dataset": ds.root.name,
            "split": {k: len(v) for k, v in ds.splits.items()} | {"seed": ds.seed,
                                                                   "file": SPLIT_FILE},
            "method": f"keras: MobileNetV2 weights={weights or 'none'}, strategy "
                      f"{args.strategy}, Rescaling(1/127.5, -1), GAP, Dropout "
                      f"{args.dropout}, Dense softmax; full-int8 TFLite export",
            "hyperparameters": {"epochs": args.epochs, "batch_size": args.batch_size,
                                "lr": args.lr, "dropout": args.dropout,
                                "strategy": args.strategy},
            "variants": [variant], "chosen": variant["variant"],
            "metrics": {"val_top1_float": val_acc, "test_top1_float": float_top1,
                        "int8_float_agreement": round(float(np.mean(agree)), 4)
                        if agree else None},
            "benchmark": {"train_s": round(train_s, 1)},
        },
        "how_to_train": f"smartbin train --method keras --strategy {args.strategy} "
                        f"--data /path/to/{ds.root.name} --out model/{out.name}",
    }
    (out / SPLIT_FILE).write_text(json.dumps(ds.record(), ensure_ascii=False) + "\n",
                                  encoding="utf-8")
    write_manifest(out, manifest)
    report = finalize(out, args.data, history=history)
    print(f"float top-1 on test {float_top1:.2%}; int8 bundle top-1 {report['top1']:.2%}, "
          f"bin accuracy {report['bin_accuracy']:.2%}; int8/float agreement "
          f"{manifest['provenance']['metrics']['int8_float_agreement']:.2%}; "
          f"{train_s:.0f} s training; wrote {out}")
    return 0
