"""The few-shot teach method, its baselines, calibration and the bench, on synthetic features.

Features are made like the backbone's: nonnegative (after a ReLU) unless a test needs
negative ones, one cluster per class, and each photo's views close to each other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bin_controller.errors import SmartbinError
from tests.conftest import REPO, trashnet_sample
from training import plots
from training.head import Dense, forward, softmax, train_head
from training.teach import MAX_VIEWS, VIEW_BUDGET, VIEW_ORDER, teach_views
from training.teach_bench import (
    PI4_INVOKE_S,
    few_shot_curve,
    markdown,
    parse_shots,
    pi4_estimate,
)
from training.teach_method import (
    DEFAULT_PULL,
    DEFAULT_SCALE,
    PULLS,
    TeachSettings,
    expected_calibration_error,
    fit_few_shot,
    fit_temperature,
    imprint,
    l2_normalize,
    lbfgs,
    logistic_regression,
    nearest_class_mean,
    nll,
    one_blas_thread,
    reliability,
)

WIDTH = 48
VIEWS = ("full", "full_flip", "center")


def make_world(n_classes: int, *, spread: float = 0.6, seed: int = 0,
               nonnegative: bool = True) -> np.ndarray:
    """Class centres: random, well apart relative to the photo noise of `spread`."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (n_classes, WIDTH)) * 2.0
    return np.abs(centres) + 1.0 if nonnegative else centres


def photos(centres: np.ndarray, per_class: int | list[int], *, spread: float = 0.6,
           seed: int = 1, nonnegative: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features per view of `per_class` photos of each class, and their labels."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * len(centres)
    labels = np.concatenate([[c] * n for c, n in enumerate(counts)]).astype(int)
    base = centres[labels] + rng.normal(0.0, spread, (len(labels), WIDTH))
    views = {v: base + rng.normal(0.0, 0.1 * spread, base.shape) for v in VIEWS}
    if nonnegative:
        views = {v: np.maximum(f, 0.0) for v, f in views.items()}
    return {v: f.astype(np.float32) for v, f in views.items()}, labels


def accuracy(layers: list[Dense], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(layers, x)[-1].argmax(1) == y).mean())


# --- imprinting and the baselines -----------------------------------------------------


def test_imprint_is_the_normalised_mean_of_normalised_embeddings() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 5))
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    w = imprint(z, y, 4)
    for c in range(3):
        mean = (z[y == c] / np.linalg.norm(z[y == c], axis=1, keepdims=True)).mean(0)
        np.testing.assert_allclose(w[c], mean / np.linalg.norm(mean), atol=1e-12)
    np.testing.assert_array_equal(w[3], 0.0)  # a class without photos has no direction


def test_imprinting_ignores_photo_brightness() -> None:
    # A photo twice as bright (features scaled) must not weigh twice as much.
    z = np.array([[1.0, 0.0], [0.0, 1.0]])
    scaled = z * np.array([[10.0], [1.0]])
    np.testing.assert_allclose(imprint(scaled, np.array([0, 0]), 1),
                               imprint(z, np.array([0, 0]), 1))


def test_nearest_class_mean_is_cosine_to_the_imprint() -> None:
    centres = make_world(4)
    feats, y = photos(centres, 3)
    head = nearest_class_mean(feats["full"], y, 4)
    test, _ = photos(centres, 20, seed=7)
    cosine = l2_normalize(test["full"]) @ imprint(feats["full"], y, 4).T
    np.testing.assert_array_equal(forward(head, test["full"])[-1].argmax(1), cosine.argmax(1))


def test_logistic_regression_fits_clusters() -> None:
    centres = make_world(5)
    feats, y = photos(centres, 4)
    test, y_test = photos(centres, 30, seed=3)
    assert accuracy(logistic_regression(feats["full"], y, 5), test["full"], y_test) > 0.95


def test_lbfgs_finds_a_quadratic_minimum() -> None:
    a = np.diag([1.0, 10.0, 100.0])
    b = np.array([1.0, -2.0, 3.0])
    x = lbfgs(lambda v: (0.5 * v @ a @ v - b @ v, a @ v - b), np.zeros(3))
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-5)


# --- the teach method -------------------------------------------------------------------


