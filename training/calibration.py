"""Calibrated confidence: temperature folded into a head, and what a threshold costs.

`model.confidence_threshold` sends an item to the fallback bin when the bin's probability
(the sum over its labels) is below it; that only means something when the probabilities
are calibrated. A head trained to convergence is over-confident, so `smartbin train` fits
one temperature on the validation split and divides the last layer by it: the bundle's
softmax is then softmax(logits / T) with no change to the runtime. The evaluation report
then shows, per threshold, how many items would go to the fallback bin and how often the
rest land in the right bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bin_controller.bins import BINS
from training.head import Dense, forward, softmax
from training.teach_method import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
)

# Thresholds of the coverage curve: every hundredth, as `confidence_threshold` is written.
THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)
DEFAULT_TARGET_ACCURACY = 0.95
# The most a temperature may sharpen a head: validation splits are small (a tenth of the
# photos), and a split with few mistakes pulls T towards 0, a head sure of everything.
MIN_TEMPERATURE = 0.5
MAX_TEMPERATURE = 20.0
# ECE and reliability bins: 15 equal-width bins, the usual choice since Guo et al. 2017.
ECE_BINS = 15


def fold_temperature(layers: list[Dense], temperature: float) -> list[Dense]:
    """The head with its logits divided by `temperature` (only the last layer changes:
    a ReLU in front of it is unaffected by scaling what comes after)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    last = layers[-1]
    k = np.float32(1.0 / temperature)
    return [*layers[:-1], Dense((last.weight * k).astype(np.float32),
                                (last.bias * k).astype(np.float32), last.relu)]


@dataclass
class Calibration:
    temperature: float
    val_ece_before: float
    val_ece_after: float
    val_nll_before: float
    val_nll_after: float

    def record(self) -> dict[str, Any]:
        """The manifest's `provenance.calibration` (test ECE is added once the int8 bundle
        has been evaluated)."""
        return {"method": "temperature scaling fitted on the validation split, folded into "
                          "the last dense layer",
                "temperature": _r(self.temperature),
                "val_ece_before": _r(self.val_ece_before),
                "val_ece_after": _r(self.val_ece_after),
                "val_nll_before": _r(self.val_nll_before),
                "val_nll_after": _r(self.val_nll_after)}


def _r(value: float) -> float:
    return round(value, 4) + 0.0  # + 0.0: no -0.0 in the manifest


def view_ece(layers: list[Dense], views: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """ECE of the float head's probabilities, averaged over views as the bundle does."""
    return expected_calibration_error(_view_probs(layers, views), np.asarray(labels), ECE_BINS)


def _view_probs(layers: list[Dense], views: Sequence[np.ndarray]) -> np.ndarray:
    # As the classifier does with test-time flip: the mean of each view's softmax.
    return np.mean([softmax(forward(layers, v)[-1]) for v in views], 0)


def calibrate(layers: list[Dense], val_views: Sequence[np.ndarray],
              labels: np.ndarray) -> tuple[list[Dense], Calibration]:
    """Fit the temperature on validation features and fold it into the head.

    `val_views` holds the features of each view the bundle averages (one, or two with
    test-time flip). The temperature is fitted on every view's logits pooled, which
    calibrates each view's softmax; the ECE and NLL recorded are those of the averaged
    probabilities, as the bin sees them.
    """
    y = np.asarray(labels)
    logits = np.concatenate([forward(layers, v)[-1] for v in val_views])
    pooled = np.tile(y, len(val_views))
    if (logits.argmax(1) == pooled).all():
        # No mistakes: the NLL falls all the way to T -> 0, which says nothing about the
        # mistakes new photos will bring. Soften if need be, never sharpen.
        temperature = fit_temperature(logits, pooled, bounds=(1.0, MAX_TEMPERATURE))
    else:
        temperature = fit_temperature(logits, pooled, bounds=(MIN_TEMPERATURE, MAX_TEMPERATURE))
    folded = fold_temperature(layers, temperature)
    before, after = _view_probs(layers, val_views), _view_probs(folded, val_views)
    rows = np.arange(len(y))

    def mean_nll(p: np.ndarray) -> float:
        return float(-np.log(np.clip(p[rows, y], 1e-12, 1.0)).mean())

    if len(val_views) == 1:  # exact, through teach_method's log-softmax
        nll_before, nll_after = nll(logits, y), nll(logits / temperature, y)
    else:
        nll_before, nll_after = mean_nll(before), mean_nll(after)
    return folded, Calibration(temperature,
                               expected_calibration_error(before, y, ECE_BINS),
                               expected_calibration_error(after, y, ECE_BINS),
                               nll_before, nll_after)


def bin_probabilities(probs: np.ndarray, bin_of: np.ndarray) -> np.ndarray:
    """[n, 4] probability of each bin: the sum over its labels, as the classifier decides."""
    onehot = np.zeros((len(bin_of), len(BINS)))
    onehot[np.arange(len(bin_of)), bin_of] = 1.0
    return np.asarray(probs, np.float64) @ onehot


def coverage_curve(confidence: np.ndarray, correct: np.ndarray,
                   thresholds: np.ndarray = THRESHOLDS) -> list[dict[str, Any]]:
    """Per threshold: the share of items below it (the fallback bin, as the sorter decides
    with `bin_confidence < confidence_threshold`) and the accuracy of the items kept."""
    conf = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, bool)
    rows = []
    for t in thresholds:
        kept = conf >= t
        n_kept = int(kept.sum())
        rows.append({"threshold": float(t),
                     "fallback_fraction": round(1.0 - n_kept / len(conf), 4) if len(conf)
                     else None,
                     "accuracy": round(float(ok[kept].mean()), 4) if n_kept else None,
                     "n_kept": n_kept})
    return rows


