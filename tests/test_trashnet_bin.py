"""The committed TrashNet bundle in the simulated bin: the loop loses nothing."""

from __future__ import annotations

import pytest

from bin_controller.config import config_from_dict
from bin_controller.vision.bundle import REPO_MODELS
from bin_controller.vision.classifier import Classifier
from hardware_sim.simulate import run_simulation
from hardware_sim.sources import FolderSource


@pytest.mark.slow
def test_compartment_accuracy_equals_classifier_bin_accuracy(mobilenet_file, trashnet_dir,
                                                             backend):
    classifier = Classifier("trashnet", backbone=str(mobilenet_file), backend=backend)
    source = FolderSource(trashnet_dir, REPO_MODELS / "bin_maps" / "trashnet.json", seed=11,
                          frame=(320, 240))
    items = source.items(80)
    expected = [classifier.classify_array(item.image).bin for item in items]
    classifier_bin_accuracy = sum(b == i.true_bin for b, i in zip(expected, items,
                                                                   strict=True)) / len(items)
    result = run_simulation(config_from_dict({}), items, classifier, fast=True)
    report = result.report()
    assert [i.compartment for i in result.items] == expected
    assert report["bin_accuracy"] == round(classifier_bin_accuracy, 4)
    assert report["counted"] == 80
    assert classifier_bin_accuracy >= 0.9