def test_teach_separates_well_separated_clusters() -> None:
    centres = make_world(8)
    feats, y = photos(centres, 5)
    result = fit_few_shot(feats, y, 8)
    test, y_test = photos(centres, 40, seed=9)
    assert accuracy(result.layers, test["full"], y_test) > 0.97
    assert result.settings.pull in PULLS and result.calibrated
    assert result.cv_scheme.startswith("5-fold")
    assert len(result.cv) == len(PULLS) and all(r["n"] == len(y) for r in result.cv)


def test_one_photo_per_class_uses_the_defaults_and_still_learns() -> None:
    centres = make_world(6)
    feats, y = photos(centres, 1)
    result = fit_few_shot(feats, y, 6)
    assert (result.settings.scale, result.settings.pull) == (DEFAULT_SCALE, DEFAULT_PULL)
    assert not result.calibrated and result.temperature == 1.0 and not result.cv
    test, y_test = photos(centres, 40, seed=5)
    assert accuracy(result.layers, test["full"], y_test) > 0.9


def test_cross_validation_copes_with_classes_of_one_photo() -> None:
    # Two classes have a single photo: their held-out fold cannot be scored, the others can.
    centres = make_world(5)
    counts = [1, 3, 1, 4, 2]
    feats, y = photos(centres, counts)
    result = fit_few_shot(feats, y, 5, seed=3)
    assert result.calibrated and result.cv_scheme.startswith("4-fold")
    assert all(r["n"] == sum(c for c in counts if c > 1) for r in result.cv)
    test, y_test = photos(centres, 30, seed=4)
    assert accuracy(result.layers, test["full"], y_test) > 0.9
    # ... including the single-photo classes, which are in the final fit.
    for c in (0, 2):
        assert accuracy(result.layers, test["full"][y_test == c], y_test[y_test == c]) > 0.8


def test_views_are_learnt_from_and_only_the_deploy_view_is_scored() -> None:
    centres = make_world(4)
    feats, y = photos(centres, 3)
    # A view carrying nothing but noise would be chosen against if it were scored.
    noise = np.random.default_rng(0).random(feats["full"].shape).astype(np.float32)
    one = fit_few_shot({"full": feats["full"]}, y, 4)
    both = fit_few_shot({"a_junk": noise, "full": feats["full"]}, y, 4)
    assert both.cv_scheme.endswith("2 view(s) each") and one.cv_scheme.endswith("1 view(s) each")
    assert both.cv_top1 == 1.0
    with pytest.raises(ValueError, match="deploy view"):
        fit_few_shot({"center": feats["center"]}, y, 4)


def test_the_fit_beats_imprinting_where_a_mean_is_misleading() -> None:
    # Two classes whose means are close, told apart by one feature along which photos of
    # each class vary a lot in a shared nuisance direction: the fit must find the feature.
    rng = np.random.default_rng(2)
    n = 12
    y = np.repeat([0, 1], n)
    x = np.zeros((2 * n, WIDTH))
    x[:, 0] = np.where(y == 0, 1.0, -1.0) * 0.3  # the telling feature
    x[:, 1] = rng.normal(0, 5.0, 2 * n)  # nuisance, large
    x[:, 2:] = rng.normal(0, 0.05, (2 * n, WIDTH - 2))
    x_test = x.copy()
    x_test[:, 1] = rng.normal(0, 5.0, 2 * n)
    feats = {"full": x.astype(np.float32)}
    taught = fit_few_shot(feats, y, 2)
    ncm = nearest_class_mean(feats["full"], y, 2)
    assert accuracy(taught.layers, x_test, y) > accuracy(ncm, x_test, y) + 0.2


def test_bad_input_is_refused() -> None:
    feats, y = photos(make_world(3), 2)
    with pytest.raises(ValueError, match="no photos"):
        fit_few_shot(feats, y, 4)
    with pytest.raises(ValueError, match="labels for"):
        fit_few_shot(feats, y[:-1], 3)


# --- a base head --------------------------------------------------------------------------


