"""Review: a person says what an item really was, and the bin learns its contamination.

Shared by `smartbin review` on the bin and the `cmd/review_*`, `cmd/label` and `cmd/accept`
MQTT commands, so both check the same things: every seq must be in the site log, a label
must be one the model or an earlier review knows (or come with its bin), and a request is
carried out whole or not at all. A correction records the true label and bin beside what
the bin did; the counts (what physically happened) never change. Reviewed photos are the
bin's own labelled dataset, exported in the class-folder layout `smartbin train` reads.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bin_controller.bins import BIN_TO_CHINESE, BINS, bin_from_prefix
from bin_controller.errors import CommandError
from bin_controller.sitelog import ACCEPTED, CORRECTED, Item, Review, SiteLog
from bin_controller.vision.bundle import Label

# Seqs one request may name: a page of a review screen, many times over. A longer list is
# refused whole (a 10 MB list never reaches here: MQTT payloads stop at 64 KB).
MAX_SEQS = 1000
MAX_PAGE = 100
# A label becomes a folder name in an export: one file-name component, short.
MAX_LABEL_CHARS = 100
EXPORT_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Vocabulary:
    """The labels a review may use: the running model's, then those reviewers added."""

    labels: dict[str, str]  # canonical name -> bin
    aliases: dict[str, str]  # English name (lower case) -> canonical name

    @classmethod
    def of(cls, model: Sequence[Label], site: dict[str, str]) -> Vocabulary:
        labels = {lab.name: lab.bin for lab in model}
        aliases = {lab.name_en.lower(): lab.name for lab in model if lab.name_en}
        for name, bin_name in site.items():
            labels.setdefault(name, bin_name)
        return cls(labels, aliases)

    def find(self, text: str) -> str | None:
        if text in self.labels:
            return text
        return self.aliases.get(text.lower())


