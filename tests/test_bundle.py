"""The bundle loader rejects every kind of broken bundle with a message naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bin_controller.assembly import make_classifier
from bin_controller.bins import BINS, bin_from_prefix
from bin_controller.config import config_from_dict
from bin_controller.errors import BundleError, SmartbinError
from bin_controller.vision.bundle import SHIPPED_MODELS, find_bin_map, find_bundle, load_bundle
from bin_controller.vision.classifier import Classifier
from tests.conftest import REPO, require_shared


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(SHIPPED_MODELS / "demo", dst)
    return dst


def _edit(folder: Path, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_demo_bundle_loads():
    b = load_bundle("demo")
    assert b.name == "demo" and len(b.labels) == 8
    assert {label.bin for label in b.labels} == set(BINS)
    total = sum(p.stat().st_size for p in (SHIPPED_MODELS / "demo").iterdir())
    assert total < 500_000


def test_missing_stage_file(demo_copy):
    (demo_copy / "head.tflite").unlink()
    with pytest.raises(BundleError, match=r"head\.tflite: stage file is missing"):
        Classifier(demo_copy)


def test_checksum_mismatch(demo_copy):
    data = bytearray((demo_copy / "head.tflite").read_bytes())
    data[-1] ^= 0xFF
    (demo_copy / "head.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        Classifier(demo_copy)


def test_label_count_must_match_output_width(demo_copy):
    _edit(demo_copy, lambda m: m["labels"].pop())
    with pytest.raises(BundleError, match="7 labels but the model has 8 outputs"):
        Classifier(demo_copy)


def test_unknown_bin(demo_copy):
    _edit(demo_copy, lambda m: m["labels"][0].update(bin="compost"))
    with pytest.raises(BundleError, match=r"labels\[0\]\.bin.*'compost'.*recyclable"):
        load_bundle(demo_copy)


def test_malformed_json(demo_copy):
    (demo_copy / "manifest.json").write_text('{"format": 1,')
    with pytest.raises(BundleError, match="malformed JSON at line 1"):
        load_bundle(demo_copy)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("labels"), "missing required field 'labels'"),
    (lambda m: m.update(format=7), "'format' is 7"),
    (lambda m: m["input"].update(size=[64]), r"input\.size"),
    (lambda m: m["input"].update(crop="zoom"), r"input\.crop"),
    (lambda m: m["stages"][0].update(sha256="abc"), r"stages\[0\]\.sha256"),
    (lambda m: m["stages"][0].update(file="../../etc/passwd"), r"stages\[0\]\.file"),
    (lambda m: m["labels"].append(dict(m["labels"][0])), "duplicate"),
    (lambda m: m.update(labels="x"), "'labels' must be list"),
])
def test_malformed_manifest_fields(demo_copy, change, message):
    _edit(demo_copy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(demo_copy)


def test_wrong_input_size(demo_copy):
    _edit(demo_copy, lambda m: m["input"].update(size=[32, 32]))
    with pytest.raises(BundleError, match=r"input\.size is 32x32"):
        Classifier(demo_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no model bundle here"):
        load_bundle(tmp_path)


def test_garbage120_labels_follow_the_study():
    classes = require_shared("datasets/garbage120/classes.txt")
    names = classes.read_text(encoding="utf-8").split()
    b = load_bundle("garbage120")
    assert b.label_names == names
    for label in b.labels:
        assert label.bin == bin_from_prefix(label.name)
        assert label.name_en and label.name_en.isascii()
    assert len({label.name_en for label in b.labels}) == 120


def test_untrained_bundle_says_how_to_train():
    with pytest.raises(BundleError, match=r"no trained weights yet.*smartbin train"):
        Classifier("garbage120")


# ------------------------------------------------------------------- finding bundles


@pytest.fixture
def models(tmp_path) -> Path:
    """A models folder (model.dir) holding a taught copy of demo under a new name."""
    folder = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS / "demo", folder / "kitchen-v2")
    return folder


def test_shipped_bundles_are_the_checkouts_model_folder():
    # In a checkout (editable install, or only PYTHONPATH) both ways lead to model/.
    assert SHIPPED_MODELS.resolve() == (REPO / "model").resolve()


def test_a_path_is_used_as_it_is(demo_copy, models):
    assert find_bundle(demo_copy, models_dir=models) == demo_copy
    assert find_bundle(demo_copy / "manifest.json", models_dir=models) == demo_copy


def test_a_name_is_looked_up_in_the_models_folder_then_among_the_shipped(models):
    assert find_bundle("kitchen-v2", models_dir=models) == models / "kitchen-v2"
    assert find_bundle("trashnet", models_dir=models) == SHIPPED_MODELS / "trashnet"
    # A bundle taught on the bin under a shipped name takes the shipped one's place.
    shutil.copytree(SHIPPED_MODELS / "demo", models / "demo")
    _edit(models / "demo", lambda m: m.update(version="taught"))
    assert load_bundle("demo", models_dir=models).version == "taught"
    assert load_bundle("demo").path == SHIPPED_MODELS / "demo"
    assert Classifier("kitchen-v2", models_dir=models).bundle.path == models / "kitchen-v2"


def test_an_unknown_name_lists_both_places_and_the_fix(models):
    with pytest.raises(BundleError) as info:
        find_bundle("nope", models_dir=models)
    message = str(info.value)
    assert message.startswith("nope: no model bundle by that name")
    assert f"{models} (kitchen-v2)" in message
    assert f"{SHIPPED_MODELS} (demo, garbage120, trashnet)" in message
    assert f"put the bundle folder in {models}" in message
    with pytest.raises(BundleError, match=r"the models folder .*missing \(no such folder\)"):
        find_bundle("nope", models_dir=models.parent / "missing")


def test_a_missing_path_is_not_looked_up_by_name(models, tmp_path, monkeypatch):
    # model/demo from another folder is a path that is not there, not the name demo.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match=r"model/demo: no model bundle here .*demo"):
        find_bundle("model/demo", models_dir=models)


def test_make_classifier_uses_model_dir(models):
    cfg = config_from_dict({"model": {"bundle": "kitchen-v2", "dir": str(models)}})
    assert make_classifier(cfg.model).bundle.path == models / "kitchen-v2"


def test_bin_maps_by_name_or_path(tmp_path):
    assert find_bin_map("trashnet") == SHIPPED_MODELS / "bin_maps" / "trashnet.json"
    assert find_bin_map("trashnet.json") == SHIPPED_MODELS / "bin_maps" / "trashnet.json"
    mine = tmp_path / "mine.json"
    assert find_bin_map(mine) == mine  # a path, even a missing one, is the caller's to read
    with pytest.raises(SmartbinError, match=r"nope: no such bin map .*trashnet"):
        find_bin_map("nope")