@pytest.mark.parametrize("two_layers", [False, True])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_base_labels_stay_and_new_ones_are_learnt(two_layers: bool, nonnegative: bool) -> None:
    centres = make_world(6, nonnegative=nonnegative, seed=4)
    old, y_old = photos(centres[:4], 15, seed=2, nonnegative=nonnegative)
    if two_layers:
        base = train_head(old["full"], y_old, 4, hidden=16, dropout=0.0, lr=1e-2, epochs=40,
                          seed=0).layers
    else:
        base = logistic_regression(old["full"], y_old, 4)
    # Photos of the two new labels only (labels 4 and 5 of the taught head).
    new, y_new = photos(centres[4:], 3, seed=6, nonnegative=nonnegative)
    result = fit_few_shot(new, y_new + 4, 6, base_head=base)
    assert result.n_base == 4 and len(result.layers) == len(base)
    assert result.settings.pull == max(PULLS) and "strongest pull" in result.cv_scheme
    test, y_test = photos(centres, 30, seed=8, nonnegative=nonnegative)
    x = test["full"]
    logits = forward(result.layers, x)[-1]
    base_logits = forward(base, x)[-1]
    # The old labels' logits are the base's, only divided by the temperature ...
    np.testing.assert_allclose(logits[:, :4] * result.temperature, base_logits,
                               rtol=1e-4, atol=1e-3)
    # ... old items are still sorted as before, and new ones go to their new labels.
    is_old = y_test < 4
    before = accuracy(base, x[is_old], y_test[is_old])
    assert accuracy(result.layers, x[is_old], y_test[is_old]) >= before - 0.05
    assert accuracy(result.layers, x[~is_old], y_test[~is_old]) > 0.9


@pytest.mark.parametrize("loudness", [0.05, 20.0])
def test_new_labels_are_no_louder_than_the_base_they_join(loudness: float) -> None:
    """A base that stays unsure (small logits, as outlier exposure trains it) gets new labels
    at its own scale, not the default 10 that would outshout it; a confident one keeps 10."""
    centres = make_world(5, seed=4)
    old, y_old = photos(centres[:4], 15, seed=2)
    top = logistic_regression(old["full"], y_old, 4)[0]
    base = [Dense(top.weight * loudness, top.bias * loudness)]
    new, y_new = photos(centres[4:], 3, seed=6)
    few_old, y_few = photos(centres[:4], 3, seed=7)
    feats = {v: np.concatenate([few_old[v], new[v]]) for v in new}
    result = fit_few_shot(feats, np.concatenate([y_few, y_new + 4]), 5, base_head=base)
    base_top = float(np.median(forward(base, few_old["full"])[-1].max(axis=1)))
    assert result.settings.scale == pytest.approx(min(10.0, max(1.0, base_top)))
    if loudness < 1:
        assert result.settings.scale < 10.0
    else:
        assert result.settings.scale == 10.0


# --- calibration --------------------------------------------------------------------------


def test_ece_adds_the_gaps_of_every_bin() -> None:
    # Half the photos at confidence 0.6 and all right, half at 0.9 and half right: both
    # bins are 0.4 off, in opposite directions, which must not cancel.
    probs = np.array([[0.6, 0.4]] * 4 + [[0.9, 0.1]] * 4)
    labels = np.array([0, 0, 0, 0, 0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    rows = reliability(probs, labels)
    assert [(r["n"], r["accuracy"]) for r in rows] == [(4, 1.0), (4, 0.5)]


def test_fit_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 2.0, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])
    overconfident = 3.0 * true_logits
    t = fit_temperature(overconfident, labels)
    assert 2.6 < t < 3.4
    assert nll(overconfident / t, labels) < nll(overconfident, labels) - 0.3
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, abs=0.15)


def test_fit_temperature_stays_within_bounds() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(logits, np.array([0, 1])) == 0.05  # always right: sharpen fully
    assert fit_temperature(logits, np.array([1, 0])) == 20.0  # always wrong: flatten fully


def test_ece_is_near_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(1)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.random(n) < confidence
    labels = np.where(correct, 0, 1)
    probs = np.stack([confidence, 1.0 - confidence], 1)
    assert expected_calibration_error(probs, labels) < 0.015
    overconfident = np.stack([np.sqrt(confidence), 1.0 - np.sqrt(confidence)], 1)
    assert expected_calibration_error(overconfident, labels) > 0.05


def test_teach_calibration_tames_an_overconfident_fit() -> None:
    # Overlapping clusters and a large logit scale: the fitted head is overconfident, and
    # the temperature from the cross-validated logits must bring that back on new photos.
    centres = make_world(5, seed=3)
    feats, y = photos(centres, 12, spread=3.0, seed=1)
    result = fit_few_shot(feats, y, 5, grid=[TeachSettings(60.0, 0.001)])
    test, y_test = photos(centres, 400, spread=3.0, seed=2)
    logits = forward(result.layers, test["full"])[-1]
    calibrated, raw = softmax(logits), softmax(logits * result.temperature)
    assert 0.3 < float((logits.argmax(1) == y_test).mean()) < 0.95  # confidence matters
    assert result.temperature > 2.0
    assert expected_calibration_error(calibrated, y_test) < 0.08
    assert expected_calibration_error(raw, y_test) > 2 * expected_calibration_error(
        calibrated, y_test)


