"""The teach scenario end to end on the simulated bin: a kind of item the model does not
know (grapes, which the demo bundle has never seen) arrives and goes to the fallback bin
marked uncertain; a reviewer finds them among the uncertain items and labels ten of them
over MQTT; `cmd/teach` runs while the bin keeps sorting, every item counted once;
afterwards grapes reach the kitchen compartment, and a fixed set of the old kinds is
sorted as well as before.

The demo bundle is unsure of kinds it has never seen because it was trained with outlier
exposure (training.outliers: random shapes and recoloured kinds, never grapes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bin_controller.vision.bundle import load_bundle
from hardware_sim import items
from hardware_sim.mechanics import SimItem
from hardware_sim.unknown_kinds import GRAPES
from tests.test_mqtt_photos import BASE, wait_counts
from tests.test_teach_background import OLD, TeachBin

DEMO_VERSION = load_bundle("demo").version  # the shipped demo bundle's version

GRAPE = len(OLD)  # its index in TeachBin.kinds
GRAPES_NAME = GRAPES.name
PER_KIND = 5  # the fixed set of old items: five of each of the demo's eight kinds


@pytest.fixture
def scenario_bin(broker, demo, tmp_path):
    b = TeachBin(broker.port, demo, tmp_path / "state")
    yield b
    b.close()


def fixed_old_items() -> list[tuple[items.ItemKind, np.ndarray]]:
    rng = np.random.default_rng(2026)
    return [(k, items.render(k, rng)) for k in OLD for _ in range(PER_KIND)]


def sort_fixed(b: TeachBin, fixed) -> tuple[float, list[str | None]]:
    """Drop the same photos of old kinds again: the share that reached its compartment."""
    batch = [SimItem(b.dropped + n + 1, k.name, k.bin, image.copy(), label_en=k.name_en)
             for n, (k, image) in enumerate(fixed)]
    result = b.simulation.drop(batch)
    assert not result.timed_out
    b.dropped += len(batch)
    assert b.photos.flush()
    places = [i.compartment for i in batch]
    return sum(i.compartment == i.true_bin for i in batch) / len(batch), places


def test_unknown_kind_reviewed_taught_in_the_background_then_sorted(scenario_bin):
    b = scenario_bin
    fixed = fixed_old_items()
    old_before, places_before = sort_fixed(b, fixed)

    # Grapes arrive: the model does not know them, says so, and the bin puts them in its
    # fallback compartment; none is lost, each is counted.
    fallback = b.simulation.bin.config.model.fallback_bin
    grapes = b.sort([GRAPE] * 12)
    assert all(i.events and i.compartment for i in grapes)
    unsure = [i for i in grapes if i.events[0].uncertain and i.compartment == fallback]
    assert len(unsure) >= 11, [(i.compartment, i.events[0].bin_confidence) for i in grapes]
    assert all(i.events[0].bin_confidence < b.simulation.bin.config.model.confidence_threshold
               for i in unsure)
    # The reviewer pages through the uncertain items (the site log marks them so), sees
    # grapes in their photos and labels ten (a label the model does not know, so with its
    # bin).
    listed = b.cmd("review_list", {"uncertain": True, "limit": 20})
    assert listed["ok"], listed
    assert all(item["uncertain"] and item["compartment"] == fallback
               for item in listed["items"]), listed["items"]
    grape_seqs = {i.events[0].seq for i in unsure}
    seen = [item["seq"] for item in listed["items"] if item["seq"] in grape_seqs]
    assert len(seen) == len(unsure) and all(item["photo"] for item in listed["items"])
    labelled = b.cmd("label", {"seqs": seen[:10], "label": GRAPES_NAME, "bin": "kitchen"})
    assert labelled["ok"] and labelled["new_label"] is True, labelled
    # ... and confirms a few items of the old kinds the bin got right (the photos that
    # keep the new label from taking old items, and that the teach is checked on).
    right = [i.events[0].seq for i in b.sort([k for k in range(len(OLD)) for _ in range(5)])
             if i.compartment == i.true_bin]
    assert b.cmd("accept", {"seqs": right})["ok"]

    # The teach, in the background; the bin keeps sorting a mix of old kinds and grapes.
    assert b.cmd("teach", {})["started"] is True
    during = 0
    while during < 300:
        b.sort([during % (len(OLD) + 1)])
        during += 1
        if b.retained_state()["teach"]["phase"] in ("done", "rejected", "failed"):
            break
    final = b.wait_teach({"done", "rejected", "failed"})
    assert final["phase"] == "done", final
    assert during >= 2
    state = b.retained_state()
    assert state["model_version"] == final["result"]["version"] != DEMO_VERSION

    # Later grapes go to the kitchen compartment, confidently.
    later = b.sort([GRAPE] * 10)
    assert sum(i.compartment == "kitchen" for i in later) >= 8, [i.compartment for i in later]
    assert sum(i.events[0].uncertain for i in later) <= 2
    assert sum(i.events[0].label == GRAPES_NAME for i in later) >= 8
    # The old kinds as well as before, on the very same photos.
    old_after, places_after = sort_fixed(b, fixed)
    assert old_after >= old_before, (old_before, old_after,
                                                      places_before, places_after)

    # Nothing lost or double counted: one event per item dropped, seqs without gaps, and
    # the retained counts say so too.
    events = b.simulation.events
    assert len(events) == b.dropped
    assert [e.seq for e in events] == list(range(1, b.dropped + 1))
    counts = wait_counts(b.port, "scenario-counts", total=b.dropped)
    assert sum(counts[k] for k in ("recyclable", "kitchen", "hazardous", "other")) == b.dropped
    print(json.dumps({"old_accuracy_before": old_before, "old_accuracy_after": old_after,
                      "grapes_uncertain_before": len(unsure),
                      "grapes_to_kitchen_before": sum(i.compartment == "kitchen"
                                                      for i in grapes),
                      "grapes_to_kitchen_after": sum(i.compartment == "kitchen"
                                                     for i in later),
                      "sorted_during_teach": during, "items": b.dropped,
                      "base": BASE}))

