"""Which hardware a bin is built from, chosen by configuration.

The way gpiozero picks a pin factory: each kind of part has a name in the config
(`hardware.pin_factory`, `camera.type`) that maps to a factory, imported only when it is
used, so a laptop never imports picamera2 and the service never imports the simulator
unless the config asks for it. Other packages add theirs as entry points (group
`smartbin.cameras`: the simulator's `simulated` camera is one) or, at run time, with
`register_camera` / `register_pin_factory`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import TypeVar

from gpiozero import Factory

from bin_controller.config import Config
from bin_controller.errors import ConfigError, HardwareError, SmartbinError
from bin_controller.parts import Camera

PinFactoryMaker = Callable[[], Factory]
CameraMaker = Callable[[Config, Factory], Camera]
F = TypeVar("F")

# name -> "module:callable"; strings so that nothing is imported before it is chosen.
_PIN_FACTORIES: dict[str, str | PinFactoryMaker] = {
    "auto": "bin_controller.hardware.pins:default_factory",
    "mock": "bin_controller.hardware.pins:mock_factory",
    "lgpio": "gpiozero.pins.lgpio:LGPIOFactory",
    "rpigpio": "gpiozero.pins.rpigpio:RPiGPIOFactory",
    "pigpio": "gpiozero.pins.pigpio:PiGPIOFactory",
    "native": "gpiozero.pins.native:NativeFactory",
}
_CAMERAS: dict[str, str | CameraMaker] = {
    "picamera2": "bin_controller.hardware.picamera:open_camera",
}
CAMERA_GROUP = "smartbin.cameras"


def register_pin_factory(name: str, maker: str | PinFactoryMaker) -> None:
    _PIN_FACTORIES[name] = maker


def register_camera(name: str, maker: str | CameraMaker) -> None:
    _CAMERAS[name] = maker


def _resolve(table: Mapping[str, str | F], name: str, key: str) -> F:
    try:
        entry = table[name]
    except KeyError:
        raise ConfigError(f"{key} = {name!r}: no such kind; known: {', '.join(table)}") from None
    if not isinstance(entry, str):
        return entry
    module, _, attr = entry.partition(":")
    try:
        maker: F = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise HardwareError(f"{key} = {name!r} cannot be loaded here ({exc})") from exc
    return maker


def make_pin_factory(name: str) -> Factory:
    """The gpiozero pin factory called `name` (hardware.pin_factory)."""
    maker = _resolve(_PIN_FACTORIES, name, "hardware.pin_factory")
    try:
        with warnings.catch_warnings():
            # gpiozero warns once per pin library it tries; the one error below says it all.
            warnings.simplefilter("ignore")
            return maker()
    except SmartbinError:
        raise
    except Exception as exc:
        raise HardwareError(
            f"hardware.pin_factory = {name!r} is not usable here ({exc}); on a Raspberry Pi "
            "install lgpio (apt install python3-lgpio), elsewhere use 'mock' or the simulator"
        ) from exc


def cameras() -> dict[str, str | CameraMaker]:
    """Every camera kind: built in, from installed plugins, and registered at run time."""
    plugins = {e.name: e.value for e in entry_points(group=CAMERA_GROUP)}
    return {**plugins, **_CAMERAS}


def make_camera(cfg: Config, pin_factory: Factory) -> Camera:
    """The camera called `camera.type`, started; its LED (if any) on `pin_factory`."""
    maker = _resolve(cameras(), cfg.camera.type, "camera.type")
    return maker(cfg, pin_factory)
