"""Full-int8 TFLite export of a dense head, written without TensorFlow."""

from __future__ import annotations

import numpy as np

from bin_controller.vision import tflite_format as tfl
from bin_controller.vision.backends import make_interpreter
from bin_controller.vision.classifier import StageRunner, dequantize, quantize
from training.head import Dense, forward, softmax


def _range_quant(lo: float, hi: float) -> tuple[float, int]:
    """int8 scale and zero point covering [lo, hi], which always includes 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-6) / 255.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def export_head(
    layers: list[Dense],
    calibration: np.ndarray,
    *,
    input_scale: float,
    input_zero_point: int,
    description: str = "smartbin head",
) -> bytes:
    """Head taking int8 features with the given quantization; softmax int8 output.

    `calibration` holds real-valued features (a representative sample of the training
    split) that fix each layer's output range.
    """
    g = tfl.Graph()
    width = layers[0].weight.shape[1]
    x = g.add(tfl.Tensor("features", [1, width], tfl.INT8, input_scale, input_zero_point))
    g.inputs = [x]
    activations = forward(layers, calibration.astype(np.float32))
    in_scale = input_scale
    for i, (layer, act) in enumerate(zip(layers, activations, strict=True)):
        w_scale = max(float(np.abs(layer.weight).max()), 1e-8) / 127.0
        w_q = np.clip(np.round(layer.weight / w_scale), -127, 127).astype(np.int8)
        b_q = np.round(layer.bias / (in_scale * w_scale)).astype(np.int32)
        lo, hi = float(np.percentile(act, 0.01)), float(np.percentile(act, 99.99))
        out_scale, out_zp = _range_quant(0.0 if layer.relu else lo, hi)
        w = g.add(tfl.Tensor(f"dense{i}/weight", list(w_q.shape), tfl.INT8, w_scale, 0, w_q))
        b = g.add(tfl.Tensor(f"dense{i}/bias", [len(b_q)], tfl.INT32, in_scale * w_scale, 0,
                             b_q))
        y = g.add(tfl.Tensor(f"dense{i}/out", [1, w_q.shape[0]], tfl.INT8, out_scale, out_zp))
        activation = tfl.ACT_RELU if layer.relu else tfl.ACT_NONE
        g.ops.append(tfl.Op(tfl.FULLY_CONNECTED, [x, w, b], [y], {"activation": activation}))
        x, in_scale = y, out_scale
    probs = g.add(tfl.Tensor("probabilities", [1, layers[-1].weight.shape[0]], tfl.INT8,
                             1.0 / 256.0, -128))
    g.ops.append(tfl.Op(tfl.SOFTMAX, [x], [probs], {"beta": 1.0}))
    g.outputs = [probs]
    return tfl.write_model(g, description)


def int8_agreement(head: bytes, layers: list[Dense], features: np.ndarray) -> dict[str, float]:
    """The exported head against the float layers on real-valued features: the share of
    equal top-1 answers and the largest probability difference (the int8 softmax moves in
    steps of 1/256)."""
    _backend, interpreter = make_interpreter("auto", head, where="the exported head")
    runner = StageRunner(interpreter, "the exported head")
    x = np.asarray(features, np.float32)
    int8 = np.stack([dequantize(runner.run(quantize(row[None], runner.input_quant)),
                                runner.output_quant).reshape(-1) for row in x])
    ref = softmax(forward(layers, x)[-1])
    return {"top1_agreement": round(float((int8.argmax(1) == ref.argmax(1)).mean()), 4),
            "max_prob_diff": round(float(np.abs(int8 - ref).max()), 4)}


def pooling_backbone(size: int, grid: int) -> bytes:
    """A fixed int8 'backbone' for the demo bundle: average-pools the image to a grid.

    Input pixels p arrive as p - 128 (scale 1, zero point -128); the output is the flat
    grid of mean colours with the same quantization.
    """
    if size % grid:
        raise ValueError("image size must be a multiple of the grid")
    cell = size // grid
    g = tfl.Graph()
    x = g.add(tfl.Tensor("image", [1, size, size, 3], tfl.INT8, 1.0, -128))
    pooled = g.add(tfl.Tensor("pooled", [1, grid, grid, 3], tfl.INT8, 1.0, -128))
    shape = g.add(tfl.Tensor("flat_shape", [2], tfl.INT32,
                             data=np.array([1, grid * grid * 3], np.int32)))
    flat = g.add(tfl.Tensor("features", [1, grid * grid * 3], tfl.INT8, 1.0, -128))
    g.ops = [
        tfl.Op(tfl.AVERAGE_POOL_2D, [x], [pooled], {"stride": cell, "filter": cell}),
        tfl.Op(tfl.RESHAPE, [pooled, shape], [flat], {"new_shape": [1, grid * grid * 3]}),
    ]
    g.inputs, g.outputs = [x], [flat]
    return tfl.write_model(g, "smartbin demo backbone: average-pooled colour grid")