def test_one_blas_thread_restores_the_setting() -> None:
    from training.teach_method import _openblas_threads

    functions = _openblas_threads()
    with one_blas_thread():
        inside = functions[1]() if functions else None
    if functions is None:
        pytest.skip("numpy does not use OpenBLAS here")
    assert inside == 1


# --- the bench --------------------------------------------------------------------------


def test_few_shot_curve_compares_the_methods_on_the_same_draws() -> None:
    centres = make_world(4, seed=5)
    feats, y = photos(centres, 25, spread=1.5, seed=3)
    out = few_shot_curve(feats, y, bin_of=[0, 0, 0, 3], shots=(1, 3), draws=2, seed=0,
                         teach_views=("full", "full_flip"), ablations=True)
    assert set(out["curve"]) == {"teach", "ncm", "logreg", "logreg_views"}
    for per in out["curve"].values():
        for shot in (1, 3):
            assert 0.25 < per[shot]["top1"] <= 1.0 and 0.25 < per[shot]["bin_accuracy"] <= 1.0
    assert len(out["teach"]) == 4
    table = markdown(out)
    assert "| nearest class mean (imprinting alone) |" in table and "3 photos/class" in table


def test_markdown_gap_is_the_teach_minus_the_better_baseline() -> None:
    row = {"top1_sd": 0.0, "bin_accuracy": 0.9, "ece": 0.05}
    result = {"shots": [5], "draws": 1, "n_photos": 10, "deploy_view": "full",
              "teach_views": ["full"], "majority_bin_accuracy": 0.5,
              "curve": {"teach": {5: {**row, "top1": 0.62}}, "ncm": {5: {**row, "top1": 0.60}},
                        "logreg": {5: {**row, "top1": 0.55}}}}
    assert "| teach minus the better baseline, top-1 | +2.0 pt |" in markdown(result)


def test_shots_are_whole_numbers_of_at_least_one() -> None:
    assert parse_shots("10,1,5,5") == [1, 5, 10]
    for bad in ("", "0,5", "5,x", "-1"):
        with pytest.raises(SmartbinError, match="--shots"):
            parse_shots(bad)


def test_pi4_estimate_uses_the_assumed_invoke_time_per_image() -> None:
    # 100 images at 20 ms each here, 15 ms of it the invoke: 5 ms of decoding per image.
    est = pi4_estimate(images=100, features_s=2.0, invoke_s=0.015, other_s=1.0)
    slow = est["assumed_cpu_slowdown"]
    assert est["seconds"] == pytest.approx(100 * (PI4_INVOKE_S + 0.005 * slow) + slow)
    assert est["low_s"] < est["seconds"] < est["high_s"]


def _curve_result() -> dict:
    centres = make_world(3, seed=2)
    feats, y = photos(centres, 12, spread=1.2, seed=4)
    out = few_shot_curve(feats, y, bin_of=[0, 0, 3], shots=(1, 3, 5), draws=2,
                         teach_views=("full", "full_flip"))
    out["methods"] = {"teach": "teach", "ncm": "nearest class mean", "logreg": "logreg"}
    return out


def test_few_shot_plot_has_labelled_axes_a_legend_and_the_curve() -> None:
    out = _curve_result()
    fig = plots.few_shot_figure(out, "Few-shot curve on mini")
    assert [t.get_text() for t in fig.texts] == ["Few-shot curve on mini"]
    top, bins = fig.axes
    assert (top.get_xlabel(), top.get_ylabel()) == ("photos per class taught",
                                                    "top-1 accuracy (%)")
    assert bins.get_ylabel() == "bin accuracy (%)"
    assert list(top.get_xticks()) == [1, 3, 5] and top.get_ylim() == (0, 100)
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend == ["teach", "nearest class mean", "logreg"]
    assert "always the commonest bin" in [t.get_text() for t in bins.get_legend().get_texts()]
    # The drawn points are the curve's, in percent.
    teach_line = top.lines[0]
    assert list(teach_line.get_ydata()) == pytest.approx(
        [100 * out["curve"]["teach"][s]["top1"] for s in (1, 3, 5)])


