"""Real inference through the bundle loader, under LiteRT or (own venv) tflite-runtime."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bin_controller.vision import tflite_format as tfl
from bin_controller.vision.backends import resolve_backend
from bin_controller.vision.bundle import InputSpec
from bin_controller.vision.classifier import Classifier
from bin_controller.vision.preprocess import load_image, prepare_image
from hardware_sim import items
from tests.conftest import trashnet_sample
from tests.helpers import imagenet_bundle, local_bundle


def test_backend_is_reported(backend):
    c = Classifier("demo", backend=backend)
    expected = resolve_backend(backend)[0]
    assert c.backend == expected


def test_demo_bundle_classifies_generated_items(backend):
    c = Classifier("demo", backend=backend)
    rng = np.random.default_rng(2024)  # not the training seed: unseen items
    images, kinds = items.sample(rng, 200)
    preds = [c.classify_array(img) for img in images]
    top1 = np.mean([p.index == k for p, k in zip(preds, kinds, strict=True)])
    bins = np.mean([p.label.bin == items.KINDS[k].bin for p, k in zip(preds, kinds,
                                                                      strict=True)])
    assert top1 >= 0.93, top1
    assert bins >= 0.95, bins
    for p in preds:
        assert abs(p.probabilities.sum() - 1) < 0.05
        assert p.top[0][0] == p.label and p.confidence == p.top[0][1]


@pytest.mark.slow
def test_bundle_matches_bare_interpreter_on_real_photos(backend, mobilenet_file, trashnet_dir,
                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTBIN_BACKBONE", str(mobilenet_file))
    labels = mobilenet_file.parent / "imagenet_labels.txt"
    c = Classifier(imagenet_bundle(tmp_path / "imagenet", labels), backend=backend, top_k=3)
    _, cls = resolve_backend(backend)
    bare = cls(model_path=str(mobilenet_file), num_threads=1)
    bare.allocate_tensors()
    inp, out = bare.get_input_details()[0], bare.get_output_details()[0]
    scale, zp = out["quantization"]
    assert out["dtype"] == np.uint8 and zp == 0 and abs(scale - 1 / 256) < 1e-9
    for photo in trashnet_sample(trashnet_dir, 3):
        pixels = prepare_image(load_image(photo), c.input_spec)
        bare.set_tensor(inp["index"], pixels[None])
        bare.invoke()
        raw = bare.get_tensor(out["index"])[0]
        p = c.classify_file(photo)
        assert p.index == int(np.argmax(raw)), photo
        # Dequantized scores are the raw bytes times 1/256, not the bytes themselves.
        np.testing.assert_allclose(p.probabilities, raw.astype(np.float32) / 256, atol=1e-7)
        assert 0.5 < p.probabilities.sum() < 1.5


def _int8_probe_model() -> bytes:
    """x -> FC(identity * 1) -> int8 output with a non-zero zero point, no softmax."""
    g = tfl.Graph()
    x = g.add(tfl.Tensor("x", [1, 3], tfl.INT8, 1.0, -128))
    w = g.add(tfl.Tensor("w", [3, 3], tfl.INT8, 1 / 64, 0, np.eye(3, dtype=np.int8) * 64))
    b = g.add(tfl.Tensor("b", [3], tfl.INT32, 1 / 64, 0, np.zeros(3, np.int32)))
    y = g.add(tfl.Tensor("y", [1, 3], tfl.INT8, 2.0, 10))
    g.ops = [tfl.Op(tfl.FULLY_CONNECTED, [x, w, b], [y])]
    g.inputs, g.outputs = [x], [y]
    return tfl.write_model(g)


def _probe_bundle(tmp_path, model: bytes, pool: bytes, output="probabilities"):
    labels = [{"name": f"c{i}", "bin": "other"} for i in range(3)]
    return local_bundle(tmp_path / "probe", {"pool.tflite": pool, "fc.tflite": model}, labels,
                        1, output=output)


def _pool_model(dtype: int, zp: int) -> bytes:
    """A 1x1 image through a 1x1 average pool and reshape: hands the pixels on unchanged."""
    g = tfl.Graph()
    x = g.add(tfl.Tensor("img", [1, 1, 1, 3], dtype, 1.0, zp))
    p = g.add(tfl.Tensor("p", [1, 1, 1, 3], dtype, 1.0, zp))
    s = g.add(tfl.Tensor("s", [2], tfl.INT32, data=np.array([1, 3], np.int32)))
    f = g.add(tfl.Tensor("f", [1, 3], dtype, 1.0, zp))
    g.ops = [tfl.Op(tfl.AVERAGE_POOL_2D, [x], [p], {"stride": 1, "filter": 1}),
             tfl.Op(tfl.RESHAPE, [p, s], [f], {"new_shape": [1, 3]})]
    g.inputs, g.outputs = [x], [f]
    return tfl.write_model(g)


@pytest.mark.parametrize("first", ["int8", "uint8"])
def test_quantization_both_ways(tmp_path, backend, first):
    """Pixels in, int8 with zero point 10 out: the real scores must come back exactly.

    The uint8 variant also checks the uint8 -> int8 hand-over between stages.
    """
    pool = _pool_model(tfl.INT8, -128) if first == "int8" else _pool_model(tfl.UINT8, 0)
    c = Classifier(_probe_bundle(tmp_path, _int8_probe_model(), pool, "logits"),
                   backend=backend)
    pixels = np.array([[[40, 100, 250]]], np.uint8)
    # FC output real = pixel; quantized q = round(pixel / 2) + 10, dequantized (q - 10) * 2.
    expected_real = np.array([40.0, 100.0, 234.0])  # 250 saturates at (127 - 10) * 2
    np.testing.assert_allclose(c.invoke(pixels), expected_real, atol=1e-6)
    probs = c.scores(pixels)  # "logits" bundles get a softmax on top
    assert abs(probs.sum() - 1) < 1e-5 and probs.argmax() == 2


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:10].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_centre_crop_and_resize():
    spec = InputSpec(8, 8, crop="center")
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # a white band outside the centre square
    out = prepare_image(Image.fromarray(img), spec)
    assert out.shape == (8, 8, 3) and out.max() == 0
    squash = prepare_image(Image.fromarray(img), InputSpec(8, 8, crop="none"))
    assert squash[:, 0].min() == 255


def test_float_model_input(tmp_path, backend):
    """A float model gets (pixel - mean) / std."""
    g = tfl.Graph()
    x = g.add(tfl.Tensor("x", [1, 1, 1, 3], tfl.FLOAT32))
    p = g.add(tfl.Tensor("p", [1, 1, 1, 3], tfl.FLOAT32))
    s = g.add(tfl.Tensor("s", [2], tfl.INT32, data=np.array([1, 3], np.int32)))
    f = g.add(tfl.Tensor("f", [1, 3], tfl.FLOAT32))
    g.ops = [tfl.Op(tfl.AVERAGE_POOL_2D, [x], [p], {"stride": 1, "filter": 1}),
             tfl.Op(tfl.RESHAPE, [p, s], [f], {"new_shape": [1, 3]})]
    g.inputs, g.outputs = [x], [f]
    labels = [{"name": f"c{i}", "bin": "other"} for i in range(3)]
    folder = local_bundle(tmp_path / "float", {"m.tflite": tfl.write_model(g)}, labels, 1)
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"size": [1, 1]',
                                                     '"size": [1, 1], "mean": 100, "std": 50'))
    c = Classifier(folder, backend=backend)
    scores = c.invoke(np.array([[[100, 150, 200]]], np.uint8))
    np.testing.assert_allclose(scores, [0.0, 1.0, 2.0], atol=1e-6)


def test_corrupt_bytes_are_an_image_error(tmp_path):
    from bin_controller.errors import ImageError

    bad = tmp_path / "bad.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[:100])
    with pytest.raises(ImageError, match=r"bad\.jpg"):
        Classifier("demo").classify_file(bad)


def test_tensorflow_backend_when_installed():
    """tf.lite is the last fallback; where TensorFlow is installed it gives the same answer."""
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(5)
    images, _ = items.sample(rng, 10)
    tf_c = Classifier("demo", backend="tensorflow")
    lite = Classifier("demo", backend="litert") if "litert" in _available() else None
    assert tf_c.backend == "tensorflow"
    for img in images:
        p = tf_c.classify_array(img)
        if lite is not None:
            assert p.index == lite.classify_array(img).index


def _available():
    from bin_controller.vision.backends import available_backends

    return available_backends()
