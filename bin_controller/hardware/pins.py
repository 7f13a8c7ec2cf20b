"""gpiozero pin factories the registry names: every device talks only to its factory, so
real pins and mock pins swap by configuration."""

from __future__ import annotations

from gpiozero import Device, Factory
from gpiozero.pins.mock import MockFactory, MockPWMPin


def mock_factory() -> Factory:
    # PWM-capable mock pins: the flap and gate are servos.
    return MockFactory(pin_class=MockPWMPin)


def default_factory() -> Factory:
    """What gpiozero picks on this board (lgpio on Raspberry Pi OS Bookworm)."""
    factory: Factory = Device._default_pin_factory()
    return factory
