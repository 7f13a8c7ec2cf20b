"""`smartbin review` on a state folder the simulated bin really filled: real SQLite store,
real photo log, real demo model; the CLI as a user runs it (a process of its own)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bin_controller.config import config_from_dict
from bin_controller.review import MAX_SEQS
from bin_controller.sitelog import SiteLog
from bin_controller.vision.classifier import Classifier, Prediction
from hardware_sim import items as kinds
from hardware_sim.mechanics import SimItem
from hardware_sim.simulate import Faults, Simulation, sim_config
from tests.test_cli import smartbin

CAN, BOTTLE, BATTERY, BANANA, APPLE = (kinds.KINDS[i] for i in (2, 3, 5, 0, 1))
# 12 each of three kinds (the exported classes), 6 bottles the model is unsure of, 3
# apples it fails on and 3 it names: 48 items, interleaved like a real day.
PLAN = [CAN, BATTERY, BANANA] * 12 + [BOTTLE] * 6 + [APPLE] * 6
ORDER = np.random.default_rng(5).permutation(len(PLAN))


class UnsureOfBottles:
    """The demo model, unsure of plastic bottles: they are uncertain (to the fallback bin,
    `other`, while the model's bin is recyclable)."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.bundle = inner.bundle
        self.backend = inner.backend

    def classify_array(self, frame: np.ndarray) -> Prediction:
        p = self.inner.classify_array(frame)
        if p.label.name_en == "plastic bottle":
            return dataclasses.replace(p, confidence=0.3, bin_confidence=0.3)
        return p


def fill(state: Path, plan: list[kinds.ItemKind], *, failed: set[int] = frozenset(),
         seed: int = 0, classifier: object | None = None, **config: dict) -> list[SimItem]:
    """Sort these items on the simulated bin with its store and photo log in `state`."""
    rng = np.random.default_rng(seed)
    items = [SimItem(i + 1, k.name, k.bin, kinds.render(k, rng), label_en=k.name_en)
             for i, k in enumerate(plan)]
    cfg = sim_config(config_from_dict({"bin": {"state_dir": str(state)}, **config}), fast=True)
    with Simulation(cfg, classifier=classifier or UnsureOfBottles(Classifier("demo"))) as sim:
        result = sim.drop(items, faults=Faults(classifier_fail={n: 5 for n in failed}))
        assert sim.bin.photos is not None and sim.bin.photos.flush()
    first = result.events[0].seq
    assert [e.seq for e in result.events] == list(range(first, first + len(items)))
    return items


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A state folder after 48 items, and which seq each kind of item got."""
    state = tmp_path_factory.mktemp("site") / "state"
    plan = [PLAN[i] for i in ORDER]
    apples = [n for n, k in enumerate(plan, 1) if k is APPLE]
    # Seed 1: the demo model names every one of these items right (the filters below
    # select by what the model said, the seqs here are by what each item was).
    sorted_items = fill(state, plan, failed=set(apples[:3]), seed=1)
    seqs: dict[str, list[int]] = {}
    for item in sorted_items:
        event = item.events[0]
        assert event.failed or event.label == item.true_class, (item.id, event.label)
        seqs.setdefault(item.label_en, []).append(event.seq)
    seqs["failed"] = apples[:3]  # item n is seq n: one item at a time, nothing before
    return state, seqs


@pytest.fixture
def site(filled, tmp_path):
    """A copy of the filled state folder for a test to change."""
    state, seqs = filled
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    return copy, seqs


def review(state: Path, *args: str):
    return smartbin("review", *args, "--state-dir", str(state))


def ok(r) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def error_line(r) -> str:
    """A refusal: exit 2, one line, no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("INFO:")]
    return lines[-1]


def listed(state: Path, *args: str) -> dict:
    return json.loads(ok(review(state, "list", "--json", *args)))


def everything(state: Path) -> list[dict]:
    """Every item with its review, newest first (what `nothing changed` compares)."""
    out, before = [], []
    while True:
        page = listed(state, "--limit", "100", *before)
        out += page["items"]
        if page["next_before"] is None:
            return out
        before = ["--before", str(page["next_before"])]


def count_database(state: Path) -> list[str]:
    db = sqlite3.connect(state / "smartbin.db")
    try:
        return list(db.iterdump())
    finally:
        db.close()


def contamination(state: Path) -> dict:
    log = SiteLog(state)
    try:
        return log.contamination()
    finally:
        log.close()


