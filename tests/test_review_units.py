"""The site log and review rules on their own: a real SQLite file, items made by hand."""

from __future__ import annotations

import sqlite3
import time

import pytest

from bin_controller.domain import SortEvent
from bin_controller.errors import CommandError
from bin_controller.review import MAX_SEQS, Reviews, check_seqs, class_folder
from bin_controller.sitelog import SITELOG_NAME, SiteLog
from bin_controller.vision.bundle import Label

LABELS = [Label("可回收物_易拉罐", "drink can", "recyclable"),
          Label("厨余垃圾_香蕉皮", "banana peel", "kitchen"),
          Label("glass", "glass", "recyclable")]


def item(seq: int, label: str | None, bin_name: str, *, predicted: str | None = None,
         uncertain: bool = False, failed: bool = False, age_s: float = 0.0) -> SortEvent:
    return SortEvent(time=time.time() - age_s, bin=bin_name, label=label, label_en=None,
                     confidence=0.9 if label else None, uncertain=uncertain, failed=failed,
                     forced=False, cycle_ms=1.0, decision_ms=1.0, model="demo",
                     model_version="1", seq=seq, predicted_bin=predicted or bin_name)


@pytest.fixture
def log(tmp_path):
    sitelog = SiteLog(tmp_path)
    sitelog.add_item(item(1, "可回收物_易拉罐", "recyclable"))
    sitelog.add_item(item(2, "厨余垃圾_香蕉皮", "other", predicted="kitchen", uncertain=True))
    sitelog.add_item(item(3, None, "other", failed=True))
    sitelog.add_item(item(4, "glass", "recyclable"))
    yield sitelog
    sitelog.close()


@pytest.fixture
def reviews(log, tmp_path):
    return Reviews(log, tmp_path / "photos", lambda: LABELS)


def reviews_table(log: SiteLog) -> list[tuple]:
    return log.db.execute("SELECT seq, verdict, label, bin, reached FROM reviews "
                          "ORDER BY seq").fetchall()


def test_a_label_is_found_by_its_name_or_its_english_name(reviews, log):
    out = reviews.label([2], "banana peel", source="test")
    assert out["label"] == "厨余垃圾_香蕉皮" and out["bin"] == "kitchen"
    assert out["new_label"] is False
    # It reached "other" but belongs in "kitchen": a correction, and contamination of other.
    assert reviews_table(log) == [(2, "corrected", "厨余垃圾_香蕉皮", "kitchen", "other")]


def test_a_new_label_needs_its_bin_and_then_is_known(reviews, log):
    with pytest.raises(CommandError, match="is new: give its bin"):
        reviews.label([3], "coffee cup", source="test")
    assert reviews_table(log) == []
    reviews.label([3], "coffee cup", "other", source="test")
    assert log.site_labels() == {"coffee cup": "other"}
    # Known now: no bin needed, and a conflicting bin is refused.
    reviews.label([1], "coffee cup", source="test")
    with pytest.raises(CommandError, match="belongs to bin other, not kitchen"):
        reviews.label([4], "coffee cup", "kitchen", source="test")


def test_a_prefixed_new_label_carries_its_bin(reviews):
    out = reviews.label([3], "其他垃圾_纸杯", source="test")
    assert out["bin"] == "other" and out["new_label"] is True
    with pytest.raises(CommandError, match="names bin other by its prefix, not kitchen"):
        reviews.label([3], "其他垃圾_餐盒", "kitchen", source="test")


@pytest.mark.parametrize("label, bin_name, message", [
    ("glass", "compost", "bin 'compost' does not exist"),
    ("", None, "label must be"),
    ("a/b", "other", "cannot name a class folder"),
    ("x" * 101, "other", "the limit is 100"),
    (7, None, "label must be"),
])
def test_bad_labels_and_bins_change_nothing(reviews, log, label, bin_name, message):
    with pytest.raises(CommandError, match=message):
        reviews.label([1, 2], label, bin_name, source="test")
    assert reviews_table(log) == []
    assert log.site_labels() == {}


def test_one_unknown_seq_refuses_the_whole_request(reviews, log):
    with pytest.raises(CommandError, match="no item #99"):
        reviews.label([1, 99, 2], "glass", source="test")
    with pytest.raises(CommandError, match="no item #99"):
        reviews.accept([1, 99], source="test")
    assert reviews_table(log) == []


@pytest.mark.parametrize("seqs, message", [
    ([], "at least one"), ([0], "not an item number"), (["1"], "not an item number"),
    ([True], "not an item number"), (list(range(1, MAX_SEQS + 2)), "the limit is 1000")])
def test_seq_lists_are_checked(seqs, message):
    with pytest.raises(CommandError, match=message):
        check_seqs(seqs)


