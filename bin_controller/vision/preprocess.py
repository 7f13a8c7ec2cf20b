"""Images in, model-sized RGB pixels out. Training and the bin share this code path."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from PIL.ImageFile import ImageFile

from bin_controller.errors import ImageError
from bin_controller.vision.bundle import InputSpec

# Most pixels an image file may decode to (after any JPEG draft reduction): 50 MP is a
# 8660 x 5773 photo, about 150 MB as RGB. Checked from the header before decoding, so a
# small file declaring a huge canvas (a 492 KB PNG of 13,000 x 13,000) costs nothing.
MAX_IMAGE_PIXELS = 50_000_000
# What transparent pixels are shown on: white, like a photo on a light background.
BACKGROUND = (255, 255, 255)


def _crop_box(width: int, height: int, spec: InputSpec) -> tuple[int, int, int, int]:
    if spec.crop == "none":
        return 0, 0, width, height
    side = min(width, height) * spec.crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey to 8 bits by scaling (Pillow's convert clips instead,
    which turns a 16-bit photo all white)."""
    a = np.asarray(image)
    if image.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # Float images are 0..1 by convention; larger values are taken as 0..255 already.
        eight = a * 255 if a.size and a.max() <= 1.0 else a
        out = np.clip(np.round(eight), 0, 255)
    else:  # "I;16*" and "I": files that give "I" (16-bit PGM, PNG) hold 16-bit values
        wide = np.clip(a.astype(np.int64), 0, 65535)
        out = (wide * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is flattened onto BACKGROUND."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _wide_to_l(image).convert("RGB")
    if mode == "La":  # premultiplied grey + alpha: Pillow converts it only via LA
        image, mode = image.convert("LA"), "LA"
    if "A" in mode or "a" in mode or image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def prepare_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Centre-crop and resize a PIL image to the model's input: uint8 [H, W, 3] RGB."""
    if image.mode != "RGB":
        try:
            image = to_rgb(image)
        except ValueError as exc:
            raise ImageError(f"cannot convert an image in mode {image.mode} to RGB: "
                             f"{exc}") from exc
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


def _check_file(path: str | Path) -> None:
    if "\0" in os.fspath(path):
        raise ImageError(f"{os.fspath(path)!r}: a file path cannot contain a NUL character")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        # A FIFO or device would block the read forever; a folder is a plain mistake.
        raise ImageError(f"{path}: not a regular file")


def _open(path: str | Path, spec: InputSpec | None) -> Image.Image:
    """Open and decode, the pixel count checked before any pixel is decoded."""
    with warnings.catch_warnings():
        # Pillow warns above its own, higher limit; ours below is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image: Image.Image = Image.open(path)
    try:
        header = image.size
        if spec is not None and image.format == "JPEG" and isinstance(image, ImageFile):
            # Let the JPEG decoder downscale by 2/4/8 when the crop stays above model size.
            left, top, right, bottom = _crop_box(image.width, image.height, spec)
            scale = min((right - left) / spec.width, (bottom - top) / spec.height)
            if scale >= 2:
                image.draft("RGB", (int(image.width / scale), int(image.height / scale)))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageError(
                f"{path}: {header[0]} x {header[1]} = {header[0] * header[1]:,} pixels, more "
                f"than the {MAX_IMAGE_PIXELS:,} smartbin decodes; scale the image down"
            )
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except BaseException:
        image.close()
        raise


def load_image(path: str | Path, spec: InputSpec | None = None) -> Image.Image:
    """Open an image file upright (EXIF orientation applied) as RGB, ready for prepare_image.

    Every failure is an ImageError naming the file: a batch (`smartbin classify`) reports
    the image and goes on with the next one.
    """
    _check_file(path)
    try:
        return _open(path, spec)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: too many pixels to decode ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    # Pillow's decoders meet damaged files with many exception types (OSError, SyntaxError,
    # ValueError, struct.error, IndexError, EOFError, ...); to the user each one means the
    # same thing, and none of them may stop a batch.
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"{path}: not a readable image ({reason})") from exc
