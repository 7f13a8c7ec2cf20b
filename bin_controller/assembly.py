"""The composition root: the one place that turns a validated config into a running bin."""

from __future__ import annotations

from bin_controller.config import ModelSection
from bin_controller.vision.classifier import Classifier


def make_classifier(model: ModelSection, *, bundle: str | None = None,
                    threads: int | None = None) -> Classifier:
    """The classifier `model` describes (or another bundle with the same settings), loaded
    and checked completely: a broken bundle raises before anything uses it."""
    return Classifier(bundle or model.bundle, backend=model.backend,
                      num_threads=threads or model.threads, backbone=model.backbone or None,
                      models_dir=model.dir)
