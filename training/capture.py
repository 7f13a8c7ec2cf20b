"""`smartbin teach --capture LABEL --bin BIN --shots N`: photos of one item on the flap.

The shots are what the classifier would get (the configured camera, its crop), spaced
`interval` seconds apart so that the light and the item's settling vary, and are kept as
a class folder of the site's teach data, `<state dir>/captures/<class folder>/`, named
the way `smartbin review export` names a label (`可回收物_glass`). They join the reviewed
photos in every later teach from the site (`--from-review`, MQTT `cmd/teach`), beside
the old-label photos a teach is checked on; they are not items (no seq, no count, no
contamination), so they stay out of the site log.

The service owns the camera while it runs: on the bin, stop it for the capture
(`sudo systemctl stop smartbin`), then start it again. On the simulator (`--simulate` or
`camera.type = "simulated"`) `--item KIND` lays a simulated item on the flap.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from bin_controller.bins import BINS
from bin_controller.config import Config
from bin_controller.errors import DatasetError, HardwareError
from bin_controller.review import class_folder
from bin_controller.teaching import CAPTURES
from bin_controller.vision.bundle import Label, load_bundle

MAX_SHOTS = 100
MAX_LABEL = 100


@dataclass
class Captured:
    folder: Path
    files: list[Path]
    label: str
    bin: str
    new_label: bool
    total: int  # photos of this label in the captures folder now


def resolve_label(cfg: Config, label: str, bin_name: str | None) -> tuple[str, str, bool]:
    """(label, bin, new?): a label of the configured bundle by name or English name, or a
    new one, which needs its bin."""
    if not label or len(label) > MAX_LABEL or not label.isprintable() or any(
            ch in label for ch in "/\\\0") or label.startswith("."):
        raise DatasetError(f"--capture {label!r}: give a label name (at most {MAX_LABEL} "
                           "characters, no '/', not starting with '.')")
    if bin_name is not None and bin_name not in BINS:
        raise DatasetError(f"--bin {bin_name!r}: one of {', '.join(BINS)}")
    known: list[Label] = list(load_bundle(cfg.model.bundle, models_dir=cfg.model.dir).labels)
    for lab in known:
        if label in (lab.name, lab.name_en):
            if bin_name is not None and bin_name != lab.bin:
                raise DatasetError(f"--bin {bin_name}: {lab.name!r} goes in {lab.bin} in the "
                                   "configured bundle; leave --bin out or use a new label "
                                   "name")
            return lab.name, lab.bin, False
    if bin_name is None:
        raise DatasetError(f"--capture {label!r} is not a label of the configured bundle; "
                           f"give its bin with --bin ({', '.join(BINS)})")
    return label, bin_name, True


def capture(cfg: Config, label: str, bin_name: str | None, *, shots: int,
            interval_s: float, item: str | None = None, seed: int = 0) -> Captured:
    from PIL import Image

    from bin_controller.tools.camera_cmd import opened_camera

    if not 1 <= shots <= MAX_SHOTS:
        raise DatasetError(f"--shots {shots}: from 1 to {MAX_SHOTS}")
    name, bin_name, new = resolve_label(cfg, label, bin_name)
    simulated = cfg.camera.type == "simulated"
    if simulated and item is None:
        item = label  # a simulator kind of that name, if there is one
    if item is not None and not simulated:
        raise DatasetError("--item lays a simulated item on the flap: only with --simulate "
                           "or camera.type = 'simulated'")
    folder = Path(cfg.bin.state_dir).expanduser() / CAPTURES / class_folder(name, bin_name)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    files: list[Path] = []
    try:
        with opened_camera(cfg) as camera:
            placed = None
            if item is not None:
                from hardware_sim.capture import OnTheFlap

                placed = OnTheFlap(camera, item, seed)
            try:
                for i in range(shots):
                    if i:
                        time.sleep(interval_s)
                        if placed is not None:
                            placed.turn()
                    frame = camera.capture()
                    path = folder / f"{stamp}-{i + 1:03d}.jpg"
                    tmp = path.with_name(f".{path.name}.tmp")
                    Image.fromarray(frame).convert("RGB").save(tmp, "JPEG", quality=92)
                    os.replace(tmp, path)  # a capture cut short leaves whole photos only
                    files.append(path)
            finally:
                if placed is not None:
                    placed.remove()
    except HardwareError as exc:
        raise HardwareError(f"{exc}; if the smartbin service is running it holds the camera: "
                            "stop it for the capture (sudo systemctl stop smartbin) and start "
                            "it again afterwards") from exc
    total = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return Captured(folder, files, name, bin_name, new, total)
