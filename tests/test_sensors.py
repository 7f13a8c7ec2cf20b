"""Presence sensors on gpiozero's mock pins."""

from __future__ import annotations

import time

from gpiozero.pins.mock import MockFactory, MockPWMPin, MockTriggerPin

from bin_controller.config import config_from_dict
from bin_controller.hardware.sensors import make_sensor


class _Trigger(MockTriggerPin, MockPWMPin):
    pass


def _settle(sensor, want: bool, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sensor.present == want:
            return True
        time.sleep(0.02)
    return False


def test_ultrasonic_threshold_and_hysteresis():
    cfg = config_from_dict({"sensor": {"type": "ultrasonic", "threshold_m": 0.2,
                                       "hysteresis_m": 0.12, "max_distance_m": 0.6}})
    factory = MockFactory(pin_class=MockPWMPin)
    echo = factory.pin(cfg.sensor.echo_pin)
    trigger = factory.pin(cfg.sensor.trigger_pin, pin_class=_Trigger, echo_pin=echo,
                          echo_time=2 * 0.40 / 343)
    edges = []
    sensor = make_sensor(cfg.sensor, factory)
    sensor.on_change(lambda present, t: edges.append(present))
    try:
        assert _settle(sensor, False)
        trigger.echo_time = 2 * 0.12 / 343  # an item at 12 cm
        assert _settle(sensor, True)
        # 23 cm: past the threshold, well inside the hysteresis (the mock echo is timed
        # with sleep(), which overshoots by a fraction of a millisecond)
        trigger.echo_time = 2 * 0.23 / 343
        time.sleep(0.8)
        assert sensor.present, "hysteresis should hold the item present"
        trigger.echo_time = 2 * 0.45 / 343  # gone
        assert _settle(sensor, False)
        assert edges == [True, False]
    finally:
        sensor.close()
        factory.close()


def test_beam_levels():
    for level, broken_is_high in (("low", False), ("high", True)):
        cfg = config_from_dict({"sensor": {"type": "beam", "beam_broken_level": level}})
        factory = MockFactory(pin_class=MockPWMPin)
        pin = factory.pin(cfg.sensor.pin)
        sensor = make_sensor(cfg.sensor, factory)
        (pin.drive_high if broken_is_high else pin.drive_low)()
        assert sensor.present
        (pin.drive_low if broken_is_high else pin.drive_high)()
        assert not sensor.present and sensor.wait_for_clear(0)
        sensor.close()
        factory.close()