def test_accept_says_the_compartment_was_right(reviews, log):
    reviews.accept([1, 2, 3], source="test")
    rows = reviews_table(log)
    # An uncertain banana peel accepted in "other": the bin was right for it, but its label
    # is of another bin, so it gives no training label.
    assert rows == [(1, "accepted", "可回收物_易拉罐", "recyclable", "recyclable"),
                    (2, "accepted", None, "other", "other"),
                    (3, "accepted", None, "other", "other")]


def test_contamination_counts_wrong_items_per_compartment(reviews, log):
    reviews.accept([1], source="test")
    reviews.label([4], "banana peel", source="test")  # glass that was a banana: recyclable
    reviews.label([2], "厨余垃圾_香蕉皮", source="test")  # landed in other, belongs kitchen
    c = log.contamination()
    assert c["recyclable"] == {"reviewed": 2, "wrong": 1, "rate": 0.5}
    assert c["other"] == {"reviewed": 1, "wrong": 1, "rate": 1.0}
    assert c["kitchen"] == {"reviewed": 0, "wrong": 0, "rate": None}
    assert c["total"] == {"reviewed": 3, "wrong": 2, "rate": round(2 / 3, 4)}
    assert c["items"] == 4 and c["reviewed_fraction"] == 0.75
    # A second verdict on the same item replaces the first: nothing counted twice.
    reviews.accept([4], source="test")
    assert log.contamination()["recyclable"] == {"reviewed": 2, "wrong": 0, "rate": 0.0}


def test_contamination_survives_reopening_and_pruning(tmp_path, reviews, log):
    reviews.label([2], "厨余垃圾_香蕉皮", source="test")
    log.add_item(item(5, "glass", "recyclable", age_s=90 * 86400))
    assert log.forget_old_rows(time.time() - 30 * 86400) == 1
    before = log.contamination()
    log.close()
    again = SiteLog(tmp_path)
    try:
        assert again.contamination() == before
        assert before["items"] == 5  # the pruned row still counts as an item logged
    finally:
        again.close()


def test_list_filters_and_pages(reviews):
    reviews.label([2], "厨余垃圾_香蕉皮", source="test")
    page = reviews.list(limit=3)
    assert [i["seq"] for i in page["items"]] == [4, 3, 2] and page["total"] == 4
    assert page["next_before"] == 2
    rest = reviews.list(limit=3, before=page["next_before"])
    assert [i["seq"] for i in rest["items"]] == [1] and rest["next_before"] is None
    assert [i["seq"] for i in reviews.list(uncertain=True)["items"]] == [2]
    assert [i["seq"] for i in reviews.list(failed=True)["items"]] == [3]
    assert [i["seq"] for i in reviews.list(unreviewed=True)["items"]] == [4, 3, 1]
    assert [i["seq"] for i in reviews.list(label="drink can")["items"]] == [1]
    assert [i["seq"] for i in reviews.list(bin_name="kitchen")["items"]] == [2]
    entry = reviews.list(uncertain=True)["items"][0]
    assert entry["bin"] == "kitchen" and entry["compartment"] == "other"
    assert entry["review"]["verdict"] == "corrected"
    with pytest.raises(CommandError, match="limit"):
        reviews.list(limit=0)


def test_a_log_ahead_of_the_count_database_is_moved_aside(tmp_path, log):
    log.close()
    fresh = SiteLog(tmp_path, last_seq=2)  # the count database starts again below seq 4
    try:
        assert fresh.set_aside is not None and fresh.set_aside.exists()
        assert fresh.item(1) is None
        old = sqlite3.connect(fresh.set_aside)
        assert old.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 4
        old.close()
    finally:
        fresh.close()
    # Not ahead: kept as it is.
    kept = SiteLog(tmp_path, last_seq=10)
    assert kept.set_aside is None and (tmp_path / SITELOG_NAME).exists()
    kept.close()


def test_class_folders_name_their_bin():
    assert class_folder("可回收物_易拉罐", "recyclable") == "可回收物_易拉罐"
    assert class_folder("glass", "recyclable") == "可回收物_glass"
    assert class_folder("coffee cup", "other") == "其他垃圾_coffee cup"


def test_check_reports_the_photos_folder(tmp_path, capsys):
    from bin_controller.cli import main

    main(["check", "--state-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"ok   photos: {tmp_path / 'photos'}: keep all, 0.0 of 500 MB used" in out
    config = tmp_path / "config.toml"
    config.write_text("[photos]\nmin_free_mb = 1000000\n")
    assert main(["check", "--config", str(config), "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "FAIL photos:" in err and "below photos.min_free_mb (1000000 MB)" in err
