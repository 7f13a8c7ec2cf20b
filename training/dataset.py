"""A folder of labelled photos: scanned, checked, split 8:1:1 (stratified, seeded), recorded."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bin_controller.errors import DatasetError
from hardware_sim.sources import IMAGE_SUFFIXES, load_bin_map

SPLITS = ("train", "val", "test")
MIN_PER_CLASS = 10


@dataclass(frozen=True)
class Sample:
    path: Path
    rel: str  # path relative to the data root, as recorded in the bundle
    label: int
    sha256: str


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    bins: dict[str, str]
    splits: dict[str, list[Sample]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[str] = field(default_factory=list)
    seed: int = 0
    presplit: bool = False

    def record(self) -> dict:
        """What the bundle keeps so that any evaluation can be repeated on the same files."""
        return {
            "seed": self.seed,
            "presplit": self.presplit,
            "ratios": None if self.presplit else [0.8, 0.1, 0.1],
            "classes": self.classes,
            **{name: [[s.rel, s.sha256[:16], s.label] for s in self.splits[name]]
               for name in SPLITS},
        }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scan(folder: Path) -> dict[str, list[Path]]:
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = sorted(p for p in d.rglob("*") if p.is_file())
    return out


def _usable(path: Path) -> str | None:
    """None when the file is an image Pillow can decode, else why not."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:
        return f"corrupt image ({type(exc).__name__})"
    return None


def load_dataset(root: Path, *, seed: int = 0, bin_map: Path | None = None) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder (expected class subfolders, or "
                            "train/ val/ test/ each holding class subfolders)")
    presplit = all((root / s).is_dir() for s in SPLITS)
    files = {s: _scan(root / s) for s in SPLITS} if presplit else {"all": _scan(root)}
    classes = sorted({c for per in files.values() for c in per})
    if len(classes) < 2:
        raise DatasetError(f"{root}: needs at least two class subfolders, found {len(classes)}")
    bins = load_bin_map(bin_map, classes)
    skipped: list[tuple[str, str]] = []
    samples: dict[str, list[Sample]] = {}
    for part, per_class in files.items():
        samples[part] = []
        for cls, paths in per_class.items():
            for p in paths:
                reason = _usable(p)
                if reason:
                    skipped.append((str(p.relative_to(root)), reason))
                    continue
                samples[part].append(Sample(p, str(p.relative_to(root)), classes.index(cls),
                                            _sha(p)))
    ds = Dataset(root, classes, bins, {}, skipped, seed=seed, presplit=presplit)
    if presplit:
        ds.splits = {s: samples[s] for s in SPLITS}
    else:
        ds.splits = _stratified_split(samples["all"], len(classes), seed)
    counts = np.bincount([s.label for s in ds.splits["train"]], minlength=len(classes))
    for cls, n in zip(classes, counts, strict=True):
        if n < MIN_PER_CLASS:
            ds.warnings.append(f"class {cls!r} has only {n} training images "
                               f"(fewer than {MIN_PER_CLASS})")
    if not ds.splits["train"] or not ds.splits["test"]:
        raise DatasetError(f"{root}: too few usable images to split into train/val/test")
    return ds


def _stratified_split(samples: list[Sample], n_classes: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for label in range(n_classes):
        group = sorted((s for s in samples if s.label == label), key=lambda s: s.rel)
        order = rng.permutation(len(group))
        n_val = round(len(group) * 0.1)
        n_test = round(len(group) * 0.1)
        picked = [group[i] for i in order]
        out["test"] += picked[:n_test]
        out["val"] += picked[n_test:n_test + n_val]
        out["train"] += picked[n_test + n_val:]
    return out


def load_split(record_file: Path, root: Path) -> dict[str, list[Sample]]:
    """The split a bundle recorded, checked against the files now under root."""
    data = json.loads(Path(record_file).read_text(encoding="utf-8"))
    classes = data["classes"]
    out: dict[str, list[Sample]] = {}
    for part in SPLITS:
        out[part] = []
        for rel, short, label in data[part]:
            p = root / rel
            if not p.is_file():
                raise DatasetError(f"{p}: recorded in {record_file} but missing")
            sha = _sha(p)
            if sha[:16] != short:
                raise DatasetError(f"{p}: content changed since the split was recorded")
            if not 0 <= label < len(classes):
                raise DatasetError(f"{record_file}: bad label {label} for {rel}")
            out[part].append(Sample(p, rel, label, sha))
    return out
