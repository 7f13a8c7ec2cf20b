"""The training path end to end on a small generated dataset with the study's folder names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bin_controller.config import config_from_dict
from bin_controller.vision.bundle import load_bundle
from bin_controller.vision.classifier import Classifier
from hardware_sim import items
from hardware_sim.simulate import run_simulation
from hardware_sim.sources import FolderSource
from tests.test_cli import smartbin
from training import train
from training.dataset import load_dataset, load_split
from training.head import Dense, ensemble, forward


def make_dataset(root, per_class=16, small_class=None, seed=0):
    """Folders named like GarbageSortingPictureDataSet's, photos of generated items."""
    rng = np.random.default_rng(seed)
    for kind in items.KINDS:
        folder = root / kind.name
        folder.mkdir(parents=True)
        n = 4 if kind is small_class else per_class
        for i in range(n):
            img = Image.fromarray(items.render(kind, rng, 160)).resize((200, 150))
            img.save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mobilenet_file):
    root = make_dataset(tmp_path_factory.mktemp("garbage") / "GarbageMini",
                        small_class=items.KINDS[5])
    (root / items.KINDS[0].name / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / items.KINDS[0].name / "notes.txt").write_text("hello")
    out = tmp_path_factory.mktemp("bundles") / "mini"
    lines = []
    mp = pytest.MonkeyPatch()
    mp.setenv("SMARTBIN_BACKBONE", str(mobilenet_file))
    mp.setenv("SMARTBIN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        result = train.train_features(root, out, hyper=train.Hyper(epochs=40, lr=1e-3),
                                      search=False, log=lines.append)
        yield root, out, result, lines, mp
    finally:
        mp.undo()


def test_split_is_stratified_seeded_and_recorded(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=20)
    a, b = load_dataset(root, seed=3), load_dataset(root, seed=3)
    assert [s.rel for s in a.splits["test"]] == [s.rel for s in b.splits["test"]]
    c = load_dataset(root, seed=4)
    assert [s.rel for s in a.splits["test"]] != [s.rel for s in c.splits["test"]]
    for part, n in (("train", 16), ("val", 2), ("test", 2)):
        counts = np.bincount([s.label for s in a.splits[part]], minlength=8)
        assert counts.tolist() == [n] * 8
    assert not set(s.rel for s in a.splits["train"]) & set(s.rel for s in a.splits["test"])
    record = tmp_path / "split.json"
    record.write_text(json.dumps(a.record()))
    again = load_split(record, root)
    assert [s.sha256 for s in again["val"]] == [s.sha256 for s in a.splits["val"]]


def test_presplit_folders_are_kept(tmp_path):
    for part in ("train", "val", "test"):
        make_dataset(tmp_path / "d" / part, per_class=3 if part != "train" else 12,
                     seed=hash(part) % 100)
    ds = load_dataset(tmp_path / "d")
    assert ds.presplit and len(ds.splits["val"]) == 24 and len(ds.splits["train"]) == 96


def test_training_path_end_to_end(trained):
    _root, out, _result, lines, _ = trained
    log = "\n".join(lines)
    assert "skipped 厨余垃圾_香蕉皮/broken.jpg: corrupt image" in log
    assert "skipped 厨余垃圾_香蕉皮/notes.txt: not an image file" in log
    assert "warning: class '有害垃圾_电池' has only" in log
    assert "images/s" in log
    bundle = load_bundle(out)
    assert [lab.bin for lab in bundle.labels] == [k.bin for k in sorted(items.KINDS,
                                                                          key=lambda k: k.name)]
    assert bundle.stages[0].source.sha256.startswith("7aad0c74")
    assert (out / "split.json").is_file() and (out / "head.tflite").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert {"n", "top1", "top5", "bin_accuracy"} <= set(report)
    assert report["n"] == len(json.loads((out / "split.json").read_text())["test"])
    assert report["top1"] >= 0.7 and report["int8_float_agreement"] >= 0.85
    titles = {}
    for png in ("confusion.png", "bin_confusion.png", "training.png", "reliability.png",
                "coverage.png"):
        with Image.open(out / "report" / png) as img:
            assert img.format == "PNG" and img.size[0] > 400
            titles[png] = img.text["Title"]
    where = f"mini {bundle.version}, test split (n={report['n']})"
    assert titles["coverage.png"] == f"{where}: accuracy against coverage"
    assert titles["reliability.png"] == f"{where}: reliability"
    assert titles["training.png"].startswith(f"mini {bundle.version}: training, train and "
                                             "validation splits (study:")
    md = (out / "report" / "report.md").read_text()
    assert "| top-1 |" in md and "![accuracy against coverage, target 95%](coverage.png)" in md
    assert "`model.confidence_threshold = " in md


