"""Pooled features of a frozen backbone, computed once per image."""

from __future__ import annotations

import numpy as np

from bin_controller.backends import make_interpreter
from bin_controller.bundle import InputSpec
from bin_controller.classifier import _pixel_mapper, _StageRunner, dequantize
from bin_controller.preprocess import prepare_array


class StageFeatures:
    """Runs one backbone stage and returns its real-valued output per image."""

    def __init__(self, model: bytes, *, size: int, mean: float, std: float,
                 backend: str = "auto", num_threads: int = 2) -> None:
        self.backend, interpreter = make_interpreter(backend, model, num_threads=num_threads)
        self.runner = _StageRunner(interpreter)
        self.spec = InputSpec(size, size, mean, std)
        self._to_input = _pixel_mapper(self.spec, self.runner.input_quant)

    @property
    def quant(self):
        return self.runner.output_quant

    def raw(self, rgb: np.ndarray) -> np.ndarray:
        """Quantized output for one frame (any size; centre-cropped and resized)."""
        pixels = prepare_array(rgb, self.spec)
        return self.runner.run(self._to_input(pixels)).reshape(-1).copy()

    def one(self, rgb: np.ndarray) -> np.ndarray:
        return dequantize(self.raw(rgb), self.quant)

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.one(img) for img in images])
