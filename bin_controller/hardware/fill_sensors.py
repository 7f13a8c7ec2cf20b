"""Fill sensors, one per compartment, looking down at its contents.

Ultrasonic sensors are gpiozero DistanceSensors on the pin factory (mock pins in the
simulator, like every other device). Time-of-flight sensors (VL53L0X, VL53L1X) sit on I2C
and are driven by Adafruit's CircuitPython drivers through Blinka (`pip install
'smartbin[tof]'`), imported only when `fill.sensor` names one: all start at the same
address, so each is held in reset by its XSHUT pin and woken in turn to be given its own.
"""

from __future__ import annotations

import importlib
import time
import warnings
from typing import Any

from gpiozero import DigitalOutputDevice, Factory

from bin_controller.bins import BINS
from bin_controller.config import FillSection
from bin_controller.errors import HardwareError
from bin_controller.fill import FillSensor

# How long a time-of-flight sensor needs after XSHUT goes high before it answers on I2C.
TOF_BOOT_S = 0.01
TOF_MODULES = {"vl53l0x": ("adafruit_vl53l0x", "VL53L0X"),
               "vl53l1x": ("adafruit_vl53l1x", "VL53L1X")}


class UltrasonicFill:
    def __init__(self, device: Any) -> None:
        self.device = device

    def distance_m(self) -> float | None:
        value = self.device.distance
        # gpiozero gives 0 before its first echo; an HC-SR04 sees nothing nearer than 2 cm.
        return None if value is None or value <= 0 else float(value)

    def close(self) -> None:
        self.device.close()


class TofFill:
    """A VL53L0X (range in mm) or VL53L1X (distance in cm, None when out of range)."""

    def __init__(self, sensor: Any, kind: str, xshut: Any) -> None:
        self.sensor = sensor
        self.kind = kind
        self.xshut = xshut

    def distance_m(self) -> float | None:
        if self.kind == "vl53l0x":
            mm = self.sensor.range
            # 8190 (or more) is the driver's "no target in range".
            return None if mm is None or mm <= 0 or mm >= 8190 else mm / 1000.0
        cm = self.sensor.distance
        return None if cm is None else float(cm) / 100.0

    def close(self) -> None:
        self.xshut.close()


def make_fill_sensors(cfg: FillSection, pin_factory: Factory) -> dict[str, FillSensor]:
    """The sensors `fill.sensor` names, one per compartment (none for `none`)."""
    if cfg.sensor == "none":
        return {}
    if cfg.sensor == "ultrasonic":
        return _ultrasonic(cfg, pin_factory)
    return _tof(cfg, pin_factory)


def _ultrasonic(cfg: FillSection, pin_factory: Factory) -> dict[str, FillSensor]:
    from gpiozero import DistanceSensor

    sensors: dict[str, FillSensor] = {}
    try:
        for b in BINS:
            with warnings.catch_warnings():
                # gpiozero suggests pigpio for echo timing; a fill level needs no precision.
                warnings.simplefilter("ignore")
                device = DistanceSensor(echo=int(cfg.echo_pins[b]),
                                        trigger=int(cfg.trigger_pins[b]),
                                        max_distance=cfg.empty_m + 0.5, queue_len=3,
                                        partial=True, pin_factory=pin_factory)
            sensors[b] = UltrasonicFill(device)
    except Exception as exc:
        for sensor in sensors.values():
            sensor.close()
        raise HardwareError(f"fill.sensor = ultrasonic: cannot open the sensor pins ({exc}); "
                            "check fill.trigger_pins and fill.echo_pins") from exc
    return sensors


def _tof(cfg: FillSection, pin_factory: Factory) -> dict[str, FillSensor]:
    module_name, class_name = TOF_MODULES[cfg.sensor]
    try:
        board = importlib.import_module("board")
        busio = importlib.import_module("busio")
        driver = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise HardwareError(f"fill.sensor = {cfg.sensor} needs Adafruit's {module_name} "
                            f"driver and Blinka: pip install 'smartbin[tof]' ({exc})") from exc
    xshut = {b: DigitalOutputDevice(int(cfg.xshut_pins[b]), initial_value=False,
                                    pin_factory=pin_factory) for b in BINS}
    sensors: dict[str, FillSensor] = {}
    try:
        i2c = busio.I2C(board.SCL, board.SDA)
        for b in BINS:
            # Woken one at a time: each answers at the factory address until moved.
            xshut[b].on()
            time.sleep(TOF_BOOT_S)
            sensor = driver(i2c)
            sensor.set_address(int(cfg.i2c_addresses[b]))
            if cfg.sensor == "vl53l1x":
                sensor.start_ranging()
            sensors[b] = TofFill(sensor, cfg.sensor, xshut[b])
    except Exception as exc:
        for device in xshut.values():
            device.close()
        raise HardwareError(f"fill.sensor = {cfg.sensor}: the sensors do not answer on I2C "
                            f"({exc}); check the wiring, fill.xshut_pins and "
                            "fill.i2c_addresses") from exc
    return sensors