def test_training_calibrates_and_records_it(trained):
    _root, out, _result, lines, _ = trained
    cal = load_bundle(out).provenance["calibration"]
    report = json.loads((out / "report" / "report.json").read_text())
    # The mini set's validation split has 16 photos; whatever its mistakes, T is bounded.
    assert 0.5 <= cal["temperature"] <= 20
    # T minimises the NLL; on 16 photos the 15-bin ECE is too noisy to assert on.
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9
    assert 0 <= cal["val_ece_after"] <= 1 and cal["val_ece_before"] >= 0
    assert cal["test_ece"] == report["ece"] and cal["test_bin_ece"] == report["bin_ece"]
    # The int8 bundle's test ECE is that of the calibrated float head, give or take
    # photos that int8 rounding moves across a bin edge.
    assert abs(cal["test_ece"] - cal["test_ece_float_after"]) < 0.05
    assert 0 <= cal["test_ece_float_before"] <= 1
    assert cal["int8_val_top1_agreement"] >= 0.9 and cal["int8_val_max_prob_diff"] < 0.1
    assert any(line.startswith(f"calibration: temperature {cal['temperature']:.3f}")
               for line in lines)
    # The bundle's probabilities are those of the folded float head: it is what the
    # int8/float agreement of the report compares with.
    assert report["int8_float_agreement"] >= 0.85
    c = report["calibration"]
    assert len(c["coverage"]) == 101 and c["target_accuracy"] == 0.95
    assert c["coverage"][0] == {"threshold": 0.0, "fallback_fraction": 0.0,
                                "accuracy": report["bin_accuracy"], "n_kept": report["n"]}
    if c["threshold_for_target"] is not None:
        assert c["threshold_for_target"]["accuracy"] >= 0.95
    assert c["advice"] in "\n".join(lines)


def test_trained_bundle_sorts_in_the_simulator(trained, mobilenet_file):
    root, out, _, _, _ = trained
    classifier = Classifier(out, backbone=str(mobilenet_file))
    source = FolderSource(root, None, seed=0, frame=(320, 240))
    sim_items = source.items(12)
    result = run_simulation(config_from_dict({}), sim_items, classifier, fast=True)
    assert len(result.events) == 12
    for item in result.items:
        assert item.compartment == item.events[0].bin


def test_evaluate_command(trained, tmp_path, mobilenet_file):
    root, out, _, _, _ = trained
    r = smartbin("evaluate", "--model", str(out), "--data", str(root), "--out",
                 str(tmp_path / "rep"), "--backbone", str(mobilenet_file),
                 "--target-accuracy", "0.99")
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "ECE" in r.stdout
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["split"] == "test" and data["n"] > 0
    c = data["calibration"]
    assert c["target_accuracy"] == 0.99 and c["advice"] in r.stdout
    assert "99% bin accuracy" in c["advice"]
    for png in ("reliability.png", "coverage.png", "confusion.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"
    r = smartbin("evaluate", "--model", str(out), "--data", str(root),
                 "--target-accuracy", "1.5")
    assert r.returncode == 2 and "--target-accuracy: expected a number" in r.stderr


def test_bad_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "only").mkdir()
    r = smartbin("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "needs at least two class subfolders" in r.stderr
    r = smartbin("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such dataset folder" in r.stderr
    (tmp_path / "cats").mkdir()
    r = smartbin("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "class 'cats' has no bin" in r.stderr
    assert "Traceback" not in r.stderr


def test_ensemble_equals_mean_of_logits():
    rng = np.random.default_rng(0)
    heads = [[Dense(rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=8), True),
              Dense(rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=3))]
             for _ in range(3)]
    x = rng.normal(size=(10, 5)).astype(np.float32)
    want = np.mean([forward(h, x)[-1] for h in heads], 0)
    np.testing.assert_allclose(forward(ensemble(heads), x)[-1], want, rtol=1e-5, atol=1e-5)
