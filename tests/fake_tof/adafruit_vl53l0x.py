"""A stand-in for Adafruit's VL53L0X driver (tests only): `range` in millimetres, 8190 or
more when nothing is in range; `set_address` moves it on the bus."""

from __future__ import annotations

from busio import FACTORY_ADDRESS, I2C

# Millimetres each address reads (set by the test); absent: out of range.
RANGES_MM: dict[int, int] = {}


class VL53L0X:
    def __init__(self, i2c: I2C, address: int = FACTORY_ADDRESS) -> None:
        if address in i2c.devices:
            raise OSError(f"two devices answer at 0x{address:02x}")
        self.i2c = i2c
        self.address = address
        i2c.devices[address] = self
        i2c.log.append(("open", address))

    def set_address(self, new_address: int) -> None:
        if new_address in self.i2c.devices:
            raise OSError(f"0x{new_address:02x} is taken")
        del self.i2c.devices[self.address]
        self.address = new_address
        self.i2c.devices[new_address] = self
        self.i2c.log.append(("move", new_address))

    @property
    def range(self) -> int:
        return RANGES_MM.get(self.address, 8190)