# ------------------------------------------------------------------ list and show


def test_list_filters(filled):
    state, seqs = filled
    page = listed(state, "--limit", "100")
    assert page["total"] == len(PLAN) and page["next_before"] is None
    assert [i["seq"] for i in page["items"]] == list(range(len(PLAN), 0, -1))
    assert all(i["photo"] and i["review"] is None for i in page["items"])

    uncertain = listed(state, "--uncertain", "--limit", "100")["items"]
    assert sorted(i["seq"] for i in uncertain) == seqs["plastic bottle"]
    assert all(i["bin"] == "recyclable" and i["compartment"] == "other" for i in uncertain)
    failed = listed(state, "--failed")["items"]
    assert sorted(i["seq"] for i in failed) == seqs["failed"]
    assert all(i["label"] is None and i["bin"] is None for i in failed)
    both = listed(state, "--uncertain", "--failed", "--limit", "100")
    assert both["total"] == 9

    # A label by its Chinese or its English name; a bin the model chose or the item reached.
    cans = listed(state, "--label", "drink can", "--limit", "100")["items"]
    assert sorted(i["seq"] for i in cans) == seqs["drink can"]
    assert listed(state, "--label", CAN.name, "--limit", "100")["items"] == cans
    hazardous = listed(state, "--bin", "hazardous", "--limit", "100")["items"]
    assert sorted(i["seq"] for i in hazardous) == seqs["battery"]
    recyclable = listed(state, "--bin", "recyclable", "--limit", "100")["total"]
    assert recyclable == 12 + 6  # the unsure bottles: the model said recyclable
    assert listed(state, "--unreviewed")["total"] == len(PLAN)
    assert listed(state, "--label", "nothing like it")["total"] == 0


def test_list_pages(filled):
    state, _ = filled
    seen, before = [], []
    for _ in range(5):
        page = listed(state, "--limit", "10", *before)
        assert page["total"] == len(PLAN)
        seen += [i["seq"] for i in page["items"]]
        if page["next_before"] is None:
            break
        assert page["next_before"] == seen[-1]
        before = ["--before", str(page["next_before"])]
    assert seen == list(range(len(PLAN), 0, -1))  # every item once, newest first
    assert [i["seq"] for i in listed(state, "--before", "3")["items"]] == [2, 1]


def test_list_table(filled):
    state, seqs = filled
    bottle = seqs["plastic bottle"][-1]
    out = ok(review(state, "list", "--uncertain", "--limit", "1")).splitlines()
    assert out[0].split() == ["seq", "time", "label", "conf", "model", "bin", "reached",
                              "flags", "review"]
    row = out[1].split()
    assert row[0] == str(bottle) and row[3:5] == ["plastic", "bottle"]
    assert row[5:9] == ["30%", "recyclable", "other", "uncertain,photo"]
    assert out[2] == f"1 of 6 shown; older ones: --before {bottle}"


def test_list_options_are_checked(filled):
    state, _ = filled
    for bad in ("0", "101", "x"):
        line = error_line(review(state, "list", "--limit", bad))
        assert "argument --limit: expected a whole number from 1 to 100" in line
    assert "argument --before" in error_line(review(state, "list", "--before", "0"))
    line = error_line(review(state, "list", "--bin", "compost"))
    assert line == ("smartbin: error: bin 'compost' does not exist; bins are recyclable, "
                    "kitchen, hazardous, other")


def test_show(filled):
    state, seqs = filled
    seq = seqs["battery"][0]
    shown = json.loads(ok(review(state, "show", str(seq), "--json")))
    assert shown["seq"] == seq and shown["label"] == BATTERY.name
    assert shown["bin"] == shown["compartment"] == "hazardous"
    photo = Path(shown["photo_file"])
    assert photo.is_file() and photo.parent.parent == state / "photos"
    assert photo.name == f"{seq:08d}.jpg" and photo.stat().st_size == shown["photo_bytes"]
    text = ok(review(state, "show", str(seq)))
    assert f"photo:        {photo} (" in text and "review:       not reviewed" in text
    assert "label:        有害垃圾_电池 (battery)" in text
    line = error_line(review(state, "show", "999"))
    assert line.startswith("smartbin: error: no item #999 in the site log")


# ------------------------------------------------------------------ label and accept


