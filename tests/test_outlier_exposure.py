"""Outlier exposure: the soft-target term of `train_head`, the outlier target of the demo,
and the shipped demo bundle unsure of kinds it was never taught (through the int8 model)."""

from __future__ import annotations

import numpy as np
import pytest

from bin_controller.config import ModelSection
from hardware_sim import items
from hardware_sim.unknown_kinds import UNKNOWN_KINDS
from training import outliers
from training.head import forward, softmax, train_head


def _problem(seed: int = 0):
    """Three tight classes on a circle of radius 4, and outliers on a ring around them:
    far from every class, where a plain head extrapolates one class with confidence."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])
    y = rng.integers(0, 3, 600)
    x = centres[y] + rng.normal(0, 0.6, (600, 2))
    angle = rng.uniform(0, 2 * np.pi, 600)
    radius = rng.uniform(8.0, 11.0, (600, 1))
    x_out = np.column_stack([np.cos(angle), np.sin(angle)]) * radius
    return x.astype(np.float32), y, x_out.astype(np.float32)


def _fit(x, y, x_out, **kw):
    return train_head(x, y, 3, hidden=32, dropout=0.0, lr=1e-2, epochs=60, batch_size=32,
                      seed=1, **kw).layers


def test_outlier_term_pulls_outliers_to_the_target_and_keeps_the_classes():
    x, y, x_out = _problem()
    target = np.array([0.5, 0.25, 0.25], np.float32)
    held_x, held_y, held_out = _problem(seed=7)

    exposed = _fit(x, y, x_out, x_outlier=x_out, outlier_target=target, outlier_weight=1.0)
    p_out = softmax(forward(exposed, held_out)[-1])
    p_known = softmax(forward(exposed, held_x)[-1])
    assert np.abs(p_out.mean(0) - target).max() < 0.05, p_out.mean(0)
    assert np.median(p_out.max(1)) < 0.6
    assert (p_known.argmax(1) == held_y).mean() > 0.98
    assert np.median(p_known.max(1)) > 0.9

    # Without the term the same head calls the outliers one class or another, confidently.
    plain = _fit(x, y, x_out)
    assert np.median(softmax(forward(plain, held_out)[-1]).max(1)) > 0.9
    assert (softmax(forward(plain, held_x)[-1]).argmax(1) == held_y).mean() > 0.98


def test_outlier_arguments_are_checked():
    x, y, x_out = _problem()
    with pytest.raises(ValueError, match="outlier_target must be a probability vector of 3"):
        _fit(x, y, x_out, x_outlier=x_out)
    with pytest.raises(ValueError, match="outlier_target"):
        _fit(x, y, x_out, x_outlier=x_out, outlier_target=np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"x_outlier must be \[n, 2\] features"):
        _fit(x, y, x_out, x_outlier=x_out[:, :1], outlier_target=np.full(3, 1 / 3))


def test_outlier_target_keeps_every_bin_at_a_quarter():
    bins = [k.bin for k in items.KINDS]
    target = outliers.bin_spread_target(bins)
    assert target.sum() == pytest.approx(1.0)
    for b in set(bins):
        share = sum(t for t, kb in zip(target, bins, strict=True) if kb == b)
        assert share == pytest.approx(0.25)


def test_outliers_are_drawn_like_items_and_differ():
    rng = np.random.default_rng(3)
    photos = outliers.sample(rng, 8)
    assert all(p.shape == (items.FRAME, items.FRAME, 3) and p.dtype == np.uint8 for p in photos)
    assert len({p.tobytes() for p in photos}) == 8
    again = outliers.sample(np.random.default_rng(3), 8)
    assert all(np.array_equal(a, b) for a, b in zip(photos, again, strict=True))


def test_demo_bundle_sends_unknown_kinds_to_the_fallback_and_known_ones_home(demo):
    threshold = ModelSection().confidence_threshold
    rng = np.random.default_rng(99)
    # The manifest says 100 % of grapes and 83 % of glass jars (200 photos each); the
    # untrained-for-outliers 1.0.0 bundle sent 0.5 % and 2.5 % to the fallback bin.
    least = {"grapes": 0.9, "glass jar": 0.7}
    for kind in UNKNOWN_KINDS:
        unsure = [demo.classify_array(items.render(kind, rng)).bin_confidence < threshold
                  for _ in range(100)]
        assert np.mean(unsure) >= least[kind.name_en], (kind.name_en, np.mean(unsure))
    photos, kinds = items.sample(rng, 160)
    predictions = [demo.classify_array(p) for p in photos]
    home = [p.bin == items.KINDS[k].bin and p.bin_confidence >= threshold
            for p, k in zip(predictions, kinds, strict=True)]
    assert np.mean(home) >= 0.97
