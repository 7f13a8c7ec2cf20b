"""The simulator's parts, as the hardware registry builds them for `camera.type = "simulated"`.

The simulated camera comes with the simulated world it photographs (`SimBin`, the mechanics
behind gpiozero's mock pins) and, when `simulator.drop_interval_s` is set, a person who drops
a generated item whenever the flap is clear: what `smartbin run --simulate` runs.

With `simulator.images` (a folder of class folders, e.g. TrashNet) the person drops photos
from it instead, their bins from `simulator.images_bin_map` (a bin map name or file) or from
`<bin>_<item>` folder names: how `smartbin demo` runs a bin on real photos.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from gpiozero import Factory
from gpiozero.pins.mock import MockFactory

from bin_controller.config import Config
from bin_controller.errors import ConfigError
from hardware_sim.mechanics import SimBin, SimCamera
from hardware_sim.sources import FolderSource, GeneratedSource

log = logging.getLogger(__name__)


class _Person:
    """Drops an item every `interval_s` while the flap is clear."""

    def __init__(self, sim: SimBin, interval_s: float, limit: int,
                 source: GeneratedSource | FolderSource) -> None:
        self.sim, self.interval_s, self.limit = sim, interval_s, limit
        self.source = source
        self.stopped = threading.Event()
        self.dropped = 0

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            if self.limit and self.dropped >= self.limit:
                return
            if self.sim.platform:
                continue  # wait for the flap to be clear, as a person would
            item = self.source.items(1)[0]
            item.id = self.dropped = self.dropped + 1
            self.sim.drop(item)


class SimulatedCamera(SimCamera):
    """The camera of the simulated bin: owns the world it photographs."""

    def __init__(self, cfg: Config, sim: SimBin) -> None:
        super().__init__(sim)
        self.cfg = cfg.simulator
        self.frame_size = (cfg.camera.width, cfg.camera.height)
        self._person: _Person | None = None
        self._hang_at = cfg.simulator.hang_camera_at
        self._calls = 0

    def start(self) -> None:
        # Opening the sensor device set its pin's pull resistor, which hides an item that
        # already lies on the flap; drive the line again now that every device is open.
        self.sim.sync_sensor()
        if self.cfg.drop_interval_s > 0:
            self._person = _Person(self.sim, self.cfg.drop_interval_s, self.cfg.drop_items,
                                   self._source())
            threading.Thread(target=self._person.run, name="sim-person", daemon=True).start()

    def _source(self) -> GeneratedSource | FolderSource:
        if not self.cfg.images:
            return GeneratedSource(self.cfg.seed)
        bin_map = self.cfg.images_bin_map
        return FolderSource(Path(self.cfg.images), Path(bin_map) if bin_map else None,
                            self.cfg.seed, self.frame_size)

    def capture(self) -> np.ndarray:
        self._calls += 1
        if self._calls == self._hang_at:
            log.warning("simulated camera: capture %d hangs (simulator.hang_camera_at)",
                        self._hang_at)
            threading.Event().wait()
        return super().capture()

    def close(self) -> None:
        if self._person is not None:
            self._person.stopped.set()
        self.sim.close()


def simulated_camera(cfg: Config, pin_factory: Factory) -> SimulatedCamera:
    """The registry's `camera.type = "simulated"`."""
    if not isinstance(pin_factory, MockFactory):
        raise ConfigError("camera.type = 'simulated' needs hardware.pin_factory = 'mock'")
    world = Path(cfg.simulator.world_dir) if cfg.simulator.world_dir else None
    return SimulatedCamera(cfg, SimBin(cfg, world=world, pin_factory=pin_factory))