def test_label_by_either_name_and_accept(site):
    state, seqs = site
    bottles, cans = seqs["plastic bottle"], seqs["drink can"]
    # The unsure bottles went to `other`; they were bottles (recyclable): wrong there.
    out = ok(review(state, "label", f"{bottles[0]},{bottles[1]}", "plastic bottle"))
    assert out.splitlines()[0] == (f"labelled #{bottles[0]}, #{bottles[1]} as {BOTTLE.name} "
                                   "(recyclable); 2 of 2 landed in the wrong compartment")
    assert "contamination: 2 of 2 reviewed items in the wrong compartment (100.0%)" in out
    ok(review(state, "label", str(bottles[2]), BOTTLE.name))  # the Chinese name
    out = ok(review(state, "accept", ",".join(map(str, cans[:4]))))
    assert out.splitlines()[0].startswith(f"accepted #{cans[0]}, #{cans[1]}")
    assert ("contamination: 3 of 7 reviewed items in the wrong compartment (42.9%); 7 of 48 "
            "items reviewed (14.6%)") in out
    assert "recyclable 0/4 (0.0%), kitchen 0/0, hazardous 0/0, other 3/3 (100.0%)" in out

    by_seq = {i["seq"]: i for i in everything(state)}
    for s in bottles[:3]:
        assert by_seq[s]["review"]["verdict"] == "corrected"
        assert by_seq[s]["review"]["label"] == BOTTLE.name
        assert by_seq[s]["review"]["bin"] == "recyclable"
        assert by_seq[s]["compartment"] == "other"  # what happened stays
    for s in cans[:4]:
        assert by_seq[s]["review"] == {**by_seq[s]["review"], "verdict": "accepted",
                                       "label": CAN.name, "bin": "recyclable"}
    assert listed(state, "--unreviewed")["total"] == len(PLAN) - 7
    assert ok(review(state, "show", str(cans[0]))).splitlines()[-1] == \
        "review:       accepted"


def test_contamination_after_corrections(site):
    state, seqs = site
    batteries, bananas, cans = seqs["battery"], seqs["banana peel"], seqs["drink can"]
    ok(review(state, "accept", f"{cans[0]}-{cans[0]},{bananas[0]}"))
    # A battery (reached hazardous) that was really a banana peel: wrong in hazardous.
    out = ok(review(state, "label", str(batteries[0]), "banana peel"))
    assert "1 of 1 landed in the wrong compartment" in out
    # A failed apple went to the fallback bin (other); it was an apple: wrong in other.
    ok(review(state, "label", str(seqs["failed"][0]), "apple"))
    c = contamination(state)
    assert c["hazardous"] == {"reviewed": 1, "wrong": 1, "rate": 1.0}
    assert c["other"] == {"reviewed": 1, "wrong": 1, "rate": 1.0}
    assert c["recyclable"] == {"reviewed": 1, "wrong": 0, "rate": 0.0}
    assert c["kitchen"] == {"reviewed": 1, "wrong": 0, "rate": 0.0}
    assert c["total"] == {"reviewed": 4, "wrong": 2, "rate": 0.5}
    assert c["items"] == len(PLAN) and c["reviewed_fraction"] == round(4 / len(PLAN), 4)
    # Changing one's mind replaces the verdict: the battery was a battery after all.
    out = ok(review(state, "label", str(batteries[0]), "battery"))
    assert "0 of 1 landed in the wrong compartment" in out
    c = contamination(state)
    assert c["hazardous"] == {"reviewed": 1, "wrong": 0, "rate": 0.0}
    assert c["total"] == {"reviewed": 4, "wrong": 1, "rate": 0.25}
    # The counts (what physically happened) never change.
    counts = count_database(state)
    ok(review(state, "label", ",".join(map(str, cans)), "battery"))
    assert count_database(state) == counts


def test_new_label_needs_a_bin(site):
    state, seqs = site
    seq = seqs["banana peel"][0]
    before = everything(state)
    line = error_line(review(state, "label", str(seq), "glass jar"))
    assert line.startswith("smartbin: error: label 'glass jar' is new: give its bin too")
    line = error_line(review(state, "label", str(seq), "glass jar", "--bin", "compost"))
    assert line == ("smartbin: error: bin 'compost' does not exist; bins are recyclable, "
                    "kitchen, hazardous, other")
    line = error_line(review(state, "label", str(seq), "battery", "--bin", "kitchen"))
    assert "belongs to bin hazardous, not kitchen" in line
    assert everything(state) == before
    out = ok(review(state, "label", str(seq), "glass jar", "--bin", "recyclable"))
    assert "as glass jar (recyclable) (a new label); 1 of 1 landed in the wrong" in out
    # Known from now on: the next item needs no bin.
    ok(review(state, "label", str(seqs["banana peel"][1]), "glass jar"))
    assert listed(state, "--label", "glass jar")["total"] == 2


