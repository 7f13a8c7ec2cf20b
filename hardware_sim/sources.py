"""Where the simulator's items come from: generated pictures or a folder of real photos."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from bin_controller.bins import BINS, bin_from_prefix
from bin_controller.errors import ImageError, SmartbinError
from bin_controller.vision.bundle import find_bin_map
from bin_controller.vision.preprocess import load_image
from hardware_sim import items
from hardware_sim.mechanics import SimItem

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class GeneratedSource:
    """The demo bundle's item kinds, drawn on the fly."""

    name = "generated items"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def items(self, n: int) -> list[SimItem]:
        out = []
        for i in range(n):
            kind = items.KINDS[int(self.rng.integers(len(items.KINDS)))]
            out.append(SimItem(i + 1, kind.name, kind.bin, items.render(kind, self.rng),
                               label_en=kind.name_en))
        return out


def load_bin_map(path: Path | None, classes: list[str]) -> dict[str, str]:
    """Class folder -> bin, from a JSON file, else from `<bin>_<item>` class-name prefixes."""
    mapping: dict[str, str] = {}
    path = find_bin_map(path) if path is not None else None
    if path is not None:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SmartbinError(f"{path}: cannot read bin map: {exc}") from exc
        if not isinstance(raw, dict):
            raise SmartbinError(f"{path}: a bin map is a JSON object of class -> bin")
        for cls, b in raw.items():
            if b not in BINS:
                raise SmartbinError(f"{path}: class {cls!r} maps to {b!r}; bins are "
                                    f"{', '.join(BINS)}")
        mapping.update(raw)
    for cls in classes:
        if cls not in mapping:
            b = bin_from_prefix(cls)
            if b is None:
                where = f"{path}" if path else "--bin-map"
                raise SmartbinError(f"class {cls!r} has no bin: add it to {where} "
                                    f'(e.g. {{"{cls}": "other"}})')
            mapping[cls] = b
    return mapping


class FolderSource:
    """Photos from class subfolders (e.g. ../shared/datasets/trashnet), as the camera frame."""

    def __init__(self, root: Path, bin_map: Path | None, seed: int,
                 frame: tuple[int, int]) -> None:
        root = Path(root)
        if not root.is_dir():
            raise SmartbinError(f"{root}: no such folder of class subfolders")
        self.name = str(root)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise SmartbinError(f"{root}: has no class subfolders")
        self.bins = load_bin_map(bin_map, classes)
        self.photos = [(p, c) for c in classes for p in sorted((root / c).iterdir())
                       if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.photos:
            raise SmartbinError(f"{root}: no images in its class subfolders")
        self.rng = np.random.default_rng(seed)
        self.frame = frame

    def items(self, n: int) -> list[SimItem]:
        """n photos drawn without replacement; unreadable files are skipped with a warning."""
        out: list[SimItem] = []
        for i in self.rng.permutation(len(self.photos)):
            if len(out) == n:
                break
            path, cls = self.photos[i]
            try:
                image = load_image(path).resize(self.frame, Image.Resampling.BILINEAR)
            except ImageError as exc:
                log.warning("skipped %s", exc)
                continue
            out.append(SimItem(len(out) + 1, cls, self.bins[cls], np.asarray(image),
                               label_en=cls))
        return out
