"""TFLite runtimes: LiteRT first, then tflite-runtime, then TensorFlow's own tf.lite."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bin_controller.errors import BundleError, SmartbinError

# Preference order for "auto": LiteRT has the fast int8 x86/ARM kernels and supports numpy 2.
BACKENDS: dict[str, str] = {
    "litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow",
}


def _interpreter_class(name: str) -> Callable[..., Any]:
    module = importlib.import_module(BACKENDS[name])
    cls: Callable[..., Any] = module.lite.Interpreter if name == "tensorflow" \
        else module.Interpreter
    return cls


def available_backends() -> list[str]:
    """Backends that import on this machine, in preference order."""
    found = []
    for name in BACKENDS:
        try:
            _interpreter_class(name)
        except Exception:
            continue
        found.append(name)
    return found


def resolve_backend(requested: str = "auto") -> tuple[str, Callable[..., Any]]:
    """Return (backend name, Interpreter class) for 'auto' or a named backend."""
    if requested != "auto" and requested not in BACKENDS:
        raise SmartbinError(
            f"unknown backend {requested!r}: use auto, {', '.join(BACKENDS)}"
        )
    names = list(BACKENDS) if requested == "auto" else [requested]
    errors = []
    for name in names:
        try:
            return name, _interpreter_class(name)
        except Exception as exc:
            errors.append(f"{name}: {exc}")
    hint = "pip install ai-edge-litert (or tflite-runtime on 32-bit ARM)"
    raise SmartbinError(f"no TFLite runtime could be imported ({'; '.join(errors)}); {hint}")


def make_interpreter(
    backend: str, model_content: bytes, *, num_threads: int = 1, where: str = "the model"
) -> tuple[str, Any]:
    """An interpreter with its tensors allocated; a model the runtime refuses (damaged,
    unsupported op, allocation failure) is a BundleError naming `where`."""
    name, cls = resolve_backend(backend)
    try:
        interpreter = cls(model_content=model_content, num_threads=num_threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError, MemoryError) as exc:
        reason = " ".join(str(exc).split())  # the runtimes' messages span several lines
        raise BundleError(f"{where}: {name} cannot load the model: {reason}") from exc
    return name, interpreter