def test_bad_seqs_change_nothing(site):
    state, seqs = site
    cans = seqs["drink can"]
    before = everything(state)
    line = error_line(review(state, "label", "999", "apple"))
    assert line.startswith("smartbin: error: no item #999 in the site log")
    line = error_line(review(state, "accept", f"{cans[0]},{cans[1]},999,1000"))
    assert line.startswith("smartbin: error: no item #999, #1000 in the site log")
    assert line.endswith("nothing was changed")
    error_line(review(state, "label", f"{cans[0]},999", "drink can"))
    for text, message in [
        ("0", "argument SEQS: expected item numbers such as 12 or 12,15,20-25"),
        ("1,x", "argument SEQS: expected item numbers such as 12 or 12,15,20-25"),
        ("1,,2", "argument SEQS: expected item numbers"),
        ("-3", "argument SEQS: expected item numbers"),
        ("5-2", "argument SEQS: range '5-2' runs backwards; write 2-5"),
        (f"1-{MAX_SEQS + 1}", f"argument SEQS: more than {MAX_SEQS} items in one command"),
        ("1-999999999999", f"argument SEQS: more than {MAX_SEQS} items in one command"),
        (",".join(map(str, range(1, 2 * MAX_SEQS + 3, 2))), "more than 1000 items in one command"),
        ("1," * 60_000, "characters of item numbers; at most 1000 items in one command"),
    ]:
        line = error_line(review(state, "accept", text))
        assert message in line and len(line) < 200, (text[:20], line)
    assert everything(state) == before


def test_review_while_the_bin_runs(site):
    """The service keeps its site log open and sorts on; the CLI writes beside it."""
    state, _ = site
    cfg = sim_config(config_from_dict({"bin": {"state_dir": str(state)}}), fast=True)
    rng = np.random.default_rng(9)
    with Simulation(cfg, classifier=Classifier("demo")) as sim:
        photos = sim.bin.photos
        assert photos is not None and photos.sitelog.set_aside is None
        sim.drop([SimItem(1, CAN.name, CAN.bin, kinds.render(CAN, rng), label_en=CAN.name_en)])
        assert photos.flush()
        version = photos.sitelog.data_version()
        ok(review(state, "label", f"{len(PLAN) + 1}", "battery"))
        item = photos.sitelog.item(len(PLAN) + 1)
        assert item is not None and item.verdict == "corrected" and item.true_bin == "hazardous"
        assert photos.sitelog.data_version() != version
        assert photos.sitelog.contamination()["recyclable"]["wrong"] == 1


def test_contamination_survives_a_restart(site):
    state, seqs = site
    ok(review(state, "label", str(seqs["battery"][0]), "apple"))
    before = contamination(state)
    fill(state, [CAN, CAN], seed=3)  # the bin restarts and sorts two more
    after = contamination(state)
    assert after["hazardous"] == before["hazardous"] == {"reviewed": 1, "wrong": 1,
                                                         "rate": 1.0}
    assert after["items"] == len(PLAN) + 2
    assert listed(state, "--limit", "1")["items"][0]["seq"] == len(PLAN) + 2


# ------------------------------------------------------------------ state folders


def test_missing_state_folder_is_one_line(tmp_path):
    line = error_line(review(tmp_path / "nope", "list"))
    assert line == (f"smartbin: error: {tmp_path / 'nope'}: no such state folder; give the "
                    "bin's folder with --state-dir or bin.state_dir in --config")
    assert not (tmp_path / "nope").exists()


def test_folder_without_site_log_is_left_alone(tmp_path):
    line = error_line(review(tmp_path, "accept", "1"))
    assert line.startswith(f"smartbin: error: {tmp_path}: no site log (sitelog.db) in this "
                           "folder")
    assert list(tmp_path.iterdir()) == []


def test_state_folder_from_the_config(filled, tmp_path):
    state, _ = filled
    config = tmp_path / "bin.toml"
    config.write_text(f'[bin]\nstate_dir = "{state}"\n')
    page = json.loads(ok(smartbin("review", "list", "--json", "--config", str(config))))
    assert page["total"] == len(PLAN)
    line = error_line(smartbin("review", "list", "--config", str(tmp_path / "none.toml")))
    assert "none.toml" in line


