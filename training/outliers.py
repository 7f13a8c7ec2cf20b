"""Procedural photos of things that are none of the demo's kinds, for outlier exposure.

The demo head learns to be unsure of these (training.head.train_head `x_outlier`), so an
item of a kind it was never taught goes to the fallback bin marked uncertain rather than
confidently into the compartment of the nearest known kind. They are generic on purpose:
random shapes, blobs and textures in colours drawn uniformly at random, and the known
kinds' own drawings recoloured at random. None copies a particular kind the demo is later
tested on (hardware_sim.unknown_kinds): that would measure memory, not doubt.

Each is drawn by `items.render`, so floor, shadow, pose and light are those of real items.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import ImageDraw

from hardware_sim import items
from hardware_sim.items import ItemKind

Colour = tuple[int, int, int]


def _colour(rng: np.random.Generator) -> Colour:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    return r, g, b


def _box(rng: np.random.Generator, s: int, smallest: float = 0.15) -> list[float]:
    w, h = rng.uniform(smallest, 0.85, 2) * s
    x0, y0 = rng.uniform(0.05 * s, 0.95 * s - w), rng.uniform(0.05 * s, 0.95 * s - h)
    return [x0, y0, x0 + w, y0 + h]


def _shape(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, fill: Colour) -> None:
    box = _box(rng, s)
    kind = int(rng.integers(5))
    if kind == 0:
        d.ellipse(box, fill=fill)
    elif kind == 1:
        d.rectangle(box, fill=fill)
    elif kind == 2:
        d.rounded_rectangle(box, radius=int(min(box[2] - box[0], box[3] - box[1]) / 4),
                            fill=fill)
    elif kind == 3:
        points = rng.uniform(0.05 * s, 0.95 * s, (int(rng.integers(3, 8)), 2))
        d.polygon([(float(x), float(y)) for x, y in points], fill=fill)
    else:
        d.line(box, fill=fill, width=max(2, int(s * rng.uniform(0.05, 0.2))))


def _shapes(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    """One to five shapes, each its own colour."""
    for _ in range(int(rng.integers(1, 6))):
        _shape(d, rng, s, _colour(rng))


def _blobs(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    """Several small round or square blobs of one or two colours, scattered or heaped."""
    colours = [_colour(rng) for _ in range(int(rng.integers(1, 3)))]
    centre = rng.uniform(0.3, 0.7, 2) * s
    spread = rng.uniform(0.1, 0.35) * s
    for _ in range(int(rng.integers(3, 13))):
        r = rng.uniform(0.05, 0.14) * s
        x, y = np.clip(centre + rng.normal(0, spread, 2), r, s - r)
        fill = colours[int(rng.integers(len(colours)))]
        (d.ellipse if rng.random() < 0.7 else d.rectangle)([x - r, y - r, x + r, y + r],
                                                           fill=fill)


def _texture(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    """A patch of one colour striped, checked or dotted with another."""
    box = _box(rng, s, smallest=0.35)
    ground, ink = _colour(rng), _colour(rng)
    (d.ellipse if rng.random() < 0.4 else d.rectangle)(box, fill=ground)
    step = max(3, int(s * rng.uniform(0.04, 0.12)))
    x0, y0, x1, y1 = (int(v) for v in box)
    pattern = int(rng.integers(3))
    if pattern == 0:
        for x in range(x0, x1, step * 2):
            d.rectangle([x, y0, min(x + step, x1), y1], fill=ink)
    elif pattern == 1:
        for y in range(y0, y1, step * 2):
            d.rectangle([x0, y, x1, min(y + step, y1)], fill=ink)
    elif pattern == 2:
        for y in range(y0, y1, step):
            for x in range(x0 + (y // step % 2) * step, x1, step * 2):
                d.rectangle([x, y, min(x + step, x1), min(y + step, y1)], fill=ink)


class _Recolour:
    """An ImageDraw whose every `fill` is swapped for a random colour, the same colour
    for the same fill within one drawing."""

    def __init__(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
        self._draw, self._rng = draw, rng
        self._colours: dict[Any, Colour] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._draw, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if "fill" in kwargs:
                kwargs["fill"] = self._colours.setdefault(kwargs["fill"], _colour(self._rng))
            return method(*args, **kwargs)
        return call


def _recoloured(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    """A known kind's shape in colours it never has."""
    kind = items.KINDS[int(rng.integers(len(items.KINDS)))]
    kind.draw(_Recolour(d, rng), rng, s)  # type: ignore[arg-type]


FAMILIES: tuple[ItemKind, ...] = tuple(
    ItemKind(f"outlier_{draw.__name__.strip('_')}", draw.__name__.strip("_"), "other", draw)
    for draw in (_shapes, _blobs, _texture, _recoloured)
)


def sample(rng: np.random.Generator, n: int, size: int = items.FRAME) -> list[np.ndarray]:
    """n outlier photos, the four families drawn uniformly."""
    families = rng.integers(0, len(FAMILIES), n)
    return [items.render(FAMILIES[f], rng, size) for f in families]


def bin_spread_target(label_bins: list[str]) -> np.ndarray:
    """The outlier target: each bin gets the same share, split evenly among its labels.

    The bin is chosen on the bin's summed probability, so a target uniform over labels
    would still hand a bin with many labels (recyclable: three of eight) a large share;
    this one keeps every bin at 1 / (number of bins), below any useful threshold.
    """
    bins = sorted(set(label_bins))
    per_bin = {b: label_bins.count(b) for b in bins}
    return np.array([1.0 / len(bins) / per_bin[b] for b in label_bins], np.float32)
