"""`smartbin review list|show|label|accept|export`: a person says what the bin got wrong.

Run on the bin, beside the service: the site log is SQLite in WAL mode, so a review written
here is seen by the running service (and published) while it sorts. This command only reads
and adds reviews; it never moves a log or its photos aside (only the service decides that,
against its count database), and it never creates a site log where there is none.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bin_controller.bins import BINS
from bin_controller.config import Config, load_config
from bin_controller.errors import CommandError, StoreError
from bin_controller.overrides import cli_overrides
from bin_controller.review import EXPORT_MANIFEST, MAX_SEQS, Reviews
from bin_controller.sitelog import SITELOG_NAME, SiteLog
from bin_controller.vision.bundle import Label, load_bundle

# The longest SEQS text read: MAX_SEQS numbers of 7 digits and their commas. A longer text
# is refused before it is split (a list pasted from a file by mistake).
MAX_SEQS_CHARS = 8 * 1000
SOURCE = "cli"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


# ---------------------------------------------------------------------- SEQS


def parse_seqs(text: str) -> list[int]:
    """An argparse type: item numbers as `12`, `12,15,20-25`; in order, without repeats,
    at most review.MAX_SEQS of them."""
    from bin_controller.cli import quote

    example = f"expected item numbers such as 12 or 12,15,20-25 (each 1 or more), not " \
              f"{quote(text)}"
    if len(text) > MAX_SEQS_CHARS:
        raise argparse.ArgumentTypeError(f"{len(text)} characters of item numbers; at most "
                                         f"{MAX_SEQS} items in one command")
    seqs: dict[int, None] = {}  # ordered, no repeats
    for part in text.split(","):
        lo_text, dash, hi_text = part.strip().partition("-")
        lo, hi = _number(lo_text), _number(hi_text) if dash else _number(lo_text)
        if lo is None or hi is None:
            raise argparse.ArgumentTypeError(example)
        if hi < lo:
            raise argparse.ArgumentTypeError(f"range {part.strip()!r} runs backwards; write "
                                             f"{hi}-{lo}")
        # Counted before it is expanded: 1-999999999 must not build a billion numbers.
        if hi - lo + 1 > MAX_SEQS:
            raise argparse.ArgumentTypeError(f"more than {MAX_SEQS} items in one command; "
                                             "review them in parts")
        seqs.update(dict.fromkeys(range(lo, hi + 1)))
        if len(seqs) > MAX_SEQS:
            raise argparse.ArgumentTypeError(f"more than {MAX_SEQS} items in one command; "
                                             "review them in parts")
    return list(seqs)


def _number(text: str) -> int | None:
    text = text.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        return None
    value = int(text)
    return value if value >= 1 else None


# ---------------------------------------------------------------------- opening


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, cli_overrides(args))


@contextmanager
def opened(cfg: Config) -> Iterator[Reviews]:
    """The Reviews of the bin `cfg` describes; the site log must already exist."""
    from bin_controller.photolog import photos_dir  # numpy and PIL: only when run

    folder = Path(cfg.bin.state_dir).expanduser()
    if not folder.is_dir():
        raise StoreError(f"{folder}: no such state folder; give the bin's folder with "
                         "--state-dir or bin.state_dir in --config")
    if not (folder / SITELOG_NAME).is_file():
        raise StoreError(f"{folder}: no site log ({SITELOG_NAME}) in this folder: the bin has "
                         "not sorted an item here yet, or --state-dir/bin.state_dir names "
                         "another folder")
    sitelog = SiteLog(folder)
    try:
        yield Reviews(sitelog, photos_dir(cfg), _labels(cfg))
    except sqlite3.Error as exc:
        # Busy past the timeout (the service in a long write) or a damaged file.
        raise StoreError(f"{sitelog.path}: {exc}; try again, or check the disk") from exc
    finally:
        sitelog.close()


def _labels(cfg: Config) -> Callable[[], Sequence[Label]]:
    """The running model's labels, read from its manifest only when a command needs them
    (list and show work with a missing bundle)."""
    loaded: list[Sequence[Label]] = []

    def labels() -> Sequence[Label]:
        if not loaded:
            loaded.append(load_bundle(cfg.model.bundle, models_dir=cfg.model.dir).labels)
        return loaded[0]

    return labels


# ---------------------------------------------------------------------- commands


def run(args: argparse.Namespace) -> int:
    command: Callable[[Reviews, argparse.Namespace], int] = COMMANDS[args.review_command]
    cfg = _config(args)
    with opened(cfg) as reviews:
        return command(reviews, args)


def _list(reviews: Reviews, args: argparse.Namespace) -> int:
    page = reviews.list(uncertain=args.uncertain, failed=args.failed,
                        unreviewed=args.unreviewed, label=args.label, bin_name=args.bin,
                        before=args.before, limit=args.limit)
    if args.json:
        print(json.dumps(page, ensure_ascii=False))
        return 0
    items = page["items"]
    if not items:
        print(f"no items match ({page['total']} in all)")
        return 0
    rows: list[tuple[str, ...]] = [
        ("seq", "time", "label", "conf", "model bin", "reached", "flags", "review")]
    rows += [_row(item) for item in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [r[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(r[1:-1], widths[1:],
                                                                       strict=True)]
        print("  ".join([*cells, r[-1]]).rstrip())
    more = page["next_before"]
    print(f"{len(items)} of {page['total']} shown" + (
        f"; older ones: --before {more}" if more is not None else ""))
    return 0


def _row(item: dict[str, Any]) -> tuple[str, ...]:
    flags = [f for f in ("uncertain", "failed", "forced") if item[f]]
    if item["photo"]:
        flags.append("photo")
    conf = "-" if item["confidence"] is None else f"{item['confidence']:.0%}"
    label = item["label_en"] or item["label"] or "-"
    return (str(item["seq"]), time.strftime(TIME_FORMAT, time.localtime(item["time"])),
            label[:24], conf, item["bin"] or "-", item["compartment"], ",".join(flags) or "-",
            _verdict(item["review"]))


def _verdict(review: dict[str, Any] | None) -> str:
    if review is None:
        return ""
    if review["verdict"] == "accepted":
        return "accepted"
    return f"{review['verdict']}: {review['label']} ({review['bin']})"


def _show(reviews: Reviews, args: argparse.Namespace) -> int:
    item = reviews.show(args.seq)
    if args.json:
        print(json.dumps(item, ensure_ascii=False))
        return 0
    label = item["label"] or "-"
    if item["label_en"]:
        label += f" ({item['label_en']})"
    conf = "-" if item["confidence"] is None else f"{item['confidence']:.1%}"
    flags = [f for f in ("uncertain", "failed", "forced") if item[f]]
    lines = [
        ("item", f"#{item['seq']}"),
        ("time", time.strftime(TIME_FORMAT, time.localtime(item["time"]))),
        ("label", label),
        ("confidence", conf),
        ("model's bin", item["bin"] or "-"),
        ("reached", item["compartment"]),
        ("flags", ", ".join(flags) or "-"),
        ("model", f"{item['model'] or '-'} {item['model_version'] or ''}".rstrip()),
        ("photo", item["photo_file"] + f" ({item['photo_bytes']} bytes)"
         if item["photo_file"] else "none kept"),
        ("review", _verdict(item["review"]) or "not reviewed"),
    ]
    for key, value in lines:
        print(f"{key + ':':13} {value}")
    return 0


def _label(reviews: Reviews, args: argparse.Namespace) -> int:
    done = reviews.label(args.seqs, args.label, args.bin, source=SOURCE)
    new = " (a new label)" if done["new_label"] else ""
    print(f"labelled {_seq_text(done['seqs'])} as {done['label']} ({done['bin']}){new}; "
          f"{done['wrong']} of {len(done['seqs'])} landed in the wrong compartment")
    _print_contamination(reviews.contamination())
    return 0


def _accept(reviews: Reviews, args: argparse.Namespace) -> int:
    done = reviews.accept(args.seqs, source=SOURCE)
    print(f"accepted {_seq_text(done['seqs'])}: {len(done['seqs'])} item(s) went where they "
          "belong")
    _print_contamination(reviews.contamination())
    return 0


def _export(reviews: Reviews, args: argparse.Namespace) -> int:
    from training.dataset import MIN_PER_CLASS

    try:
        done = reviews.export(args.dir)
    except OSError as exc:
        raise CommandError(f"{args.dir}: cannot write the export: {exc.strerror or exc}") \
            from exc
    classes: dict[str, int] = done["classes"]
    print(f"exported {done['photos']} reviewed photos in {len(classes)} classes to "
          f"{done['dir']} (manifest: {EXPORT_MANIFEST})"
          + (f"; {done['skipped']} skipped (see the manifest)" if done["skipped"] else ""))
    for name, n in sorted(classes.items()):
        print(f"  {n:6d}  {name}")
    few = [f"{name} ({n})" for name, n in sorted(classes.items()) if n < MIN_PER_CLASS]
    if few:
        print(f"smartbin: warning: fewer than {MIN_PER_CLASS} photos (smartbin train needs "
              f"{MIN_PER_CLASS} per class): {', '.join(few)}", file=sys.stderr)
    if len(classes) < 2:
        print("smartbin: warning: smartbin train needs at least two classes; review more "
              "items", file=sys.stderr)
    return 0


def _seq_text(seqs: Sequence[int]) -> str:
    shown = ", ".join(f"#{s}" for s in seqs[:10])
    return shown + (f" and {len(seqs) - 10} more" if len(seqs) > 10 else "")


def _print_contamination(c: dict[str, Any]) -> None:
    total = c["total"]
    rate = "-" if total["rate"] is None else f"{total['rate']:.1%}"
    fraction = "-" if c["reviewed_fraction"] is None else f"{c['reviewed_fraction']:.1%}"
    print(f"contamination: {total['wrong']} of {total['reviewed']} reviewed items in the "
          f"wrong compartment ({rate}); {total['reviewed']} of {c['items']} items reviewed "
          f"({fraction})")
    parts = []
    for b in BINS:
        v = c[b]
        shown = "" if v["rate"] is None else f" ({v['rate']:.1%})"
        parts.append(f"{b} {v['wrong']}/{v['reviewed']}{shown}")
    print("  per compartment (wrong/reviewed): " + ", ".join(parts))


COMMANDS: dict[str, Callable[[Reviews, argparse.Namespace], int]] = {
    "list": _list, "show": _show, "label": _label, "accept": _accept, "export": _export}