def test_cli_never_moves_a_log_aside(site):
    """A site log ahead of its count database is the service's to move (at start), never
    the CLI's: with the count database gone the CLI still reads the log in place."""
    state, _ = site
    (state / "smartbin.db").unlink()
    assert listed(state)["total"] == len(PLAN)
    assert (state / "sitelog.db").is_file() and (state / "photos").is_dir()
    assert sorted(p.name for p in state.iterdir() if "sitelog" in p.name) == ["sitelog.db"]


# ------------------------------------------------------------------ the site dataset


def test_export_layout(site, tmp_path):
    state, seqs = site
    batteries = seqs["battery"][:3]
    ok(review(state, "accept", ",".join(map(str, batteries))))
    ok(review(state, "label", str(seqs["plastic bottle"][0]), "plastic bottle"))
    ok(review(state, "label", str(seqs["banana peel"][0]), "glass jar", "--bin", "recyclable"))
    # Accepted without a label of its bin (a failed item): nothing to learn from.
    ok(review(state, "accept", str(seqs["failed"][0])))
    dest = tmp_path / "export"
    r = review(state, "export", str(dest))
    out = ok(r)
    assert out.splitlines()[0] == f"exported 5 reviewed photos in 3 classes to {dest} " \
                                  "(manifest: manifest.json)"
    assert "       3  有害垃圾_电池" in out
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warning == ["smartbin: warning: fewer than 10 photos (smartbin train needs 10 per "
                       "class): 可回收物_glass jar (1), 可回收物_塑料瓶 (1), 有害垃圾_电池 (3)"]
    folders = sorted(p.name for p in dest.iterdir() if p.is_dir())
    assert folders == ["可回收物_glass jar", "可回收物_塑料瓶", "有害垃圾_电池"]
    assert sorted(p.name for p in (dest / "有害垃圾_电池").iterdir()) == \
        [f"{s:08d}.jpg" for s in sorted(batteries)]
    manifest = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
    entries = {e["seq"]: e for e in manifest["items"]}
    assert sorted(entries) == sorted([*batteries, seqs["plastic bottle"][0],
                                      seqs["banana peel"][0]])
    for seq, e in entries.items():
        data = (dest / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"]
        shown = json.loads(ok(review(state, "show", str(seq), "--json")))
        assert data == Path(shown["photo_file"]).read_bytes()  # the photo as kept
        assert e["time"] == shown["time"]
    assert entries[seqs["banana peel"][0]]["label"] == "glass jar"
    assert manifest["classes"] == {"可回收物_glass jar": 1, "可回收物_塑料瓶": 1,
                                   "有害垃圾_电池": 3}

    line = error_line(review(state, "export", str(dest)))
    assert line == (f"smartbin: error: {dest} already exists and is not an empty folder; give "
                    "a new folder to export into")
    (tmp_path / "a-file").write_text("x")
    assert "already exists" in error_line(review(state, "export", str(tmp_path / "a-file")))


def test_export_is_read_back_by_train(site, tmp_path, mobilenet_file):
    """Reviewed photos in three classes, one of them a label the reviewer introduced,
    exported and trained into a bundle that classifies."""
    state, seqs = site
    ok(review(state, "accept", ",".join(map(str, seqs["drink can"]))))
    ok(review(state, "label", ",".join(map(str, seqs["battery"])), "battery"))
    ok(review(state, "label", ",".join(map(str, seqs["banana peel"])), "果皮",
              "--bin", "kitchen"))
    dest = tmp_path / "dataset"
    r = review(state, "export", str(dest))
    assert "exported 36 reviewed photos in 3 classes" in ok(r)
    assert "warning" not in r.stderr
    bundle = tmp_path / "bundle"
    r = smartbin("train", "--data", str(dest), "--out", str(bundle), "--backbone",
                 str(mobilenet_file), "--epochs", "20", "--no-search")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    labels = {lab["name"]: lab["bin"] for lab in manifest["labels"]}
    assert labels == {"可回收物_易拉罐": "recyclable", "有害垃圾_电池": "hazardous",
                      "厨余垃圾_果皮": "kitchen"}
    photo = json.loads(ok(review(state, "show", str(seqs["battery"][0]), "--json")))
    r = smartbin("classify", "--model", str(bundle), "--backbone", str(mobilenet_file),
                 "--json", photo["photo_file"])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["label"] in labels and result["bin"] == labels[result["label"]]
