"""Calibration (temperature folded into a head), the accuracy-against-coverage curve with
the threshold for a target accuracy, and the matplotlib report plots."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest
from PIL import Image

from bin_controller.errors import SmartbinError
from tests.test_cli import smartbin
from training import plots
from training.calibration import (
    advice,
    bin_probabilities,
    calibrate,
    coverage_curve,
    fold_temperature,
    summary,
    threshold_for,
)
from training.export_head import export_head, int8_agreement
from training.head import Dense, forward, softmax
from training.teach_method import expected_calibration_error, fit_temperature, nll

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _heads(rng):
    one = [Dense(rng.normal(size=(5, 12)).astype(np.float32), rng.normal(size=5))]
    two = [Dense(rng.normal(size=(7, 12)).astype(np.float32), rng.normal(size=7), True),
           Dense(rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=5))]
    return one, two


@pytest.mark.parametrize("which", [0, 1])
def test_folded_temperature_is_softmax_of_scaled_logits(which):
    rng = np.random.default_rng(which)
    layers = _heads(rng)[which]
    x = rng.normal(size=(20, 12)).astype(np.float32)
    original = forward(layers, x)[-1].copy()
    for t in (0.5, 2.5):
        want = softmax(forward(layers, x)[-1] / t)
        got = softmax(forward(fold_temperature(layers, t), x)[-1])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The layers given are left alone (the caller may still need the unscaled head).
    np.testing.assert_array_equal(forward(layers, x)[-1], original)
    with pytest.raises(ValueError, match="positive"):
        fold_temperature(layers, 0.0)


def _overconfident(seed, n=600, *, classes=4, width=16, noise=1.0, too_sure=4.0,
                   offset=0.0):
    """Photos' features around class means (fixed for a given class count and width; the
    seed draws the photos), and a linear head that is right as often as can be but
    `too_sure` times too sure: for Gaussian classes the calibrated logits are
    m . x / noise^2 - |m|^2 / (2 noise^2). `offset` shifts the features to be non-negative,
    like a backbone's after ReLU6."""
    means = np.random.default_rng(1000 + width).normal(size=(classes, width))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = np.clip(means[y] + noise * rng.normal(size=(n, width)) + offset, 0, None)
    k = too_sure / noise**2
    w = k * means
    b = -k * (means @ np.full(width, offset) + 0.5 * (means**2).sum(1))
    return [Dense(w.astype(np.float32), b.astype(np.float32))], x.astype(np.float32), y


def test_calibration_lowers_nll_and_ece_of_an_overconfident_head():
    layers, x, y = _overconfident(3)
    logits = forward(layers, x)[-1]
    assert 0.6 < (logits.argmax(1) == y).mean() < 0.95  # it makes mistakes, surely
    folded, cal = calibrate(layers, [x], y)
    assert 3.0 < cal.temperature < 5.0  # four times too sure, softened about four times
    assert cal.val_nll_after < 0.7 * cal.val_nll_before
    assert cal.val_ece_after < 0.05 < cal.val_ece_before
    # The recorded numbers are those of the folded head.
    assert cal.val_nll_after == pytest.approx(nll(forward(folded, x)[-1], y), rel=1e-4)
    assert cal.val_ece_after == pytest.approx(
        expected_calibration_error(softmax(forward(folded, x)[-1]), y), abs=1e-6)
    # Same answers: a temperature never changes the top label.
    np.testing.assert_array_equal(forward(folded, x)[-1].argmax(1), logits.argmax(1))
    # On fresh photos from the same classes it holds: the fit is not only the split's.
    _, x2, y2 = _overconfident(33)
    before = expected_calibration_error(softmax(forward(layers, x2)[-1]), y2)
    after = expected_calibration_error(softmax(forward(folded, x2)[-1]), y2)
    assert after < 0.5 * before


def test_calibration_with_test_time_flip_uses_the_averaged_probabilities():
    rng = np.random.default_rng(4)
    layers, x, y = _overconfident(4)
    x_flip = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
    folded, cal = calibrate(layers, [x, x_flip], y)
    averaged = (softmax(forward(folded, x)[-1]) + softmax(forward(folded, x_flip)[-1])) / 2
    assert cal.val_ece_after == pytest.approx(expected_calibration_error(averaged, y), abs=1e-6)
    assert cal.val_ece_after < cal.val_ece_before


