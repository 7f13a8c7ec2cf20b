"""Kinds of item the demo bundle has never seen, drawn like `items.KINDS`: what a teach on
the simulator learns (the teach scenario, `smartbin teach --capture` with `--simulate`).

Their colours are ones none of the demo's eight kinds wears, so the demo's colour-grid
features can tell them apart once taught, and the untaught demo is unsure of them.
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from bin_controller.errors import SmartbinError
from hardware_sim import items
from hardware_sim.items import ItemKind
from hardware_sim.mechanics import SimItem


def _grapes(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    for i in range(3):
        for j in range(3 - i):
            x, y = s * (0.25 + 0.16 * j + 0.08 * i), s * (0.25 + 0.16 * i)
            d.ellipse([x, y, x + s * 0.18, y + s * 0.18],
                      fill=items._jitter(rng, (110, 40, 130)))


def _jar(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    d.rectangle([s * 0.3, s * 0.25, s * 0.7, s * 0.85], fill=items._jitter(rng, (40, 150, 60)))
    d.rectangle([s * 0.38, s * 0.12, s * 0.62, s * 0.25],
                fill=items._jitter(rng, (230, 200, 30)))


GRAPES = ItemKind("厨余垃圾_葡萄", "grapes", "kitchen", _grapes)
GLASS_JAR = ItemKind("可回收物_玻璃罐", "glass jar", "recyclable", _jar)
UNKNOWN_KINDS: tuple[ItemKind, ...] = (GRAPES, GLASS_JAR)


def find_kind(name: str) -> ItemKind:
    """A simulator item kind by its name or English name (the demo's and these)."""
    for kind in (*items.KINDS, *UNKNOWN_KINDS):
        if name in (kind.name, kind.name_en):
            return kind
    known = ", ".join(k.name_en for k in (*items.KINDS, *UNKNOWN_KINDS))
    raise SmartbinError(f"--item {name!r}: not a simulator item kind; one of: {known}")


class MixedSource:
    """Items of the given kinds in a fixed order from a seed: `kinds[i]` for each i of
    `order`, rendered afresh (new pose and light) each time."""

    name = "mixed generated items"

    def __init__(self, kinds: tuple[ItemKind, ...], seed: int) -> None:
        self.kinds = kinds
        self.rng = np.random.default_rng(seed)

    def items(self, order: list[int], first_id: int = 1) -> list[SimItem]:
        out = []
        for n, index in enumerate(order):
            kind = self.kinds[index]
            out.append(SimItem(first_id + n, kind.name, kind.bin,
                               items.render(kind, self.rng), label_en=kind.name_en))
        return out
