"""A stand-in for Blinka's `busio` (tests only): an I2C bus whose devices the fake drivers
find by address. A sensor answers at 0x29 (the factory address) until it is moved."""

from __future__ import annotations

from typing import ClassVar

FACTORY_ADDRESS = 0x29


class I2C:
    instances: ClassVar[list[I2C]] = []

    def __init__(self, scl: str, sda: str) -> None:
        self.pins = (scl, sda)
        self.devices: dict[int, object] = {}
        self.log: list[tuple[str, int]] = []  # ("open", address), ("move", new address)
        I2C.instances.append(self)
