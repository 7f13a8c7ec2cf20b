"""Procedural photos of waste items, as the bin's camera would see them on the flap.

They train the demo bundle and feed the simulator's camera on a machine without real
photos. Each kind is one of the study's 120 classes; together they cover all four bins.
Drawing is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRAME = 128  # the simulated camera's frame size (square)


@dataclass(frozen=True)
class ItemKind:
    name: str  # the class name in the 120-label set
    name_en: str
    bin: str
    draw: Callable[[ImageDraw.ImageDraw, np.random.Generator, int], None]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _banana(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    yellow = _jitter(rng, (235, 200, 40))
    d.arc([s * 0.15, s * 0.2, s * 0.85, s * 0.9], 200, 340, fill=yellow, width=int(s * 0.16))
    d.ellipse([s * 0.12, s * 0.42, s * 0.2, s * 0.5], fill=_jitter(rng, (90, 60, 20)))


def _apple(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    d.ellipse([s * 0.22, s * 0.28, s * 0.78, s * 0.84], fill=_jitter(rng, (200, 30, 35)))
    d.line([s * 0.5, s * 0.3, s * 0.53, s * 0.16], fill=(90, 55, 20), width=max(2, s // 24))
    d.ellipse([s * 0.53, s * 0.14, s * 0.7, s * 0.24], fill=_jitter(rng, (60, 160, 50)))


def _can(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    silver = _jitter(rng, (195, 198, 205), 12)
    d.rounded_rectangle([s * 0.32, s * 0.15, s * 0.68, s * 0.85], radius=s // 12, fill=silver)
    band = [(200, 30, 40), (30, 70, 200), (20, 150, 60)][int(rng.integers(3))]
    d.rectangle([s * 0.32, s * 0.38, s * 0.68, s * 0.62], fill=_jitter(rng, band))
    d.ellipse([s * 0.34, s * 0.13, s * 0.66, s * 0.2], fill=(150, 150, 160))


def _bottle(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    clear = _jitter(rng, (110, 195, 140))
    d.rounded_rectangle([s * 0.36, s * 0.3, s * 0.64, s * 0.9], radius=s // 10, fill=clear)
    d.polygon([(s * 0.36, s * 0.32), (s * 0.45, s * 0.17), (s * 0.55, s * 0.17),
               (s * 0.64, s * 0.32)], fill=clear)
    d.rectangle([s * 0.44, s * 0.09, s * 0.56, s * 0.17], fill=_jitter(rng, (20, 90, 210)))
    d.rectangle([s * 0.36, s * 0.5, s * 0.64, s * 0.62], fill=_jitter(rng, (240, 240, 240)))


def _cardboard(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    brown = _jitter(rng, (175, 125, 75))
    d.rectangle([s * 0.18, s * 0.25, s * 0.82, s * 0.75], fill=brown)
    dark = tuple(int(c * 0.7) for c in brown)
    d.line([s * 0.18, s * 0.5, s * 0.82, s * 0.5], fill=dark, width=max(2, s // 30))
    d.line([s * 0.5, s * 0.25, s * 0.5, s * 0.5], fill=dark, width=max(2, s // 30))


def _battery(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    d.rectangle([s * 0.2, s * 0.4, s * 0.74, s * 0.6], fill=_jitter(rng, (25, 25, 28), 8))
    d.rectangle([s * 0.56, s * 0.4, s * 0.74, s * 0.6], fill=_jitter(rng, (215, 125, 35)))
    d.rectangle([s * 0.74, s * 0.46, s * 0.8, s * 0.54], fill=(170, 170, 175))


def _mask(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    blue = _jitter(rng, (175, 215, 240), 10)
    d.rounded_rectangle([s * 0.2, s * 0.33, s * 0.8, s * 0.67], radius=s // 10, fill=blue)
    for y in (0.43, 0.5, 0.57):
        d.line([s * 0.22, s * y, s * 0.78, s * y], fill=(140, 180, 210), width=max(1, s // 50))
    d.arc([s * 0.04, s * 0.33, s * 0.3, s * 0.67], 90, 270, fill=(235, 235, 235), width=2)
    d.arc([s * 0.7, s * 0.33, s * 0.96, s * 0.67], 270, 90, fill=(235, 235, 235), width=2)


def _cup(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> None:
    white = _jitter(rng, (245, 243, 235), 8)
    d.polygon([(s * 0.28, s * 0.2), (s * 0.72, s * 0.2), (s * 0.63, s * 0.85),
               (s * 0.37, s * 0.85)], fill=white)
    d.ellipse([s * 0.27, s * 0.16, s * 0.73, s * 0.25], fill=(215, 212, 205))


KINDS: tuple[ItemKind, ...] = (
    ItemKind("厨余垃圾_香蕉皮", "banana peel", "kitchen", _banana),
    ItemKind("厨余垃圾_苹果", "apple", "kitchen", _apple),
    ItemKind("可回收物_易拉罐", "drink can", "recyclable", _can),
    ItemKind("可回收物_塑料瓶", "plastic bottle", "recyclable", _bottle),
    ItemKind("可回收物_纸板", "cardboard", "recyclable", _cardboard),
    ItemKind("有害垃圾_电池", "battery", "hazardous", _battery),
    ItemKind("其他垃圾_口罩", "face mask", "other", _mask),
    ItemKind("其他垃圾_一次性杯子", "disposable cup", "other", _cup),
)


def render(kind: ItemKind, rng: np.random.Generator, size: int = FRAME) -> np.ndarray:
    """One photo of `kind`: uint8 [size, size, 3], RGB, on the dark floor of the chute."""
    base = rng.integers(55, 105)
    tint = rng.integers(-8, 9, 3)
    ramp = np.linspace(-12, 12, size)[None, :, None] * rng.choice([-1, 1])
    floor = base + tint + ramp + rng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(np.clip(floor, 0, 255).astype(np.uint8))
    item_size = int(size * rng.uniform(0.6, 0.95))
    layer = Image.new("RGBA", (item_size, item_size), (0, 0, 0, 0))
    kind.draw(ImageDraw.Draw(layer), rng, item_size)
    layer = layer.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    # Soft shadow so the item sits on the floor rather than floating over it.
    shadow = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    shadow.putalpha(layer.getchannel("A").point(lambda a: a // 3))
    shadow = shadow.filter(ImageFilter.GaussianBlur(2))
    span = size - item_size
    x, y = int(rng.integers(0, span + 1)), int(rng.integers(0, span + 1))
    image.paste(shadow, (x + 3, y + 3), shadow)
    image.paste(layer, (x, y), layer)
    gain = rng.uniform(0.8, 1.15)  # exposure varies with the light in the chute
    out = np.asarray(image).astype(np.float32) * gain + rng.normal(0, 3, (size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def sample(rng: np.random.Generator, n: int, size: int = FRAME) -> tuple[list[np.ndarray],
                                                                        list[int]]:
    """n photos with kinds drawn uniformly; returns (images, kind indices)."""
    kinds = rng.integers(0, len(KINDS), n)
    return [render(KINDS[k], rng, size) for k in kinds], [int(k) for k in kinds]



# How much one item's size strays from its label's typical volume, either way.
VOLUME_SPREAD = 0.3


def item_volume(true_class: str, true_bin: str, label_volumes: dict[str, float],
                bin_volumes: dict[str, float], rng: np.random.Generator) -> float:
    """The litres an item takes in a compartment: its label's typical volume (the bundle's
    `volume_l`), else the typical item of its true bin (`fill.item_volume_l`), times a
    factor from 1 - VOLUME_SPREAD to 1 + VOLUME_SPREAD."""
    typical = label_volumes.get(true_class) or float(bin_volumes[true_bin])
    return typical * float(rng.uniform(1 - VOLUME_SPREAD, 1 + VOLUME_SPREAD))
