"""An item held on the simulated flap for `smartbin teach --capture --simulate`.

On the bin a person lays the item on the flap and the camera takes several shots while the
light and the item's pose shift a little; here the item is put on the simulated platform
and, between shots, drawn again from the same kind (a new pose, place and exposure), which
is what the spaced shots on a real bin are for.
"""

from __future__ import annotations

import numpy as np

from bin_controller.errors import SmartbinError
from bin_controller.parts import Camera
from hardware_sim import items
from hardware_sim.mechanics import SimCamera, SimItem
from hardware_sim.unknown_kinds import find_kind


class OnTheFlap:
    """The item of kind `name` lies on the simulated camera's flap until `remove`."""

    def __init__(self, camera: Camera, name: str, seed: int) -> None:
        if not isinstance(camera, SimCamera):
            raise SmartbinError("--item places a simulated item: it needs the simulator's "
                                "camera (--simulate or camera.type = 'simulated')")
        self.kind = find_kind(name)
        self.sim = camera.sim
        self.rng = np.random.default_rng(seed)
        self.item = SimItem(1, self.kind.name, self.kind.bin, self._render(),
                            label_en=self.kind.name_en)
        with self.sim._lock:
            self.sim.platform.append(self.item)

    def _render(self) -> np.ndarray:
        return items.render(self.kind, self.rng)

    def turn(self) -> None:
        """The item shifts a little between shots (and the light with it)."""
        self.item.image = self._render()

    def remove(self) -> None:
        with self.sim._lock:
            if self.item in self.sim.platform:
                self.sim.platform.remove(self.item)
