"""The study's keras strategies on small generated data, weights=None, full-int8 export."""

from __future__ import annotations

import json

import pytest

from bin_controller.vision.bundle import load_bundle
from bin_controller.vision.classifier import Classifier
from tests.test_cli import smartbin
from tests.test_training import make_dataset


def _tf():
    try:
        import tensorflow as tf
    except ImportError:
        import os

        if os.environ.get("CI"):
            pytest.fail("TensorFlow (the train extra) must be installed in CI")
        pytest.skip("TensorFlow is not installed (pip install -e '.[train]')")
    return tf


@pytest.mark.parametrize("strategy, frozen", [("connect", "all"), ("140after", 140),
                                              ("all", 0)])
def test_strategies_freeze_what_the_study_froze(strategy, frozen):
    tf = _tf()
    from training.keras_method import build_model

    model = build_model(tf, 5, size=96, strategy=strategy, weights=None, dropout=0.5)
    base = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
    trainable = [layer.trainable for layer in base.layers]
    if frozen == "all":
        assert not base.trainable
    elif frozen == 0:
        assert all(trainable)
    else:
        assert not any(trainable[:140]) and all(trainable[140:])
    assert model.layers[-1].units == 5 and model.layers[-2].rate == 0.5


@pytest.mark.slow
def test_keras_method_end_to_end(tmp_path):
    _tf()
    root = make_dataset(tmp_path / "GarbageMini", per_class=10)
    out = tmp_path / "kbundle"
    r = smartbin("train", "--method", "keras", "--strategy", "140after", "--weights", "none",
                 "--data", str(root), "--out", str(out), "--epochs", "2", "--image-size",
                 "96", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "int8/float agreement" in r.stdout
    bundle = load_bundle(out)
    assert len(bundle.labels) == 8 and bundle.input.width == 96
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["metrics"]["int8_float_agreement"] is not None
    report = json.loads((out / "report" / "report.json").read_text())
    assert {"n", "top1", "top5", "bin_accuracy"} <= set(report)
    c = Classifier(out)
    details = c.stages[0].interpreter.get_input_details()[0]
    assert details["dtype"].__name__ == "uint8"
    assert c.stages[0].output_quant.dtype.__name__ == "uint8"