def test_a_validation_split_without_mistakes_never_sharpens():
    layers, x, y = _overconfident(5, noise=0.05, too_sure=1e-4)  # right, and unsure
    logits = forward(layers, x)[-1]
    assert (logits.argmax(1) == y).all()
    # Left to itself the fit sharpens to its bound: the NLL falls all the way to T -> 0.
    assert fit_temperature(logits, y) < 0.1
    _, cal = calibrate(layers, [x], y)
    assert cal.temperature == pytest.approx(1.0)


def test_int8_export_follows_the_calibrated_head():
    layers, x, y = _overconfident(6, width=64, noise=3.0, offset=12.0)
    # On the int8 grid already, as a backbone's features are.
    scale = float(x.max()) / 255
    x = (np.round(x / scale) * scale).astype(np.float32)
    folded, cal = calibrate(layers, [x], y)
    assert cal.temperature > 2.0  # logits several times smaller than the trained head's
    head = export_head(folded, x[:256], input_scale=scale, input_zero_point=-128)
    check = int8_agreement(head, folded, x[256:])
    assert check["top1_agreement"] >= 0.98
    # int8 weights and logits, and a softmax in steps of 1/256 (measured: 0.05).
    assert check["max_prob_diff"] < 0.1


# --- accuracy against coverage --------------------------------------------------------------

# Ten items: the bin confidence of each and whether its bin was right.
CONFIDENCE = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.45, 0.4, 0.3])
CORRECT = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 0], bool)


def _row(curve, t):
    return next(r for r in curve if abs(r["threshold"] - t) < 1e-9)


def test_coverage_curve_on_ten_items():
    curve = coverage_curve(CONFIDENCE, CORRECT)
    assert len(curve) == 101 and curve[0]["threshold"] == 0 and curve[-1]["threshold"] == 1
    # (threshold, share to the fallback bin, accuracy of the rest, items kept)
    for t, fallback, acc, kept in [(0.0, 0.0, 0.6, 10), (0.3, 0.0, 0.6, 10),
                                   (0.31, 0.1, 6 / 9, 9), (0.5, 0.3, 5 / 7, 7),
                                   # 0.55 itself is kept: the sorter falls back below it
                                   (0.55, 0.3, 5 / 7, 7), (0.56, 0.4, 5 / 6, 6),
                                   (0.75, 0.6, 0.75, 4), (0.81, 0.7, 1.0, 3),
                                   (0.95, 0.9, 1.0, 1)]:
        row = _row(curve, t)
        assert row["fallback_fraction"] == pytest.approx(fallback)
        assert row["accuracy"] == pytest.approx(acc, abs=1e-4)
        assert row["n_kept"] == kept
    empty = _row(curve, 0.96)
    assert empty["fallback_fraction"] == 1.0 and empty["accuracy"] is None
    assert threshold_for(curve, 0.8)["threshold"] == pytest.approx(0.56)
    assert threshold_for(curve, 0.95)["threshold"] == pytest.approx(0.81)
    assert threshold_for(curve, 0.6)["threshold"] == 0.0
    assert threshold_for(coverage_curve(CONFIDENCE, np.zeros(10, bool)), 0.5) is None


def test_the_bin_confidence_is_the_sum_over_its_labels():
    # Two labels of bin 0 share the item: the bin is sure (0.75) though no label is.
    probs = np.array([[0.40, 0.35, 0.25], [0.1, 0.1, 0.8]])
    bin_of = np.array([0, 0, 1])
    np.testing.assert_allclose(bin_probabilities(probs, bin_of)[0], [0.75, 0.25, 0, 0])
    s = summary(probs, np.array([1, 2]), bin_of, target=0.9)
    # Label 1 is wrong at the top-label level but its bin is right.
    assert _row(s["coverage"], 0.75)["n_kept"] == 2
    assert _row(s["coverage"], 0.76)["n_kept"] == 1
    assert _row(s["coverage"], 0.5)["accuracy"] == 1.0
    assert s["threshold_for_target"]["threshold"] == 0.0
    assert s["ece"] > s["bin_ece"]


def test_advice_names_the_threshold_to_set():
    section = {"target_accuracy": 0.95, "coverage": coverage_curve(CONFIDENCE, CORRECT)}
    section["threshold_for_target"] = threshold_for(section["coverage"], 0.95)
    text = advice(section, 0.5)
    assert text.startswith("Set `model.confidence_threshold = 0.81` for 95% bin accuracy")
    assert "70.0% of the items would go to the fallback bin" in text
    assert "at the default 0.5, 30.0% go to the fallback bin and the rest are 71.4% right" in text
    assert "already reaches" in advice(section, 0.9)
    section["coverage"] = coverage_curve(CONFIDENCE, np.zeros(10, bool))
    section["threshold_for_target"] = None
    assert advice(section, 0.5).startswith("No threshold reaches 95% bin accuracy")


