"""Views that move an object off its white board, the shifted proxy set, and how train
chooses among heads with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.test_cli import smartbin
from tests.test_training import make_dataset
from training import shift, train
from training.features import SHIFT_VIEWS, view_pixels

BOARD = np.array([236, 232, 226], np.float32)  # TrashNet's board is rarely pure white
OBJECT = (40, 70, 160)


def studio_photo(w: int = 512, h: int = 384) -> tuple[Image.Image, np.ndarray]:
    """A blue object on an unevenly lit off-white board with a grey shadow, and the
    object's true mask."""
    x = np.linspace(-0.5, 0.5, w)[None, :, None]
    y = np.linspace(-0.5, 0.5, h)[:, None, None]
    board = BOARD - 30 * (x + 0.5) * (y + 0.5)  # darker towards one corner
    img = Image.fromarray(np.clip(np.broadcast_to(board, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((200, 150, 360, 300), fill=(170, 168, 165))  # the shadow, below right
    truth = Image.new("L", (w, h))
    for d in (draw, ImageDraw.Draw(truth)):
        colour = OBJECT if d is draw else 255
        d.rectangle((170, 110, 320, 270), fill=colour)
        d.ellipse((290, 150, 350, 210), fill=colour)
    return img, np.asarray(truth) > 0


def near(img: Image.Image | np.ndarray, colour, tol: float = 25) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return np.abs(a - np.asarray(colour, np.float32)).max(2) < tol


def test_mask_keeps_the_object_and_drops_board_and_shadow():
    img, truth = studio_photo()
    alpha, ok = shift.object_alpha(img)
    assert ok and alpha.shape == truth.shape
    inside, outside = alpha[truth] > 0.5, alpha[~truth] < 0.5
    assert inside.mean() > 0.97, "the object must survive the cut"
    assert outside.mean() > 0.97, "board and shadow must go"


def test_background_is_replaced_and_the_object_kept():
    img, truth = studio_photo()
    board_before = near(img, BOARD).mean()
    for family in shift.SHIFT_FAMILIES + shift.TRAIN_FAMILIES:
        rng = np.random.default_rng(3)
        out = shift.replace_background(img, rng, (family,), scale=(0.6, 0.6))
        assert out.size == img.size
        kept = near(out, OBJECT, 12).sum() / truth.sum()
        assert 0.6**2 * 0.9 < kept < 0.6**2 * 1.1, family  # the object, at 60 % scale
        assert near(out, BOARD, 12).mean() < 0.1 * board_before, family
    moved = shift.shifted(img, "key", 1)
    assert near(moved, BOARD, 12).mean() < 0.1 * board_before
    assert near(moved, OBJECT, 60).sum() > 0.2 * truth.sum()


def test_a_photo_without_a_board_keeps_its_frame():
    rng = np.random.default_rng(0)
    brown = (np.array([150, 105, 60]) + rng.normal(0, 8, (240, 320, 3))).clip(0, 255)
    img = Image.fromarray(brown.astype(np.uint8))
    alpha, ok = shift.object_alpha(img)
    assert not ok and alpha.min() == 1.0
    out = shift.replace_background(img, np.random.default_rng(1), shift.SHIFT_FAMILIES,
                                   scale=(0.5, 0.5))
    # Zoomed into the photo, never pasted as a rectangle onto a texture.
    assert near(out, (150, 105, 60), 40).mean() > 0.95


@pytest.mark.parametrize("view", [*SHIFT_VIEWS, "shift1", "shift1_flip"])
def test_seeded_views_are_deterministic_per_photo(view):
    img, _ = studio_photo()
    a = view_pixels(img, view, 224, key="photo-a")
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, view_pixels(img, view, 224, key="photo-a"))
    view_pixels(img, "bg_a", 224, key="photo-c")  # another photo in between
    assert np.array_equal(a, view_pixels(img, view, 224, key="photo-a"))
    assert not np.array_equal(a, view_pixels(img, view, 224, key="photo-b"))
    assert not np.array_equal(a, view_pixels(img, "full", 224))


def test_shift_seeds_differ_and_flip_mirrors():
    img, _ = studio_photo()
    one = view_pixels(img, "shift1", 224, key="k")
    assert not np.array_equal(one, view_pixels(img, "shift2", 224, key="k"))
    assert np.array_equal(one[:, ::-1], view_pixels(img, "shift1_flip", 224, key="k"))


def _row(select, *, hidden=0, ensemble=1, tta=False):
    return (None, {"select": select, "hidden": hidden, "ensemble": ensemble,
                   "test_time_flip": tta}, None)


def test_choose_keeps_a_bigger_head_only_when_it_pays():
    linear, big = _row(0.900), _row(0.903, hidden=512, ensemble=3)
    assert train.choose([big, linear]) is linear  # within the margin: the simpler one
    bigger = _row(0.920, hidden=512, ensemble=3)
    assert train.choose([linear, bigger]) is bigger
    flip = _row(0.904, tta=True)
    assert train.choose([flip, linear]) is linear


def test_cross_validation_prefers_strong_l2_on_noise():
    rng = np.random.default_rng(0)
    n, d = 120, 40
    y = rng.integers(0, 3, n)
    signal = np.eye(3)[y] @ rng.normal(0, 1, (3, d))
    feats = {v: (signal + rng.normal(0, 3, (n, d))).astype(np.float32) for v in ("a", "b")}
    best, scores = train.cross_validate_l2(feats, ("a", "b"), y, 3, hidden=0, dropout=0.0,
                                           lr=1e-2, epochs=30, batch_size=32, seed=0,
                                           grid=(0.0, 1.0), folds=3)
    assert set(scores) == {"0", "1"} and all(0 <= s <= 1 for s in scores.values())
    assert best == max((0.0, 1.0), key=lambda wd: (scores[f"{wd:g}"], wd))


def test_evaluate_on_the_shifted_test_split(tmp_path, mobilenet_file, monkeypatch):
    root = make_dataset(tmp_path / "GarbageMini", per_class=10)
    out = tmp_path / "mini"
    monkeypatch.setenv("SMARTBIN_BACKBONE", str(mobilenet_file))
    train.train_features(root, out, hyper=train.Hyper(epochs=20, lr=1e-3), search=False,
                         log=lambda *_: None)
    reports = {}
    for name, extra in (("plain", []), ("shift", ["--shift", "7"])):
        r = smartbin("evaluate", "--model", str(out), "--data", str(root), "--out",
                     str(tmp_path / name), "--backbone", str(mobilenet_file), *extra)
        assert r.returncode == 0, r.stderr
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    plain, moved = reports["plain"], reports["shift"]
    assert "shifted (seed 7)" in r.stdout
    assert moved["shift"] == 7 and plain["shift"] is None
    assert moved["split"] == "test" and moved["n"] == plain["n"] > 0
    assert "shifted off its backdrop (seed 7" in (tmp_path / "shift" / "report.md").read_text()
    # Other pixels went in: the probabilities, and so the calibration, differ.
    assert moved["ece"] != plain["ece"] or moved["confusion"] != plain["confusion"]
    r = smartbin("evaluate", "--model", str(out), "--data", str(root), "--shift", "-1")
    assert r.returncode == 2 and "--shift" in r.stderr and "Traceback" not in r.stderr
