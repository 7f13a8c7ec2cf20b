"""The gpiozero pin factory: every device talks only to it, so hardware and mock swap here."""

from __future__ import annotations

from typing import Any

from bin_controller.errors import SmartbinError


def make_pin_factory(name: str) -> Any:
    """A gpiozero pin factory by name; 'auto' lets gpiozero pick the board's default."""
    try:
        if name == "mock":
            from gpiozero.pins.mock import MockFactory, MockPWMPin

            return MockFactory(pin_class=MockPWMPin)
        if name == "auto":
            import warnings

            from gpiozero import Device

            # gpiozero warns once per library it tries; the one line below says it all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Device._default_pin_factory()
        module, cls = {
            "lgpio": ("gpiozero.pins.lgpio", "LGPIOFactory"),
            "rpigpio": ("gpiozero.pins.rpigpio", "RPiGPIOFactory"),
            "pigpio": ("gpiozero.pins.pigpio", "PiGPIOFactory"),
            "native": ("gpiozero.pins.native", "NativeFactory"),
        }[name]
        return getattr(__import__(module, fromlist=[cls]), cls)()
    except SmartbinError:
        raise
    except Exception as exc:
        raise SmartbinError(
            f"hardware.pin_factory = {name!r} is not usable here ({exc}); on a Raspberry Pi "
            "install lgpio (apt install python3-lgpio), elsewhere use 'mock' or the simulator"
        ) from exc