# --- plots --------------------------------------------------------------------------------


def _title(fig):
    return [t.get_text() for t in fig.texts]


def _labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


HISTORY = [{"epoch": e, "loss": 1.5 / e, "train_acc": 0.5 + e / 40, "val_loss": 1.6 / e,
            "val_acc": 0.45 + e / 45} for e in range(1, 11)]


def test_plot_figures_have_titles_axis_labels_and_legends():
    fig = plots.curves_figure(HISTORY, "mini 2025.01.01: training, train and validation splits")
    assert _title(fig) == ["mini 2025.01.01: training, train and validation splits"]
    assert _labels(fig) == [("epoch", "top-1 accuracy (%)"),
                            ("epoch", "cross-entropy (nats per photo)")]
    acc, loss = fig.axes
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["train split",
                                                                    "validation split"]
    # Accuracy in percent on its own axis, loss on the other: not one shared scale.
    assert acc.get_ylim() == (0, 100) and max(acc.lines[0].get_ydata()) == pytest.approx(75)
    assert loss.get_ylim()[0] == 0 and max(loss.lines[0].get_ydata()) == pytest.approx(1.5)
    assert len(acc.get_xticks()) > 2 and len(acc.get_yticks()) > 2

    fig = plots.confusion_figure(np.array([[5, 1], [0, 4]]), ["paper", "glass"], "t: confusion")
    assert _labels(fig)[0] == ("predicted", "true")
    assert fig.axes[1].get_ylabel() == "share of the true class (%)"  # the colour bar
    assert [t.get_text() for t in fig.axes[0].texts] == ["5", "1", "4"]

    s = summary(softmax(np.random.default_rng(0).normal(size=(50, 3)) * 3),
                np.arange(50) % 3, np.array([0, 1, 2]))
    fig = plots.reliability_figure({"top label": (s["reliability"], s["ece"])}, "t: rel")
    assert _labels(fig) == [("", "accuracy in the bin (%)"), ("confidence (%)", "photos")]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["perfectly calibrated", f"top label (ECE {100 * s['ece']:.1f} points)"]

    fig = plots.coverage_figure(coverage_curve(CONFIDENCE, CORRECT), "t: coverage",
                                target=0.95, chosen=0.81, current=0.5)
    assert _labels(fig) == [("model.confidence_threshold (bin probability)", "% of the items")]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["bin accuracy of the items sorted", "items sent to the fallback bin",
                      "target accuracy 95 %", "threshold 0.81", "configured threshold 0.5"]


def test_plots_are_written_as_png_with_their_titles(tmp_path):
    curve = coverage_curve(CONFIDENCE, CORRECT)
    plots.curves_png(HISTORY, tmp_path / "training.png", "mini: training")
    plots.confusion_png(np.eye(3, dtype=int) * 4, ["纸箱", "glass", "metal"],
                        tmp_path / "confusion.png", "mini: test split, confusion")
    plots.coverage_png(curve, tmp_path / "coverage.png", "mini: test split, coverage",
                       target=0.95, chosen=None)
    for name, title in [("training.png", "mini: training"),
                        ("confusion.png", "mini: test split, confusion"),
                        ("coverage.png", "mini: test split, coverage")]:
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 500
            assert img.text["Title"] == title


def _block_matplotlib(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_missing_matplotlib_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    _block_matplotlib(monkeypatch)
    for call in (plots.require,
                 lambda: plots.curves_png(HISTORY, tmp_path / "c.png", "t"),
                 lambda: plots.coverage_png([], tmp_path / "v.png", "t", target=0.9,
                                            chosen=None)):
        with pytest.raises(SmartbinError) as err:
            call()
        assert str(err.value) == plots.MISSING
        assert "\n" not in str(err.value) and "pip install 'smartbin[plots]'" in str(err.value)
    assert not (tmp_path / "c.png").exists()


def test_missing_matplotlib_stops_train_and_evaluate_before_they_start(tmp_path):
    # A matplotlib package that cannot be imported, first on the path.
    fake = tmp_path / "blocked" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p)
    data = tmp_path / "photos"
    data.mkdir()
    for args in (["train", "--data", str(data), "--out", str(tmp_path / "o")],
                 ["evaluate", "--model", "demo", "--data", str(data), "--out",
                  str(tmp_path / "rep")]):
        r = smartbin(*args, env={"PYTHONPATH": path})
        assert r.returncode == 2, r.stderr
        assert r.stderr == f"smartbin: error: {plots.MISSING}\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "rep").exists()

