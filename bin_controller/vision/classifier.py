"""The int8 TFLite classifier: a bundle's stages chained, quantization handled both ways."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.bins import BINS
from bin_controller.errors import BundleError, SmartbinError
from bin_controller.vision.backends import make_interpreter
from bin_controller.vision.bundle import Bundle, InputSpec, Label, load_bundle
from bin_controller.vision.preprocess import load_image, prepare_array, prepare_image


@dataclass(frozen=True)
class Quant:
    dtype: type
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.dtype in (np.uint8, np.int8) and self.scale > 0


def _quant(detail: dict[str, Any]) -> Quant:
    scale, zp = detail.get("quantization", (0.0, 0))
    if not np.isfinite(scale):
        # A NaN scale would turn every pixel into NaN and every answer into noise.
        raise ValueError(f"tensor {detail.get('name', '')!r} has quantization scale {scale}")
    return Quant(detail["dtype"], float(scale), int(zp))


def dequantize(values: np.ndarray, q: Quant) -> np.ndarray:
    """Real values of a tensor; int8 and uint8 alike go through (q - zero_point) * scale."""
    if not q.quantized:
        return values.astype(np.float32)
    return (values.astype(np.int32) - q.zero_point).astype(np.float32) * np.float32(q.scale)


def quantize(real: np.ndarray, q: Quant) -> np.ndarray:
    if not q.quantized:
        return real.astype(q.dtype)
    info = np.iinfo(q.dtype)
    scaled = np.round(real / q.scale) + q.zero_point
    return np.clip(scaled, info.min, info.max).astype(q.dtype)


ArrayMap = Callable[[np.ndarray], np.ndarray]


def pixel_mapper(spec: InputSpec, q: Quant) -> ArrayMap:
    """A function from uint8 pixels to the input tensor's values.

    Quantized image models usually fold normalization into the input quantization, so
    pixels pass through unchanged (uint8) or shifted by 128 (int8): no float math at all.
    """
    if q.quantized:
        gain = 1.0 / (spec.std * q.scale)
        offset = -spec.mean / (spec.std * q.scale) + q.zero_point
        if abs(gain - 1.0) < 1e-6:
            if q.dtype is np.uint8 and abs(offset) < 1e-6:
                return lambda px: px
            if q.dtype is np.int8 and abs(offset + 128) < 1e-6:
                return lambda px: (px ^ np.uint8(0x80)).view(np.int8)
        info = np.iinfo(q.dtype)
        return lambda px: np.clip(np.round(px * gain + offset), info.min, info.max).astype(q.dtype)
    mean, std = np.float32(spec.mean), np.float32(spec.std)
    return lambda px: ((px.astype(np.float32) - mean) / std).astype(q.dtype)


class StageRunner:
    def __init__(self, interpreter: Any, where: str = "the model") -> None:
        self.interpreter = interpreter
        try:
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
            self.input_index, self.input_shape = inp["index"], tuple(inp["shape"])
            self.output_index, self.output_shape = out["index"], tuple(out["shape"])
            self.input_quant, self.output_quant = _quant(inp), _quant(out)
        # What a loaded but damaged model raises here: no inputs or outputs (IndexError), a
        # name that is not UTF-8, an odd quantization entry.
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{where}: unusable model inputs or outputs ({exc})") from exc

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input_index, x.reshape(self.input_shape))
        self.interpreter.invoke()
        out: np.ndarray = self.interpreter.get_tensor(self.output_index)
        return out


def _converter(src: Quant, dst: Quant) -> ArrayMap:
    """Moves one stage's output into the next stage's input type without losing precision."""
    if src == dst:
        return lambda v: v
    same_real = src.quantized and dst.quantized and abs(src.scale - dst.scale) < 1e-9
    if same_real and src.dtype is np.uint8 and dst.dtype is np.int8 \
            and dst.zero_point == src.zero_point - 128:
        return lambda v: (v ^ np.uint8(0x80)).view(np.int8)
    return lambda v: quantize(dequantize(v, src), dst)


@dataclass
class Prediction:
    label: Label
    index: int
    confidence: float
    top: list[tuple[Label, float]]
    latency_ms: float
    probabilities: np.ndarray
    # The bin is decided on its own probability, the sum over its labels: an item the
    # model splits between paper and cardboard is still confidently recyclable.
    bin: str = ""
    bin_confidence: float = 0.0


class Classifier:
    """Classifies RGB frames or image files with a model bundle."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        backend: str = "auto",
        num_threads: int = 1,
        top_k: int = 5,
        backbone: str | None = None,
        models_dir: str | Path | None = None,
    ) -> None:
        self.bundle = (bundle if isinstance(bundle, Bundle)
                       else load_bundle(bundle, models_dir=models_dir))
        if num_threads < 1:
            raise SmartbinError(f"num_threads must be 1 or more, got {num_threads}")
        self.num_threads = num_threads
        self.top_k = top_k
        self.stages: list[StageRunner] = []
        self.backend = ""
        models = self.bundle.stage_models(backbone=backbone)
        for stage, data in zip(self.bundle.stages, models, strict=True):
            where = self.bundle.stage_where(stage)
            self.backend, interpreter = make_interpreter(backend, data,
                                                         num_threads=num_threads, where=where)
            self.stages.append(StageRunner(interpreter, where))
        self._check_shapes()
        self._bin_index = np.array([BINS.index(lab.bin) for lab in self.bundle.labels])
        first = self.stages[0]
        self._to_input = pixel_mapper(self.bundle.input, first.input_quant)
        self._between = [
            _converter(a.output_quant, b.input_quant)
            for a, b in zip(self.stages, self.stages[1:], strict=False)
        ]

    def _check_shapes(self) -> None:
        where = self.bundle.path / "manifest.json"
        spec = self.bundle.input
        shape = self.stages[0].input_shape
        if len(shape) != 4 or shape[1:] != (spec.height, spec.width, 3):
            raise BundleError(
                f"{where}: input.size is {spec.width}x{spec.height} but the first stage takes "
                f"{list(shape)}"
            )
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            if int(np.prod(a.output_shape)) != int(np.prod(b.input_shape)):
                raise BundleError(
                    f"{where}: a stage gives {list(a.output_shape)} but the next one takes "
                    f"{list(b.input_shape)}"
                )
        width = int(np.prod(self.stages[-1].output_shape))
        if width != len(self.bundle.labels):
            raise BundleError(
                f"{where}: {len(self.bundle.labels)} labels but the model has {width} outputs"
            )

    @property
    def input_spec(self) -> InputSpec:
        return self.bundle.input

    def invoke(self, pixels: np.ndarray) -> np.ndarray:
        """Run the stages on model-sized uint8 pixels; returns the last stage's real values."""
        x = self._to_input(pixels)
        for i, stage in enumerate(self.stages):
            if i:
                x = self._between[i - 1](x)
            x = stage.run(x)
        return dequantize(x.reshape(-1), self.stages[-1].output_quant)

    def _probabilities(self, pixels: np.ndarray) -> np.ndarray:
        out = self.invoke(pixels)
        if self.bundle.output == "logits":
            e = np.exp(out - out.max())
            out = e / e.sum()
        return out

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities, averaged with the mirrored view when the bundle asks for it."""
        scores = self._probabilities(pixels)
        if self.bundle.test_time_flip:
            mirrored = np.ascontiguousarray(pixels[:, ::-1])
            scores = (scores + self._probabilities(mirrored)) / 2
        return scores

    def _predict(self, pixels: np.ndarray, started: float) -> Prediction:
        probs = self.scores(pixels)
        k = min(self.top_k, probs.size)
        order = np.argsort(-probs, kind="stable")[:k]
        labels = self.bundle.labels
        top = [(labels[i], float(probs[i])) for i in order]
        best = int(order[0])
        bin_scores = np.bincount(self._bin_index, weights=probs, minlength=len(BINS))
        bin_best = int(np.argmax(bin_scores))
        latency = (time.perf_counter() - started) * 1000
        return Prediction(labels[best], best, float(probs[best]), top, latency, probs,
                          BINS[bin_best], float(bin_scores[bin_best]))

    def classify_array(self, rgb: np.ndarray) -> Prediction:
        """Classify a camera frame: uint8 [H, W, 3] in RGB order."""
        started = time.perf_counter()
        return self._predict(prepare_array(rgb, self.bundle.input), started)

    def classify_file(self, path: str | Path) -> Prediction:
        started = time.perf_counter()
        image = load_image(path, self.bundle.input)
        return self._predict(prepare_image(image, self.bundle.input), started)
