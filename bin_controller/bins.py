"""The four compartments of the Chinese household-waste standard."""

from __future__ import annotations

BINS: tuple[str, ...] = ("recyclable", "kitchen", "hazardous", "other")

# Class names of GarbageSortingPictureDataSet start with the bin's Chinese name.
PREFIX_TO_BIN: dict[str, str] = {
    "可回收物": "recyclable",
    "厨余垃圾": "kitchen",
    "有害垃圾": "hazardous",
    "其他垃圾": "other",
}
BIN_TO_CHINESE: dict[str, str] = {v: k for k, v in PREFIX_TO_BIN.items()}


def bin_from_prefix(class_name: str) -> str | None:
    """Bin named by a `<bin>_<item>` class name, or None when it has no known prefix."""
    prefix = class_name.split("_", 1)[0]
    return PREFIX_TO_BIN.get(prefix)
