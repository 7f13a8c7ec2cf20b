"""Fill sensors on gpiozero's mock pins and, for time of flight, fake Adafruit drivers
(tests/fake_tof), plus the one-line errors for their configuration."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin, MockTriggerPin

from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.errors import ConfigError, HardwareError
from bin_controller.hardware.fill_sensors import make_fill_sensors

FAKE_TOF = Path(__file__).resolve().parent / "fake_tof"
SPEED_OF_SOUND = 343.0


class _Trigger(MockTriggerPin, MockPWMPin):
    """MockFactory wants every pin to share the PWM-ness of its pin class."""


@pytest.fixture
def fake_tof(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_TOF))
    for name in ("board", "busio", "adafruit_vl53l0x", "adafruit_vl53l1x"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    busio = importlib.import_module("busio")
    busio.I2C.instances.clear()
    yield busio
    for name in ("board", "busio", "adafruit_vl53l0x", "adafruit_vl53l1x"):
        sys.modules.pop(name, None)


def fill_config(**fill):
    return config_from_dict({"fill": fill}).fill


def test_ultrasonic_fill_sensors_read_their_compartment(tmp_path):
    cfg = fill_config(sensor="ultrasonic")
    factory = MockFactory(pin_class=MockPWMPin)
    distances = dict(zip(BINS, (0.5, 0.35, 0.2, 0.1), strict=True))
    for b in BINS:
        echo = factory.pin(int(cfg.echo_pins[b]))
        factory.pin(int(cfg.trigger_pins[b]), pin_class=_Trigger, echo_pin=echo,
                    echo_time=2 * distances[b] / SPEED_OF_SOUND)
    sensors = make_fill_sensors(cfg, factory)
    try:
        assert sorted(sensors) == sorted(BINS)
        deadline = time.monotonic() + 5
        readings: dict[str, float | None] = {}
        while time.monotonic() < deadline:
            readings = {b: s.distance_m() for b, s in sensors.items()}
            if all(r is not None and abs(r - distances[b]) < 0.03
                   for b, r in readings.items()):
                break
            time.sleep(0.05)
        for b in BINS:
            assert readings[b] == pytest.approx(distances[b], abs=0.03), b
    finally:
        for s in sensors.values():
            s.close()
        factory.close()


def test_time_of_flight_sensors_get_their_addresses_one_by_one(fake_tof):
    cfg = fill_config(sensor="vl53l0x")
    driver = importlib.import_module("adafruit_vl53l0x")
    factory = MockFactory()
    sensors = make_fill_sensors(cfg, factory)
    try:
        bus = fake_tof.I2C.instances[-1]
        wanted = [int(cfg.i2c_addresses[b]) for b in BINS]
        # Each woke at the factory address and was moved before the next one woke.
        assert bus.log == [entry for a in wanted for entry in (("open", 0x29), ("move", a))]
        assert sorted(bus.devices) == sorted(wanted)
        for b in BINS:
            assert factory.pin(int(cfg.xshut_pins[b])).state is True  # awake
        driver.RANGES_MM.update({wanted[0]: 450, wanted[1]: 8190})
        assert sensors["recyclable"].distance_m() == pytest.approx(0.45)
        assert sensors["kitchen"].distance_m() is None  # nothing in range
    finally:
        for s in sensors.values():
            s.close()
        factory.close()


def test_vl53l1x_reads_centimetres_once_ranging(fake_tof):
    cfg = fill_config(sensor="vl53l1x")
    driver = importlib.import_module("adafruit_vl53l1x")
    factory = MockFactory()
    sensors = make_fill_sensors(cfg, factory)
    try:
        driver.DISTANCES_CM[int(cfg.i2c_addresses["other"])] = 23.0
        assert sensors["other"].distance_m() == pytest.approx(0.23)
        assert sensors["kitchen"].distance_m() is None
    finally:
        for s in sensors.values():
            s.close()
        factory.close()


def test_a_missing_driver_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "adafruit_vl53l0x", None)  # import fails
    monkeypatch.syspath_prepend(str(FAKE_TOF))
    factory = MockFactory()
    try:
        with pytest.raises(HardwareError, match=r"pip install 'smartbin\[tof\]'"):
            make_fill_sensors(fill_config(sensor="vl53l0x"), factory)
    finally:
        factory.close()
        for name in ("board", "busio"):
            sys.modules.pop(name, None)


def test_no_fill_sensor_opens_nothing():
    factory = MockFactory()
    try:
        assert make_fill_sensors(fill_config(), factory) == {}
        assert not factory.pins
    finally:
        factory.close()


@pytest.mark.parametrize("raw, message", [
    ({"fill": {"sensor": "ultrasonic", "trigger_pins": {"recyclable": 5, "kitchen": 5,
                                                         "hazardous": 16, "other": 20}}},
     "fill.trigger_pins.kitchen = 5: GPIO 5 is already used by fill.trigger_pins.recyclable"),
    ({"fill": {"sensor": "ultrasonic", "echo_pins": {"recyclable": 18, "kitchen": 25,
                                                      "hazardous": 26, "other": 27}}},
     "fill.echo_pins.recyclable = 18: GPIO 18 is already used by flap.pin"),
    ({"fill": {"sensor": "ultrasonic", "echo_pins": {"recyclable": 27}}},
     "fill.echo_pins.other = 27: GPIO 27 is already used by fill.echo_pins.recyclable"),
    ({"fill": {"sensor": "vl53l0x", "i2c_addresses": {"recyclable": 0x30, "kitchen": 0x78,
                                                       "hazardous": 0x32, "other": 0x33}}},
     "fill.i2c_addresses.kitchen = 120 (0x78): out of range"),
    ({"fill": {"sensor": "vl53l1x", "i2c_addresses": dict.fromkeys(BINS, 0x30)}},
     "fill.i2c_addresses.kitchen = 0x30: already the address of recyclable"),
    ({"fill": {"sensor": "vl53l0x", "xshut_pins": {"recyclable": 3, "kitchen": 6,
                                                    "hazardous": 16, "other": 20}}},
     "GPIO 3 is the I2C SCL line"),
    ({"fill": {"full_m": 0.7}}, "fill.full_m = 0.7: must be less than fill.empty_m"),
    ({"fill": {"warn_pct": 96}}, "fill.warn_pct = 96: must not be above fill.full_pct"),
    ({"fill": {"capacity_l": {"recyclable": 0, "kitchen": 2, "hazardous": 2, "other": 2}}},
     "fill.capacity_l.recyclable must be a volume above 0"),
    ({"fill": {"when_full": "tip_anyway"}}, "fill.when_full = 'tip_anyway': must be one of"),
])
def test_bad_fill_config_is_one_line(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_table_naming_some_compartments_keeps_the_defaults_of_the_others():
    fill = fill_config(capacity_l={"kitchen": 2}, echo_pins={"other": 21}, sensor="ultrasonic")
    assert fill.capacity_l == {"recyclable": 40, "kitchen": 2, "hazardous": 10, "other": 40}
    assert fill.echo_pins["other"] == 21 and fill.echo_pins["recyclable"] == 22


def _bundle_with_volumes(tmp_path, volumes):
    import json
    import shutil

    from bin_controller.vision.bundle import SHIPPED_MODELS, write_manifest

    folder = tmp_path / "demo-volumes"
    shutil.copytree(SHIPPED_MODELS / "demo", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for label in manifest["labels"]:
        if label["name"] in volumes:
            label["volume_l"] = volumes[label["name"]]
    write_manifest(folder, manifest)
    return folder


def test_a_labels_volume_in_the_bundle_beats_the_bins_default(tmp_path):
    from types import SimpleNamespace

    from bin_controller.assembly import _wire_fill
    from bin_controller.domain import SortEvent
    from bin_controller.fill import FillTracker
    from bin_controller.vision.bundle import load_bundle

    bundle = load_bundle(_bundle_with_volumes(tmp_path, {"可回收物_纸板": 1.5}))
    faults: list[tuple[str, str]] = []
    loop = SimpleNamespace(classifier=SimpleNamespace(bundle=bundle),
                           report_fault=lambda kind, detail: faults.append((kind, detail)))
    cfg = config_from_dict({"fill": {"capacity_l": {"recyclable": 3.0},
                                     "estimate_margin_pct": 0.0}}).fill
    fill = FillTracker(cfg, tmp_path / "state")
    _wire_fill(fill, loop)  # type: ignore[arg-type]

    def item(label):
        return SortEvent(time=0.0, bin="recyclable", label=label, label_en=None,
                         confidence=0.9, uncertain=False, failed=False, forced=False,
                         cycle_ms=0.0, decision_ms=0.0, model="demo", model_version="1")

    fill.added(item("可回收物_纸板"))  # the bundle says 1.5 l
    assert fill.pct("recyclable") == pytest.approx(50.0)
    fill.added(item("可回收物_易拉罐"))  # no volume in the bundle: the bin's 0.5 l
    assert fill.pct("recyclable") == pytest.approx(200 / 3)
    fill.added(item("可回收物_纸板"))
    assert fill.is_full("recyclable")
    assert faults and faults[0][0] == "full"


@pytest.mark.parametrize("volume", [0, -1, True, "big", 5000])
def test_a_bad_label_volume_is_a_bundle_error(tmp_path, volume):
    from bin_controller.errors import BundleError
    from bin_controller.vision.bundle import load_bundle

    with pytest.raises(BundleError, match="volume_l"):
        load_bundle(_bundle_with_volumes(tmp_path, {"可回收物_纸板": volume}))
