"""`smartbin camera snapshot|preview`: aim, focus and check the bin's camera.

Both build the camera the way the service does (the hardware registry, from the config), so
they show what the classifier gets: the LED lit, a fresh frame, the region of interest
(`camera.crop`, drawn in green) and inside it the part the model looks at after its own
centre crop (yellow). They work on the simulator too (`--simulate`, or
`camera.type = "simulated"`). The service holds the camera while it runs: stop it first.

`frame_report` is the camera line of `smartbin check`: one frame's brightness, sharpness and
whether the empty flap looks empty (against the reference photo that
`smartbin camera snapshot --reference` keeps in the state folder, else by uniformity).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw

from bin_controller.config import Config, load_config, merge
from bin_controller.errors import HardwareError, ImageError, SmartbinError
from bin_controller.hardware import frame_quality as fq
from bin_controller.hardware.frame_quality import Box
from bin_controller.overrides import cli_overrides
from bin_controller.parts import Camera

REFERENCE_NAME = "camera-reference.png"  # in bin.state_dir: the empty flap, as the model sees it
PREVIEW_NAME = "camera-preview.jpg"  # in bin.state_dir, unless --out says otherwise
CROP_COLOUR = (40, 230, 60)
MODEL_COLOUR = (250, 210, 0)
SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
SIMULATE = {"camera": {"type": "simulated"}, "hardware": {"pin_factory": "mock"}}


@runtime_checkable
class WholeFrameCamera(Protocol):
    """A camera that crops its frames (picamera2): it can also hand out the whole frame."""

    crop_box: Box | None

    def capture_full(self) -> np.ndarray: ...


# --------------------------------------------------------------------------- building blocks


@contextlib.contextmanager
def opened_camera(cfg: Config) -> Iterator[Camera]:
    """The configured camera on its own pin factory, closed (LED off) afterwards."""
    from bin_controller.hardware.registry import make_camera, make_pin_factory

    factory = make_pin_factory(cfg.hardware.pin_factory)
    try:
        camera = make_camera(cfg, factory)
        try:
            yield camera
        finally:
            camera.close()
    finally:
        factory.close()


def whole_frame(camera: Camera) -> tuple[np.ndarray, Box | None]:
    """A fresh frame and the region of it the classifier gets (None: all of it)."""
    if isinstance(camera, WholeFrameCamera):
        return camera.capture_full(), camera.crop_box
    return camera.capture(), None


def model_box(cfg: Config, region: Box) -> Box | None:
    """The part of `region` the model looks at after its own centre crop; None when the
    bundle squashes the whole region, or cannot be read (the snapshot still works)."""
    from bin_controller.vision.bundle import load_bundle

    try:
        spec = load_bundle(cfg.model.bundle, models_dir=cfg.model.dir).input
    except SmartbinError:
        return None
    if spec.crop == "none":
        return None
    x, y, w, h = region
    side = round(min(w, h) * spec.crop_fraction)
    return x + (w - side) // 2, y + (h - side) // 2, side, side


def annotate(frame: np.ndarray, crop: Box | None, model: Box | None) -> Image.Image:
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    width = max(1, min(image.size) // 160)
    for box, colour in ((crop, CROP_COLOUR), (model, MODEL_COLOUR)):
        if box is not None:
            x, y, w, h = box
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=width)
    return image


def save_image(image: Image.Image, path: Path) -> None:
    """Write atomically (a dashboard reading the preview never sees half a file)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ImageError(f"{path}: unknown image type; name it .jpg or .png")
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from the dashboard's server
        with os.fdopen(fd, "wb") as f:
            image.save(f, kind, **({"quality": 90} if kind == "JPEG" else {}))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise ImageError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def reference_path(cfg: Config) -> Path:
    return Path(cfg.bin.state_dir) / REFERENCE_NAME


def load_reference(cfg: Config) -> np.ndarray | None:
    path = reference_path(cfg)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise ImageError(f"{path}: not a readable reference photo ({exc}); take a new one "
                         "with 'smartbin camera snapshot FILE --reference'") from exc


def numbers(frame: np.ndarray) -> str:
    return f"brightness {fq.brightness(frame):.0f}/255, sharpness {fq.sharpness(frame):.1f}"


# --------------------------------------------------------------------------- smartbin check


