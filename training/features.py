"""Pooled features of a frozen backbone: computed once per image and view, then cached."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bin_controller.vision.backends import make_interpreter
from bin_controller.vision.bundle import InputSpec
from bin_controller.vision.classifier import Quant, StageRunner, dequantize, pixel_mapper
from bin_controller.vision.preprocess import load_image, prepare_array, prepare_image
from training import shift

# Views of each photo. "full" (the whole frame) and "center" (square centre crop) are what
# a bin can be configured to see; the rest are the augmentation a practitioner uses on a
# frozen backbone: mirrored, turned over, shifted crops, brighter and darker.
EVAL_VIEWS = ("full", "full_flip", "center", "flip")
TRAIN_VIEWS = ("full", "full_flip", "full_r180", "full_vflip", "center", "flip", "c_r90",
               "c_r270", "fc_tl", "fc_br", "fc_tr", "fc_bl", "full_dark", "full_bright_flip")
# Views that generalise beyond TrashNet's white board (training.shift): the object on
# other backgrounds at another scale and place, colour and light jitter, zoomed crops.
# Each is seeded by the photo's content hash and the view's name, so it is the same pixels
# every time and the cache stays valid.
SHIFT_VIEWS = ("bg_a", "bg_b", "bg_c", "bg_d", "jitter", "zoom")
DEPLOY_CROP = {"full": "none", "center": "center"}


def shift_view(seed: int, *, flip: bool = False) -> str:
    """The view name of the proxy shifted set with this seed (training.shift.shifted)."""
    return f"shift{seed}" + ("_flip" if flip else "")


class StageFeatures:
    """Runs one backbone stage and returns its output per image."""

    def __init__(self, model: bytes, *, size: int, mean: float, std: float,
                 backend: str = "auto", num_threads: int = 2) -> None:
        self.backend, interpreter = make_interpreter(backend, model, num_threads=num_threads)
        self.runner = StageRunner(interpreter)
        self.spec = InputSpec(size, size, mean, std)
        self._to_input = pixel_mapper(self.spec, self.runner.input_quant)

    @property
    def quant(self) -> Quant:
        return self.runner.output_quant

    def raw_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Quantized output for model-sized pixels."""
        return self.runner.run(self._to_input(pixels)).reshape(-1).copy()

    def raw(self, rgb: np.ndarray) -> np.ndarray:
        return self.raw_pixels(prepare_array(rgb, self.spec))

    def one(self, rgb: np.ndarray) -> np.ndarray:
        return dequantize(self.raw(rgb), self.quant)

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.one(img) for img in images])


def _full(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BILINEAR)


def _corner_crop(image: Image.Image, fx: float, fy: float, size: int) -> Image.Image:
    w, h = image.size
    cw, ch = int(w * 0.85), int(h * 0.85)
    x, y = int((w - cw) * fx), int((h - ch) * fy)
    return _full(image.crop((x, y, x + cw, y + ch)), size)


# Training views are composed at this size: the model sees 224 pixels anyway, and a
# background costs the square of its side.
WORK_SIDE = 320
_alpha_memo: dict[tuple[str, tuple[int, int]], np.ndarray] = {}


def _alpha(image: Image.Image, key: str) -> np.ndarray:
    """The object's cut, once per photo and size (its views are computed one after
    another); all ones when the cut failed, which shift.replace_background takes as "keep
    the frame"."""
    memo = (key, image.size)
    if memo not in _alpha_memo:
        if len(_alpha_memo) > 4:
            _alpha_memo.clear()
        _alpha_memo[memo] = shift.object_alpha(image)[0]
    return _alpha_memo[memo]


def _working(image: Image.Image) -> Image.Image:
    scale = WORK_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.BILINEAR)


def _seeded_view(image: Image.Image, view: str, key: str, size: int) -> np.ndarray | None:
    full = InputSpec(size, size, crop="none")
    rng = shift.rng_for(key, view)
    mirror = view.endswith("_flip")
    if view.startswith("shift") and view.removesuffix("_flip")[5:].isdigit():
        out = shift.shifted(image, key, int(view.removesuffix("_flip")[5:]),
                            alpha=_alpha(image, key))
        return prepare_image(ImageOps.mirror(out) if mirror else out, full)
    if view in ("bg_a", "bg_b", "bg_c", "bg_d"):
        image = _working(image)
        out = shift.replace_background(image, rng, shift.TRAIN_FAMILIES, scale=(0.4, 1.0),
                                       alpha=_alpha(image, key))
        out = shift.photometric(out, rng, strength=0.7)
        return prepare_image(ImageOps.mirror(out) if rng.random() < 0.5 else out, full)
    if view == "jitter":
        out = shift.photometric(image, rng)
        return prepare_image(ImageOps.mirror(out) if rng.random() < 0.5 else out, full)
    if view == "zoom":
        w, h = image.size
        side = rng.uniform(0.55, 0.85)
        cw, ch = round(w * side), round(h * side)
        x, y = round((w - cw) * rng.uniform()), round((h - ch) * rng.uniform())
        out = shift.photometric(image.crop((x, y, x + cw, y + ch)), rng, strength=0.5)
        return prepare_image(ImageOps.mirror(out) if rng.random() < 0.5 else out, full)
    return None