def test_few_shot_plot_reads_the_json_it_was_written_to(tmp_path: Path) -> None:
    # Shots are string keys after a JSON round trip.
    out = json.loads(json.dumps(_curve_result()))
    plots.few_shot_png(out, tmp_path / "curve.png", "Few-shot curve on mini")
    with Image.open(tmp_path / "curve.png") as img:
        assert img.format == "PNG" and img.info["Title"] == "Few-shot curve on mini"


# --- smartbin bench teach, a real process on real photos and the real backbone -------------


def _smartbin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bin_controller", *args], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ), timeout=600)


def test_bench_teach_prints_the_curve_times_a_teach_and_writes_json_and_plot(
        tmp_path: Path, trashnet_dir: Path, mobilenet_file: Path) -> None:
    data = tmp_path / "mini"
    for photo in trashnet_sample(trashnet_dir, 8):
        if photo.parent.name in ("cardboard", "glass", "metal"):
            (data / photo.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, data / photo.parent.name / photo.name)
    run = _smartbin("bench", "teach", "--data", str(data), "--bins", "trashnet",
                    "--backbone", str(mobilenet_file), "--cache", str(tmp_path / "cache"),
                    "--shots", "1,3", "--draws", "2", "--json", str(tmp_path / "curve.json"),
                    "--plot", str(tmp_path / "curve.png"))
    assert run.returncode == 0, run.stderr
    assert "| nearest class mean (imprinting alone) |" in run.stdout
    assert "| logistic regression (C=1, standardised features) |" in run.stdout
    assert "Raspberry Pi 4 estimate (not measured)" in run.stdout
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert doc["shots"] == [1, 3] and doc["draws"] == 2 and doc["n_photos"] == 24
    for method in ("teach", "ncm", "logreg"):
        for shot in ("1", "3"):
            assert 1 / 3 <= doc["curve"][method][shot]["top1"] <= 1.0  # better than chance
    timed = doc["teach_time"]
    # 24 photos: every one once, in groups of 10 (10, 10, 4), each in as many views as a
    # teach of 24 photos takes (the most: few photos).
    assert (timed["photos"], timed["classes"], timed["views"]) == (24, 3, MAX_VIEWS)
    assert timed["images"] == 24 * MAX_VIEWS
    assert doc["teach_views"] == {"1": list(VIEW_ORDER["none"]), "3": list(VIEW_ORDER["none"])}
    assert timed["total_s"] >= timed["features_s"] > 0 and timed["pi4"]["seconds"] > 0
    with Image.open(tmp_path / "curve.png") as img:
        assert img.info["Title"].startswith("Few-shot curve on mini (3 classes")


def test_bench_teach_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    run = _smartbin("bench", "teach", "--data", str(tmp_path), "--shots", "0,5")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "smartbin: error: --shots '0,5': give photos per class as whole numbers of at least "
        "1, comma-separated, e.g. 1,5,10,20"]
    run = _smartbin("bench", "teach", "--data", str(tmp_path / "none"))
    assert run.returncode == 2 and "no such dataset folder" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_teach_takes_more_views_of_fewer_photos_within_its_budget() -> None:
    # The bin's own view and its mirror always come first, in either crop.
    assert teach_views("none", 1)[:2] == ("full", "full_flip")
    assert teach_views("center", 1)[:2] == ("center", "flip")
    assert len(teach_views("none", 30)) == MAX_VIEWS
    # 26 labels x 10 photos (the timed teach) get the two.
    assert teach_views("none", 260) == ("full", "full_flip")
    assert teach_views("none", 10_000) == ("full", "full_flip")
    counts = [len(teach_views("none", n)) for n in range(1, 400)]
    assert counts == sorted(counts, reverse=True)
    assert all(n * len(teach_views("none", n)) <= max(VIEW_BUDGET, 2 * n) for n in range(1, 400))


def test_few_shot_curve_follows_the_teach_s_own_views_when_given_none() -> None:
    centres = make_world(3, seed=2)
    feats, y = photos(centres, 12, spread=1.2, seed=4)
    feats = {v: feats["full"] + 0.01 * i for i, v in enumerate(VIEW_ORDER["none"])}
    out = few_shot_curve(feats, y, bin_of=[0, 0, 3], shots=(1, 5), draws=1)
    assert out["teach_views"] == {1: list(teach_views("none", 3)),
                                  5: list(teach_views("none", 15))}
    assert [t["views"] for t in out["teach"]] == [MAX_VIEWS, MAX_VIEWS]
    assert "teach (imprint + fit, CV-chosen, 8 views)" in markdown(out)
