"""Images in, model-sized RGB pixels out. Training and the bin share this code path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.ImageFile import ImageFile

from bin_controller.errors import ImageError
from bin_controller.vision.bundle import InputSpec


def _crop_box(width: int, height: int, spec: InputSpec) -> tuple[int, int, int, int]:
    if spec.crop == "none":
        return 0, 0, width, height
    side = min(width, height) * spec.crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


def prepare_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Centre-crop and resize a PIL image to the model's input: uint8 [H, W, 3] RGB."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = _crop_box(image.width, image.height, spec)
    size = (spec.width, spec.height)
    if box == (0, 0, image.width, image.height) and image.size == size:
        return np.asarray(image)
    # Crop first: a resize with a box would let the filter read pixels outside the crop.
    if box != (0, 0, image.width, image.height):
        image = image.crop(box)
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def prepare_array(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Same as prepare_image for a camera frame (uint8 [H, W, 3], RGB order)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"camera frame must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if (w, h) == (spec.width, spec.height) and _crop_box(w, h, spec) == (0, 0, w, h):
        return rgb
    return prepare_image(Image.fromarray(rgb), spec)


def load_image(path: str | Path, spec: InputSpec | None = None) -> Image.Image:
    """Open an image file upright (EXIF orientation applied), ready for prepare_image."""
    try:
        image: Image.Image = Image.open(path)
        if spec is not None and image.format == "JPEG" and isinstance(image, ImageFile):
            # Let the JPEG decoder downscale by 2/4/8 when the crop stays above model size.
            left, top, right, bottom = _crop_box(image.width, image.height, spec)
            scale = min((right - left) / spec.width, (bottom - top) / spec.height)
            if scale >= 2:
                image.draft("RGB", (int(image.width / scale), int(image.height / scale)))
        image = ImageOps.exif_transpose(image)
        image.load()
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from exc
    return image