def frame_report(camera: Camera, reference: np.ndarray | None = None) -> str:
    """One frame of what the classifier gets, judged: its brightness (mean luma), sharpness
    (variance of the Laplacian) and whether the flap in it looks empty. HardwareError when
    the frame is too dark, too bright or shows something on the flap, with the fix."""
    frame = camera.capture()
    if reference is not None and reference.shape != frame.shape:
        raise HardwareError(f"the reference photo is {reference.shape[1]}x"
                            f"{reference.shape[0]} but frames are {frame.shape[1]}x"
                            f"{frame.shape[0]} (camera.crop changed?); take a new one with "
                            "'smartbin camera snapshot FILE --reference'")
    level = fq.brightness(frame)
    empty = fq.emptiness(frame, reference)
    line = f"{numbers(frame)}, {empty.describe()}"
    if level < fq.DARK_BELOW:
        raise HardwareError(f"too dark ({line}): light the flap (camera.led_pin) or open "
                            "the lens aperture")
    if level > fq.BRIGHT_ABOVE:
        raise HardwareError(f"too bright ({line}): shade the flap from daylight or dim the LED")
    if not empty.empty:
        hint = ("clear the flap, then take a new reference with 'smartbin camera snapshot "
                "FILE --reference'" if reference is not None else
                "clear the flap; if it is empty but patterned, take a reference photo of it "
                "with 'smartbin camera snapshot FILE --reference'")
        raise HardwareError(f"{line}: {hint}")
    return line


def camera_report(cfg: Config) -> str:
    """`frame_report` for the configured camera, opened and closed here."""
    reference = load_reference(cfg)
    with opened_camera(cfg) as camera:
        return frame_report(camera, reference)


# --------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace) -> Config:
    overrides = cli_overrides(args)
    if getattr(args, "simulate", False):
        overrides = merge(SIMULATE, overrides)
    return load_config(args.config, overrides)


def _picture(cfg: Config, camera: Camera) -> tuple[Image.Image, np.ndarray, str]:
    """The annotated whole frame, the region the classifier gets, and what is drawn."""
    frame, crop = whole_frame(camera)
    region = crop or (0, 0, frame.shape[1], frame.shape[0])
    model = model_box(cfg, region)
    legend = [text for box, text in ((crop, "green: camera.crop"),
                                     (model, f"yellow: what model {cfg.model.bundle!r} sees"))
              if box is not None]
    return annotate(frame, crop, model), fq.apply_crop(frame, crop), "; ".join(legend)


def snapshot(args: argparse.Namespace) -> int:
    cfg = _config(args)
    out = Path(args.file)
    if out.suffix.lower() not in SUFFIXES:
        raise ImageError(f"{out}: unknown image type; name it .jpg or .png")
    with opened_camera(cfg) as camera:
        image, seen, legend = _picture(cfg, camera)
    save_image(image, out)
    print(f"{out}: {image.width}x{image.height} frame, {numbers(seen)}"
          + (f"; {legend}" if legend else ""))
    if args.reference:
        save_image(Image.fromarray(seen), reference_path(cfg))
        print(f"{reference_path(cfg)}: reference photo of the empty flap for 'smartbin check'")
    return 0


def preview(args: argparse.Namespace) -> int:
    cfg = _config(args)
    out = Path(args.out) if args.out else Path(cfg.bin.state_dir) / PREVIEW_NAME
    if out.suffix.lower() not in SUFFIXES:
        raise ImageError(f"--out {out}: unknown image type; name it .jpg or .png")
    if args.interval <= 0:
        raise SmartbinError(f"--interval {args.interval:g}: must be more than 0 seconds")
    if args.seconds < 0:
        raise SmartbinError(f"--seconds {args.seconds:g}: must be 0 (until Ctrl-C) or more")
    end = time.monotonic() + args.seconds if args.seconds > 0 else None
    print(f"writing {out} every {args.interval:g} s"
          + (f" for {args.seconds:g} s" if end else "; Ctrl-C stops"), flush=True)
    with opened_camera(cfg) as camera, contextlib.suppress(KeyboardInterrupt):
        while True:
            started = time.monotonic()
            image, seen, _legend = _picture(cfg, camera)
            save_image(image, out)
            # Turn the lens until sharpness peaks; brightness tells the light.
            print(f"{time.strftime('%H:%M:%S')} {numbers(seen)}", flush=True)
            next_at = started + args.interval
            if end is not None and next_at >= end:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
    return 0


def run(args: argparse.Namespace) -> int:
    commands: dict[str, Any] = {"snapshot": snapshot, "preview": preview}
    code: int = commands[args.camera_command](args)
    return code
