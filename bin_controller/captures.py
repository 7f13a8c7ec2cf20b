"""The site's captured photos: `smartbin teach --capture` and MQTT `cmd/capture`.

An item laid on the flap is photographed a few times and kept as a class folder of the
site's teach data, `<state dir>/captures/<class folder>/`, named the way `smartbin review
export` names a label (`可回收物_glass`). The captured photos join the reviewed ones in every
teach from the site (`--from-review`, `cmd/teach`), beside the old-label photos a teach is
checked on. They are not items (no seq, no count, no contamination), so they stay out of the
site log.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bin_controller.bins import BINS
from bin_controller.errors import CommandError
from bin_controller.review import class_folder
from bin_controller.vision.bundle import Label

CAPTURES = "captures"  # under the state folder
MAX_LABEL = 100


@dataclass(frozen=True)
class CaptureLabel:
    label: str
    bin: str
    new: bool
    folder: Path


def capture_label(state_dir: str | Path, labels: Sequence[Label], label: str,
                  bin_name: str | None, *, bin_field: str = "bin") -> CaptureLabel:
    """Where photos of `label` go: a label of the model by name or English name, or a new
    one, which needs its bin. `bin_field` names the option in the error (--bin, bin)."""
    if not isinstance(label, str) or not label or len(label) > MAX_LABEL \
            or not label.isprintable() or any(ch in label for ch in "/\\\0") \
            or label.startswith("."):
        raise CommandError(f"label {label!r}: give a label name (at most {MAX_LABEL} "
                           "characters, no '/', not starting with '.')")
    if bin_name is not None and bin_name not in BINS:
        raise CommandError(f"{bin_field} {bin_name!r}: one of {', '.join(BINS)}")
    folder = Path(state_dir).expanduser() / CAPTURES
    for known in labels:
        if label in (known.name, known.name_en):
            if bin_name is not None and bin_name != known.bin:
                raise CommandError(f"{bin_field} {bin_name}: {known.name!r} goes in "
                                   f"{known.bin} in the model; leave {bin_field} out "
                                   "or use a new label name")
            return CaptureLabel(known.name, known.bin, False,
                                folder / class_folder(known.name, known.bin))
    if bin_name is None:
        raise CommandError(f"label {label!r} is not a label of the model; give its bin with "
                           f"{bin_field} ({', '.join(BINS)})")
    return CaptureLabel(label, bin_name, True, folder / class_folder(label, bin_name))


def save_shot(folder: Path, frame: np.ndarray, number: int, stamp: str | None = None) -> Path:
    """One shot as a JPEG in the class folder, whole or not at all; never over an earlier
    one (two items captured within a second share a stamp)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    stamp = stamp or shot_stamp()
    path = folder / f"{stamp}-{number:03d}.jpg"
    again = 1
    while path.exists():
        again += 1
        path = folder / f"{stamp}-{number:03d}.{again}.jpg"
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.asarray(frame)).convert("RGB").save(tmp, "JPEG", quality=92)
    os.replace(tmp, path)
    return path


def shot_stamp() -> str:
    """A capture's name: UTC time to the millisecond."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"


def photos_in(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def add_captures(captures: Path, dest: Path) -> int:
    """Copy the captured class folders into an export's class folders (same folder name,
    same label); returns the photos added."""
    if not captures.is_dir():
        return 0
    added = 0
    for folder in sorted(p for p in captures.iterdir() if p.is_dir()
                         and not p.name.startswith(".")):
        photos = sorted(p for p in folder.iterdir() if p.is_file()
                        and not p.name.startswith("."))
        if not photos:
            continue
        target = dest / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for photo in photos:
            # "capture-": never the name of an exported photo (<seq>.jpg)
            shutil.copyfile(photo, target / f"capture-{photo.name}")
            added += 1
    return added