def threshold_for(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The lowest threshold whose kept items reach `target` accuracy (the one sending the
    fewest items to the fallback bin), or None when no threshold does."""
    for row in curve:
        if row["accuracy"] is not None and row["accuracy"] >= target:
            return row
    return None


def at_threshold(curve: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The curve's row for a configured threshold (the nearest hundredth at or above it)."""
    return next((r for r in curve if r["threshold"] >= threshold - 1e-9), curve[-1])


def summary(probs: np.ndarray, truth: np.ndarray, bin_of: np.ndarray, *,
            target: float = DEFAULT_TARGET_ACCURACY) -> dict[str, Any]:
    """The report's `calibration` section from the bundle's probabilities on a split."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(truth)
    pb = bin_probabilities(p, bin_of)
    y_bin = bin_of[y]
    bin_conf = pb.max(1)
    curve = coverage_curve(bin_conf, pb.argmax(1) == y_bin)
    return {
        "ece": round(expected_calibration_error(p, y, ECE_BINS), 4),
        "bin_ece": round(expected_calibration_error(pb, y_bin, ECE_BINS), 4),
        "reliability": [_rounded(r) for r in reliability(p, y, ECE_BINS)],
        "bin_reliability": [_rounded(r) for r in reliability(pb, y_bin, ECE_BINS)],
        "target_accuracy": target,
        "threshold_for_target": threshold_for(curve, target),
        "coverage": curve,
    }


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def advice(section: dict[str, Any], default_threshold: float) -> str:
    """One sentence for report.md: the `model.confidence_threshold` to set."""
    target = section["target_accuracy"]
    now = at_threshold(section["coverage"], default_threshold)
    now_text = (f"at the default {default_threshold:g}, {now['fallback_fraction']:.1%} go to "
                f"the fallback bin and the rest are "
                + (f"{now['accuracy']:.1%} right" if now["accuracy"] is not None
                   else "none") + ".")
    chosen = section["threshold_for_target"]
    if chosen is not None and chosen["threshold"] <= default_threshold \
            and now["accuracy"] is not None and now["accuracy"] >= target:
        return (f"The configured `model.confidence_threshold = {default_threshold:g}` already "
                f"reaches {target:.0%} bin accuracy: {now['fallback_fraction']:.1%} of the items "
                f"go to the fallback bin and the rest are {now['accuracy']:.1%} right (the "
                f"lowest threshold that reaches it is {chosen['threshold']:g}, sending "
                f"{chosen['fallback_fraction']:.1%}).")
    if chosen is None:
        kept = [r for r in section["coverage"] if r["accuracy"] is not None]
        best = max(kept, key=lambda r: r["accuracy"]) if kept else None
        best_text = (f" (the best is {best['accuracy']:.1%} at {best['threshold']:g}, with "
                     f"{best['fallback_fraction']:.1%} to the fallback bin)" if best else "")
        return (f"No threshold reaches {target:.0%} bin accuracy on this split{best_text}; "
                f"{now_text}")
    return (f"Set `model.confidence_threshold = {chosen['threshold']:g}` for {target:.0%} bin "
            f"accuracy on the items the bin sorts: {chosen['fallback_fraction']:.1%} of the "
            f"items would go to the fallback bin and the rest are {chosen['accuracy']:.1%} "
            f"right; {now_text}")
