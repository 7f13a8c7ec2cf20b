"""The object cut from a studio photo's near-white backdrop and put somewhere else.

TrashNet photographs every item on the same white poster board, so a head can score well
on its test split by fitting that backdrop. Two uses of the same cut-and-paste:

- training views (`bg_*` in training.features) paste the object, at another scale and
  position, onto generic backgrounds (colour fields, gradients, stripes, noise);
- a *proxy* for other people's photos (`shifted`): the object on textures a bin or a
  kitchen has (wood, concrete, dark metal, cardboard, coloured plastic), under another
  colour temperature, brightness and contrast, JPEG-recompressed. The two background
  families share no generator, so a head does not pass the proxy by having seen its
  textures in training.

Everything is seeded from the photo's content hash and a name, so a view of a photo is
always the same pixels (the feature cache keys on hash and view name).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# The mask is found on a small copy: the backdrop is smooth, and the flood fill is a loop.
MASK_WIDTH = 160
# A backdrop pixel has the board's hue (chromaticity within CHROMA_MAX / 255, summed over
# channels) and is not much darker than the board (shadows on the board are still board).
CHROMA_MAX = 12.0
LIGHT_MIN = 0.55
# Outside these foreground fractions the cut failed (a white object on the white board) or
# there is no board (the object fills the frame): the whole frame is then the object.
BOARD_LIGHT, BOARD_CHROMA = 100.0, 60.0
MIN_OBJECT = 0.04
MAX_OBJECT = 0.92

SHIFT_FAMILIES = ("wood", "concrete", "dark_metal", "cardboard", "plastic")
TRAIN_FAMILIES = ("colour_field", "gradient", "stripes", "speckle")


def rng_for(key: str, name: str) -> np.random.Generator:
    """A generator fixed by a photo's content hash and a view or shift name."""
    digest = hashlib.sha256(f"{key}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _reconstruct(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Flood fill: the pixels of `allowed` 4-connected to `seed`."""
    filled = seed & allowed
    while True:
        grown = filled.copy()
        grown[1:] |= filled[:-1]
        grown[:-1] |= filled[1:]
        grown[:, 1:] |= filled[:, :-1]
        grown[:, :-1] |= filled[:, 1:]
        grown &= allowed
        if (grown == filled).all():
            return filled
        filled = grown


def _board(a: np.ndarray) -> np.ndarray:
    """The backdrop's colour at every pixel: a quadratic in x and y per channel, fitted to
    the border (the board is lit unevenly, and rarely pure white)."""
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = xx / w - 0.5, yy / h - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], -1)
    ring = np.zeros((h, w), bool)
    ring[:3], ring[-3:], ring[:, :3], ring[:, -3:] = True, True, True, True
    rows, target = basis[ring], a[ring]
    # Two passes: objects touching the border must not drag the fit, so the border pixels
    # furthest from the first fit are dropped before the second.
    coef = np.linalg.lstsq(rows, target, rcond=None)[0]
    err = np.abs(rows @ coef - target).sum(1)
    keep = err <= np.percentile(err, 60)
    coef = np.linalg.lstsq(rows[keep], target[keep], rcond=None)[0]
    return np.asarray(basis @ coef, dtype=np.float32)