def check_label(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CommandError("label must be a label's name (text)")
    text = value.strip()
    if len(text) > MAX_LABEL_CHARS:
        raise CommandError(f"label is {len(text)} characters; the limit is {MAX_LABEL_CHARS}")
    if (not text.isprintable() or any(ch in text for ch in "/\\") or text.startswith(".")):
        raise CommandError(f"label {text[:40]!r} cannot name a class folder: no '/', '\\', "
                           "control characters or leading '.'")
    return text


def check_bin(value: object) -> str:
    if not isinstance(value, str) or value not in BINS:
        shown = repr(value)[:40]
        raise CommandError(f"bin {shown} does not exist; bins are {', '.join(BINS)}")
    return value


def check_seqs(value: object) -> list[int]:
    """One seq or a list of them: whole numbers, at most MAX_SEQS, duplicates dropped."""
    seqs = value if isinstance(value, list) else [value]
    if not seqs:
        raise CommandError("give at least one seq")
    if len(seqs) > MAX_SEQS:
        raise CommandError(f"{len(seqs)} seqs in one request; the limit is {MAX_SEQS}")
    out: list[int] = []
    for s in seqs:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise CommandError(f"seq {repr(s)[:40]} is not an item number (a whole number "
                               "from 1)")
        if s not in out:
            out.append(s)
    return out


def class_folder(label: str, bin_name: str) -> str:
    """The class folder `train` reads: the label when it already names its bin by the
    standard's prefix, else that prefix and the label (`可回收物_glass`)."""
    if bin_from_prefix(label) == bin_name:
        return label
    return f"{BIN_TO_CHINESE[bin_name]}_{label}"


class Reviews:
    def __init__(self, sitelog: SiteLog, photos_folder: Path,
                 model_labels: Callable[[], Sequence[Label]]) -> None:
        self.sitelog = sitelog
        self.photos_folder = photos_folder
        self.model_labels = model_labels

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.of(self.model_labels(), self.sitelog.site_labels())

    # ------------------------------------------------------------------ reading

    def list(self, *, uncertain: bool = False, failed: bool = False,
             unreviewed: bool = False, label: str | None = None, bin_name: str | None = None,
             before: int | None = None, limit: int = 20) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise CommandError(f"limit must be from 1 to {MAX_PAGE}")
        if bin_name is not None:
            check_bin(bin_name)
        if label is not None:
            label = check_label(label)
            label = self.vocabulary().find(label) or label
        items, total = self.sitelog.query(uncertain=uncertain, failed=failed,
                                          unreviewed=unreviewed, label=label,
                                          bin_name=bin_name, before=before, limit=limit)
        more = len(items) == limit and items[-1].seq > 1
        return {"items": [i.to_dict() for i in items], "total": total,
                "next_before": items[-1].seq if items and more else None}

    def show(self, seq: int) -> dict[str, Any]:
        item = self._items([seq])[seq]
        out = item.to_dict()
        out["photo_file"] = str(self.photos_folder / item.photo) if item.photo else None
        out["photo_bytes"] = item.bytes
        return out

    def contamination(self) -> dict[str, Any]:
        return self.sitelog.contamination()

    # ------------------------------------------------------------------ verdicts

    def label(self, seqs: Sequence[int], label: object, bin_name: object = None, *,
              source: str) -> dict[str, Any]:
        """The items were `label` (in its bin); all of them or none."""
        text = check_label(label)
        wanted = None if bin_name is None else check_bin(bin_name)
        vocab = self.vocabulary()
        known = vocab.find(text)
        new: list[tuple[str, str]] = []
        if known is not None:
            true_bin = vocab.labels[known]
            if wanted is not None and wanted != true_bin:
                raise CommandError(f"label {known!r} belongs to bin {true_bin}, not {wanted}")
            name = known
        else:
            prefixed = bin_from_prefix(text)
            if wanted is None and prefixed is None:
                raise CommandError(f"label {text!r} is new: give its bin too (one of "
                                   f"{', '.join(BINS)}), or use a known label")
            if wanted is not None and prefixed is not None and wanted != prefixed:
                raise CommandError(f"label {text!r} names bin {prefixed} by its prefix, "
                                   f"not {wanted}")
            name, true_bin = text, wanted or prefixed or ""
            new.append((name, true_bin))
        items = self._items(seqs)
        reviews = [Review(s, ACCEPTED if items[s].label == name and items[s].bin == true_bin
                          else CORRECTED, name, true_bin, items[s].bin) for s in items]
        self.sitelog.review(reviews, source=source, new_labels=new)
        return {"seqs": list(items), "label": name, "bin": true_bin, "new_label": bool(new),
                "wrong": sum(1 for r in reviews if r.bin != r.reached)}

    def accept(self, seqs: Sequence[int], *, source: str) -> dict[str, Any]:
        """The items went where they belong (their label too, when it is of that bin)."""
        items = self._items(seqs)
        vocab = self.vocabulary()
        reviews = []
        for seq, item in items.items():
            label = item.label if item.label and vocab.labels.get(item.label) == item.bin \
                else None
            reviews.append(Review(seq, ACCEPTED, label, item.bin, item.bin))
        self.sitelog.review(reviews, source=source)
        return {"seqs": list(items)}

    def _items(self, seqs: Sequence[int]) -> dict[int, Item]:
        seqs = check_seqs(list(seqs))
        found = self.sitelog.items(seqs)
        missing = [s for s in seqs if s not in found]
        if missing:
            shown = ", ".join(f"#{s}" for s in missing[:5]) + (" ..." if len(missing) > 5
                                                               else "")
            raise CommandError(f"no item {shown} in the site log (unknown seq, or older than "
                               "photos.keep_days); nothing was changed")
        return {s: found[s] for s in seqs}

    # ------------------------------------------------------------------ the site dataset

    def export(self, dest: Path) -> dict[str, Any]:
        """Reviewed photos with a label, as class folders and a manifest."""
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise CommandError(f"{dest} already exists and is not an empty folder; give a "
                               "new folder to export into")
        entries: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        for item in self.sitelog.reviewed():
            if item.true_label is None or item.true_bin is None:
                continue  # accepted without a label of its bin: nothing to learn from
            if item.photo is None:
                skipped.append({"seq": item.seq, "reason": "no photo"})
                continue
            try:
                data = (self.photos_folder / item.photo).read_bytes()
            except OSError as exc:
                skipped.append({"seq": item.seq, "reason": f"unreadable: {exc.strerror}"})
                continue
            digest = hashlib.sha256(data).hexdigest()
            if item.sha256 and digest != item.sha256:
                skipped.append({"seq": item.seq, "reason": "damaged (content hash differs)"})
                continue
            folder = class_folder(item.true_label, item.true_bin)
            rel = f"{folder}/{item.seq:08d}.jpg"
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            entries.append({"seq": item.seq, "time": item.time, "label": item.true_label,
                            "bin": item.true_bin, "verdict": item.verdict, "file": rel,
                            "sha256": digest})
        dest.mkdir(parents=True, exist_ok=True)
        classes: dict[str, int] = {}
        for e in entries:
            folder = e["file"].split("/", 1)[0]
            classes[folder] = classes.get(folder, 0) + 1
        manifest = {"exported": time.time(), "items": entries, "classes": classes,
                    "skipped": skipped}
        (dest / EXPORT_MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1),
                                            encoding="utf-8")
        return {"dir": str(dest), "photos": len(entries), "classes": classes,
                "skipped": len(skipped)}
