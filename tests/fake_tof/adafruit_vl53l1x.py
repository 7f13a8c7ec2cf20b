"""A stand-in for Adafruit's VL53L1X driver (tests only): `distance` in centimetres, None
when nothing is in range; ranging must be started."""

from __future__ import annotations

from busio import FACTORY_ADDRESS, I2C

DISTANCES_CM: dict[int, float] = {}


class VL53L1X:
    def __init__(self, i2c: I2C, address: int = FACTORY_ADDRESS) -> None:
        if address in i2c.devices:
            raise OSError(f"two devices answer at 0x{address:02x}")
        self.i2c = i2c
        self.address = address
        self.ranging = False
        i2c.devices[address] = self

    def set_address(self, new_address: int) -> None:
        del self.i2c.devices[self.address]
        self.address = new_address
        self.i2c.devices[new_address] = self

    def start_ranging(self) -> None:
        self.ranging = True

    @property
    def distance(self) -> float | None:
        if not self.ranging:
            raise RuntimeError("start_ranging() first")
        return DISTANCES_CM.get(self.address)