def object_alpha(image: Image.Image) -> tuple[np.ndarray, bool]:
    """Soft alpha in 0..1 at the image's size (1 on the object), and whether the cut worked.

    The backdrop is what has the board's colour (shading allowed) and is connected to the
    border; when no backdrop is found, or nearly all of it is, the whole frame is the object.
    """
    w, h = image.size
    small = image.convert("RGB").resize((MASK_WIDTH, max(1, round(MASK_WIDTH * h / w))),
                                        Image.Resampling.BILINEAR)
    a = np.asarray(small.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    board = _board(a)
    tone = np.median(board.reshape(-1, 3), 0)
    if tone.mean() < BOARD_LIGHT or tone.max() - tone.min() > BOARD_CHROMA:
        # The border is not a light, greyish board: the object fills the frame.
        return np.ones((h, w), np.float32), False
    # Shadows on the board darken it without changing its hue: compare chromaticity, and
    # allow brightness from LIGHT_MIN to a little above the board's.
    ratio = a.sum(2) / np.maximum(board.sum(2), 1.0)
    chroma = np.abs(a / np.maximum(a.sum(2, keepdims=True), 1.0)
                    - board / np.maximum(board.sum(2, keepdims=True), 1.0)).sum(2)
    candidate = (chroma < CHROMA_MAX / 255) & (ratio > LIGHT_MIN) & (ratio < 1.3) \
        & (a.max(2) - a.min(2) < 2 * CHROMA_MAX + (board.max(2) - board.min(2)))
    edge = np.zeros_like(candidate)
    edge[0] = edge[-1] = True
    edge[:, 0] = edge[:, -1] = True
    backdrop = _reconstruct(edge, candidate)
    obj = Image.fromarray((~backdrop).astype(np.uint8) * 255)
    # Specks of board texture out, thin gaps in the object closed.
    obj = obj.filter(ImageFilter.MedianFilter(5)).filter(ImageFilter.MaxFilter(5)) \
        .filter(ImageFilter.MinFilter(3))
    fraction = float(np.asarray(obj).mean() / 255)
    if not MIN_OBJECT <= fraction <= MAX_OBJECT:
        return np.ones((h, w), np.float32), False
    soft = obj.resize((w, h), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(2))
    return np.asarray(soft, dtype=np.float32) / 255, True


# --- backgrounds ------------------------------------------------------------------------


def _noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Smooth value noise in 0..1, `cells` random values across the width."""
    cw, ch = max(2, cells), max(2, round(cells * h / w))
    grid = (rng.random((ch, cw)) * 255).astype(np.uint8)
    up = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255


def _octaves(rng: np.random.Generator, w: int, h: int, cells: tuple[int, ...]) -> np.ndarray:
    out = sum(_noise(rng, w, h, c) / (i + 1) for i, c in enumerate(cells))
    out = np.asarray(out, dtype=np.float32)
    return (out - out.min()) / max(float(np.ptp(out)), 1e-6)


def _tint(gray: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return low + gray[..., None] * (high - low)


def background(family: str, rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A w x h RGB background of one family (SHIFT_FAMILIES or TRAIN_FAMILIES)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    jitter = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    match family:
        case "wood":
            warp = _octaves(rng, w, h, (4, 9)) * rng.uniform(6, 14)
            freq = rng.uniform(0.04, 0.09)
            rings = 0.5 + 0.5 * np.sin((yy + 25 * _noise(rng, w, h, 3)) * freq + warp)
            grain = _octaves(rng, w, h, (60, 120)) * 0.25
            base = np.array([150, 100, 60], np.float32) * jitter
            rgb = _tint(np.clip(0.55 * rings + grain, 0, 1), base * 0.55, base * 1.15)
        case "concrete":
            g = _octaves(rng, w, h, (5, 20, 80, 160))
            level = rng.uniform(110, 170)
            rgb = _tint(g, np.full(3, level - 45, np.float32) * jitter,
                        np.full(3, level + 35, np.float32) * jitter)
            pits = rng.random((h, w)) > 0.985
            rgb[pits] *= 0.6
        case "dark_metal":
            # Brushed: streaks along the rows, a slow sheen across.
            brushed = np.repeat(rng.random((h, 1)), w, 1) * 0.25
            sheen = _noise(rng, w, h, 3) * 0.3
            level = rng.uniform(35, 75)
            rgb = (level * (0.8 + sheen + brushed))[..., None] \
                * np.array([0.95, 1.0, 1.1], np.float32)
        case "cardboard":
            fibre = _octaves(rng, w, h, (8, 40, 150)) * 0.35
            period = rng.uniform(10, 20)
            flutes = 0.08 * np.sin(xx * 2 * np.pi / period)
            base = np.array([185, 145, 100], np.float32) * jitter
            rgb = base * (0.75 + fibre + flutes)[..., None]
        case "plastic":
            hue = rng.integers(0, 6)
            colours = np.array([[200, 40, 40], [40, 120, 200], [40, 160, 70],
                                [230, 200, 40], [240, 120, 30], [120, 60, 170]], np.float32)
            base = colours[hue] * jitter
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            spot = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.3 * w) ** 2))
            rgb = base * (0.75 + 0.2 * _noise(rng, w, h, 3))[..., None] + 70 * spot[..., None]
        case "colour_field":
            g = _octaves(rng, w, h, (int(rng.integers(2, 6)), int(rng.integers(8, 30))))
            rgb = _tint(g, rng.uniform(0, 255, 3).astype(np.float32),
                        rng.uniform(0, 255, 3).astype(np.float32))
        case "gradient":
            angle = rng.uniform(0, np.pi)
            t = (np.cos(angle) * xx + np.sin(angle) * yy)
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            rgb = _tint(t, rng.uniform(0, 255, 3).astype(np.float32),
                        rng.uniform(0, 255, 3).astype(np.float32))
        case "stripes":
            period = rng.uniform(8, 60)
            angle = rng.uniform(0, np.pi)
            t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
            band = (np.floor(t) % 2).astype(np.float32)
            rgb = _tint(band, rng.uniform(0, 255, 3).astype(np.float32),
                        rng.uniform(0, 255, 3).astype(np.float32))
        case "speckle":
            colour = rng.uniform(0, 255, 3).astype(np.float32)
            rgb = colour + rng.normal(0, rng.uniform(5, 40), (h, w, 1)).astype(np.float32)
        case _:
            raise ValueError(f"unknown background family {family!r}")
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


# --- composition and photometric shifts --------------------------------------------------


def paste(image: Image.Image, alpha: np.ndarray, canvas: Image.Image, *, scale: float,
          fx: float, fy: float) -> Image.Image:
    """The object (its alpha's bounding box) at `scale` of its size, its box placed at
    fraction (fx, fy) of the free room on the canvas."""
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        return canvas
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    obj = image.convert("RGB").crop(box)
    mask = Image.fromarray((alpha[box[1]:box[3], box[0]:box[2]] * 255).astype(np.uint8))
    cw, ch = canvas.size
    # Never larger than the canvas, whatever the scale asked for.
    fit = min(scale, cw / obj.width, ch / obj.height)
    size = (max(1, round(obj.width * fit)), max(1, round(obj.height * fit)))
    obj = obj.resize(size, Image.Resampling.BILINEAR)
    mask = mask.resize(size, Image.Resampling.BILINEAR)
    x, y = round((cw - size[0]) * fx), round((ch - size[1]) * fy)
    out = canvas.copy()
    out.paste(obj, (x, y), mask)
    return out


def photometric(image: Image.Image, rng: np.random.Generator, *,
                strength: float = 1.0) -> Image.Image:
    """Colour temperature, saturation, brightness and contrast moved by random amounts."""
    warm = rng.uniform(-0.15, 0.15) * strength
    a = np.asarray(image, dtype=np.float32) * np.array([1 + warm, 1.0, 1 - warm], np.float32)
    image = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    for enhance, spread in ((ImageEnhance.Color, 0.3), (ImageEnhance.Brightness, 0.25),
                            (ImageEnhance.Contrast, 0.25)):
        image = enhance(image).enhance(1 + rng.uniform(-spread, spread) * strength)
    return image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as out:
        return out.convert("RGB")


def replace_background(image: Image.Image, rng: np.random.Generator,
                       families: tuple[str, ...], *, scale: tuple[float, float],
                       alpha: np.ndarray | None = None) -> Image.Image:
    """The object on a background of one of `families`, at a random scale and place.

    When the cut finds no backdrop the photo keeps its frame, zoomed in instead: pasting
    a whole rectangle onto a texture would be a picture of a picture.
    """
    w, h = image.size
    ok = True
    if alpha is None:
        alpha, ok = object_alpha(image)
    family = families[int(rng.integers(len(families)))]
    canvas = background(family, rng, w, h)
    size, fx, fy = float(rng.uniform(*scale)), float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
    if not ok or alpha.min() > 0.5:
        side = 0.7 + 0.3 * size  # 70 to 100 % of the frame
        cw, ch = round(w * side), round(h * side)
        x, y = round((w - cw) * fx), round((h - ch) * fy)
        return image.convert("RGB").crop((x, y, x + cw, y + ch)).resize((w, h))
    return paste(image, alpha, canvas, scale=size, fx=fx, fy=fy)


def shifted(image: Image.Image, key: str, seed: int, *,
            alpha: np.ndarray | None = None) -> Image.Image:
    """The proxy for another site's photo of this object: background, scale, place,
    light and JPEG all changed, fixed by the photo's hash and `seed`. `alpha` is the
    photo's object_alpha when already known (all ones when the cut failed)."""
    rng = rng_for(key, f"shift{seed}")
    out = replace_background(image, rng, SHIFT_FAMILIES, scale=(0.45, 0.95), alpha=alpha)
    out = photometric(out, rng)
    return jpeg(out, int(rng.integers(30, 75)))
