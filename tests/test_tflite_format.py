"""The project's own TFLite writer and the derived pooled backbone."""

from __future__ import annotations

import numpy as np
import pytest

from bin_controller.vision import tflite_format as tfl
from bin_controller.vision.backends import resolve_backend
from bin_controller.vision.bundle import InputSpec
from bin_controller.vision.preprocess import load_image, prepare_image
from tests.conftest import trashnet_sample
from training.export_head import export_head
from training.head import Dense, forward, softmax

POOL = "MobilenetV2/Logits/AvgPool"


def test_written_head_matches_float_math(backend):
    rng = np.random.default_rng(0)
    layers = [Dense(rng.normal(0, 0.1, (16, 40)).astype(np.float32),
                    rng.normal(0, 0.1, 16).astype(np.float32), relu=True),
              Dense(rng.normal(0, 0.3, (5, 16)).astype(np.float32),
                    rng.normal(0, 0.1, 5).astype(np.float32))]
    q = rng.integers(0, 256, (300, 40)).astype(np.uint8)
    real = (q.astype(np.float32) - 0) * 0.05
    head = export_head(layers, real[:200], input_scale=0.05, input_zero_point=-128)
    _, cls = resolve_backend(backend)
    it = cls(model_content=head)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    expected = softmax(forward(layers, real)[-1])
    agree = 0
    for row, want in zip(q[200:], expected[200:], strict=True):
        it.set_tensor(inp["index"], (row ^ 0x80).view(np.int8)[None])
        it.invoke()
        got = (it.get_tensor(out["index"])[0].astype(np.float32) + 128) / 256
        assert np.abs(got - want).max() < 0.06
        agree += int(got.argmax() == want.argmax())
    assert agree >= 95


def test_truncate_rejects_unknown_tensor(mobilenet_file):
    with pytest.raises(tfl.TFLiteFormatError, match="no tensor named"):
        tfl.truncate_at_tensor(mobilenet_file.read_bytes(), "nope")
    with pytest.raises(tfl.TFLiteFormatError, match="TFL3"):
        tfl.truncate_at_tensor(b"\0" * 64, POOL)


@pytest.mark.slow
def test_derived_backbone_gives_identical_features(backend, mobilenet_file, trashnet_dir):
    """The cut model's output equals the original's pooled tensor, bit for bit."""
    original = mobilenet_file.read_bytes()
    derived = tfl.truncate_at_tensor(original, POOL)
    _, cls = resolve_backend(backend)
    full = cls(model_content=original, experimental_preserve_all_tensors=True)
    full.allocate_tensors()
    cut = cls(model_content=derived)
    cut.allocate_tensors()
    assert cut.get_output_details()[0]["name"] == POOL
    assert list(cut.get_output_details()[0]["shape"]) == [1, 1, 1, 1280]
    pool_index = next(t["index"] for t in full.get_tensor_details() if t["name"] == POOL)
    spec = InputSpec(224, 224, 128.0, 128.0)
    for photo in trashnet_sample(trashnet_dir, 2):
        x = prepare_image(load_image(photo), spec)[None]
        for it in (full, cut):
            it.set_tensor(it.get_input_details()[0]["index"], x)
            it.invoke()
        a = full.get_tensor(pool_index)
        b = cut.get_tensor(cut.get_output_details()[0]["index"])
        assert a.any()
        np.testing.assert_array_equal(a, b)