def view_pixels(image: Image.Image, view: str, size: int, *, key: str = "") -> np.ndarray:
    """Model-sized pixels of one view of a photo (the base views exactly as the bin sees).

    Random views (SHIFT_VIEWS, shift_view) are seeded by `key`, the photo's content hash.
    """
    seeded = _seeded_view(image, view, key, size)
    if seeded is not None:
        return seeded
    full = InputSpec(size, size, crop="none")
    center = InputSpec(size, size, crop="center")
    mirror = ImageOps.mirror
    match view:
        case "full":
            return prepare_image(image, full)
        case "full_flip":
            return prepare_image(mirror(image), full)
        case "center":
            return prepare_image(image, center)
        case "flip":
            return prepare_image(mirror(image), center)
        case "full_r180":
            return prepare_image(image.rotate(180), full)
        case "full_vflip":
            return prepare_image(ImageOps.flip(image), full)
        case "c_r90" | "c_r270":
            square = Image.fromarray(prepare_image(image, center))
            return np.asarray(square.rotate(90 if view == "c_r90" else 270))
        case "fc_tl":
            return np.asarray(_corner_crop(image, 0, 0, size))
        case "fc_br":
            return np.asarray(_corner_crop(image, 1, 1, size))
        case "fc_tr":
            return np.asarray(_corner_crop(mirror(image), 1, 0, size))
        case "fc_bl":
            return np.asarray(_corner_crop(mirror(image), 0, 1, size))
        case "full_dark":
            return np.asarray(_full(ImageEnhance.Brightness(image).enhance(0.8), size))
        case "full_bright_flip":
            return np.asarray(_full(ImageEnhance.Brightness(mirror(image)).enhance(1.2), size))
    raise ValueError(f"unknown view {view!r}")


class FeatureCache:
    """uint8 features on disk, keyed by image content hash, backbone checksum and view."""

    def __init__(self, folder: Path, backbone_sha: str) -> None:
        self.folder = Path(folder) / backbone_sha[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, dict[str, np.ndarray]] = {}
        self._dirty: set[str] = set()

    def _load(self, view: str) -> dict[str, np.ndarray]:
        if view not in self._data:
            path = self.folder / f"{view}.npz"
            table: dict[str, np.ndarray] = {}
            if path.is_file():
                with np.load(path) as npz:
                    table = dict(zip(npz["keys"].tolist(), npz["features"], strict=True))
            self._data[view] = table
        return self._data[view]

    def get(self, view: str, key: str) -> np.ndarray | None:
        return self._load(view).get(key)

    def put(self, view: str, key: str, value: np.ndarray) -> None:
        self._load(view)[key] = value
        self._dirty.add(view)

    def save(self) -> None:
        for view in self._dirty:
            table = self._data[view]
            tmp = self.folder / f"{view}.tmp.npz"
            np.savez(tmp, keys=np.array(list(table)), features=np.stack(list(table.values())))
            tmp.replace(self.folder / f"{view}.npz")
        self._dirty.clear()


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal or forced)."""

    def __init__(self, total: int, what: str, *, enabled: bool | None = None) -> None:
        self.total, self.what, self.done = total, what, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and (self.done == self.total or self.done % 25 == 0):
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            bar = "#" * int(30 * self.done / max(self.total, 1))
            print(f"\r{self.what} [{bar:30}] {self.done}/{self.total} {rate:.0f}/s",
                  end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)


def extract(samples, views: tuple[str, ...], extractor: StageFeatures, cache: FeatureCache,
            *, progress: bool | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Real-valued features [n, width] per view, computing only what the cache lacks."""
    todo = [(s, v) for s in samples for v in views if cache.get(v, s.sha256) is None]
    bar = Progress(len(todo), "features", enabled=progress)
    started = time.perf_counter()
    opened: dict[str, Image.Image] = {}
    for sample, view in todo:
        image = opened.get(sample.sha256)
        if image is None:
            opened.clear()  # one photo at a time: its views are consecutive
            image = opened[sample.sha256] = load_image(sample.path).convert("RGB")
        pixels = view_pixels(image, view, extractor.spec.width, key=sample.sha256)
        cache.put(view, sample.sha256, extractor.raw_pixels(pixels))
        bar.step()
        if bar.done % 500 == 0:
            cache.save()
    cache.save()
    seconds = time.perf_counter() - started
    stats = {"computed": len(todo), "seconds": seconds,
             "images_per_s": len(todo) / seconds if todo and seconds > 0 else float("nan")}
    out = {v: dequantize(np.stack([cache.get(v, s.sha256) for s in samples]), extractor.quant)
           for v in views}
    return out, stats
