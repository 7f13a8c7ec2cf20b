"""Configuration errors name the key path, the bad value and what is allowed."""

from __future__ import annotations

import re
import socket

import pytest

from bin_controller.config import ConfigError, config_from_dict, load_config, reference
from tests.test_cli import smartbin


def test_defaults_need_no_file():
    cfg = load_config(None)
    assert cfg.bin.id == socket.gethostname().split(".")[0]
    assert cfg.model.bundle == "demo" and cfg.sensor.type == "beam"
    assert set(cfg.flap.angles) == {"recyclable", "kitchen", "hazardous", "other"}


@pytest.mark.parametrize("data, message", [
    ({"sensr": {}}, "unknown key sensr in the top level; allowed: bin, model"),
    ({"sensor": {"typo": 1}}, "unknown key sensor.typo in [sensor]; allowed: type, pin"),
    ({"sensor": {"type": "laser"}}, "sensor.type = 'laser': must be one of beam, ultrasonic, pir"),
    ({"sensor": {"pin": "17"}}, "sensor.pin = '17': must be an integer"),
    ({"sensor": {"pin": True}}, "sensor.pin = True: must be an integer"),
    ({"sensor": {"settle_s": -1}}, "sensor.settle_s = -1.0: must be between 0.0 and 5.0"),
    ({"model": {"confidence_threshold": 2}}, "model.confidence_threshold = 2.0: must be between"),
    ({"model": {"fallback_bin": "compost"}}, "model.fallback_bin = 'compost': must be one of"),
    ({"flap": {"angles": {"other": 60}}}, "flap.angles: no angle for recyclable, kitchen"),
    ({"flap": {"angles": {"glass": 1}}}, "flap.angles.glass: unknown bin"),
    ({"flap": {"angles": {"recyclable": "left"}}}, "flap.angles.recyclable = 'left': must be a"),
    ({"flap": {"min_pulse_s": 0.002, "max_pulse_s": 0.001}}, "min_pulse_s must be smaller"),
    ({"flap": {"pin": 17}}, "flap.pin = 17: GPIO 17 is already used by sensor.pin"),
    ({"flap": "fast"}, "flap must be a table"),
    ({"gate": {"enabled": "yes"}}, "gate.enabled = 'yes': must be true or false"),
])
def test_bad_values(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(data)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[sensor\ntype = 1")
    with pytest.raises(ConfigError, match=r"c\.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.toml")


def test_a_full_file_loads(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("""
[bin]
id = "bin-7"
[sensor]
type = "ultrasonic"
threshold_m = 0.15
[flap]
angles = { recyclable = -70, kitchen = -25, hazardous = 25, other = 70.5 }
[gate]
enabled = true
""")
    cfg = load_config(path)
    assert cfg.bin.id == "bin-7" and cfg.sensor.type == "ultrasonic"
    assert cfg.flap.angles["other"] == 70.5 and cfg.gate.enabled


def test_command_line_reports_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[camera]\nwidth = 10\n")
    r = smartbin("simulate", "--config", str(path), "--fast", "--items", "1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        f"smartbin: error: {path}: camera.width = 10: must be between 64 and 4056"
    assert "Traceback" not in r.stderr


def test_reference_covers_every_option():
    keys = {row[0] for row in reference()}
    assert {"sensor.type", "flap.angles", "model.confidence_threshold", "gate.enabled"} <= keys
    assert all(row[3] for row in reference())
