"""`smartbin teach --capture LABEL --bin BIN --shots N`: photos of one item on the flap.

The shots are what the classifier would get (the configured camera, its crop), spaced
`interval` seconds apart so that the light and the item's settling vary, and are kept in
the site's captured photos (`bin_controller.captures`), which every later teach from the
site uses.

The service owns the camera while it runs: send it MQTT `cmd/capture` instead (pause, lay
the item on the flap, capture, take the item off, resume), or stop it for the capture. On
the simulator (`--simulate` or `camera.type = "simulated"`) `--item KIND` lays a simulated
item on the flap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bin_controller.captures import capture_label, photos_in, save_shot, shot_stamp
from bin_controller.config import Config
from bin_controller.errors import CommandError, DatasetError, HardwareError
from bin_controller.vision.bundle import load_bundle

MAX_SHOTS = 100


@dataclass
class Captured:
    folder: Path
    files: list[Path]
    label: str
    bin: str
    new_label: bool
    total: int  # photos of this label in the captures folder now


def capture(cfg: Config, label: str, bin_name: str | None, *, shots: int,
            interval_s: float, item: str | None = None, seed: int = 0) -> Captured:
    from bin_controller.tools.camera_cmd import opened_camera

    if not 1 <= shots <= MAX_SHOTS:
        raise DatasetError(f"--shots {shots}: from 1 to {MAX_SHOTS}")
    labels = load_bundle(cfg.model.bundle, models_dir=cfg.model.dir).labels
    try:
        where = capture_label(cfg.bin.state_dir, labels, label, bin_name, bin_field="--bin")
    except CommandError as exc:
        raise DatasetError(f"--capture: {exc}") from exc
    simulated = cfg.camera.type == "simulated"
    if simulated and item is None:
        item = label  # a simulator kind of that name, if there is one
    if item is not None and not simulated:
        raise DatasetError("--item lays a simulated item on the flap: only with --simulate "
                           "or camera.type = 'simulated'")
    stamp = shot_stamp()
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
                    files.append(save_shot(where.folder, camera.capture(), i + 1, stamp))
            finally:
                if placed is not None:
                    placed.remove()
    except HardwareError as exc:
        raise HardwareError(f"{exc}; if the smartbin service is running it holds the camera: "
                            "send it MQTT cmd/capture instead, or stop it for the capture "
                            "(sudo systemctl stop smartbin)") from exc
    return Captured(where.folder, files, where.label, where.bin, where.new,
                    photos_in(where.folder))
