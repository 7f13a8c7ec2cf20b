"""Configuration errors name the key path, the bad value and what is allowed."""

from __future__ import annotations

import math
import re
import socket

import pytest

from bin_controller.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    config_from_dict,
    load_config,
    reference,
)
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
    ({"flap": {"min_pulse_s": 0.002, "max_pulse_s": 0.001}},
     "flap.min_pulse_s = 0.002: must be smaller than flap.max_pulse_s (0.001)"),
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


# ------------------------------------------------------------------ hardening (issue 12)

NUMBER_KEYS = [key for key, kind, _, _ in reference() if kind == "a number"]
INTEGER_KEYS = [key for key, kind, _, _ in reference() if kind == "an integer"]


def _table(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_for_every_number(key, value):
    # NaN compares false with both bounds, so a plain range check let it through.
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = {value!r}: must be a finite "
                                          r"number between \S+ and \S+$"):
        config_from_dict(_table(key, value))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_flap_angle_is_refused(value):
    angles = {"recyclable": -60, "kitchen": -20, "hazardous": 20, "other": value}
    with pytest.raises(ConfigError, match=rf"^flap\.angles\.other = {value!r}: must be a "
                                          "finite number$"):
        config_from_dict({"flap": {"angles": angles}})


@pytest.mark.parametrize("key", INTEGER_KEYS)
@pytest.mark.parametrize("value", [2**63, -(2**64), 10**5000], ids=["2e63", "-2e64", "1e5000"])
def test_absurd_integers_are_a_config_error(key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = .*: must be between"):
        config_from_dict(_table(key, value))


@pytest.mark.parametrize("value", [2**63, 10**400, 10**5000], ids=["2e63", "1e400", "1e5000"])
def test_integers_too_big_for_a_float_are_a_config_error(value):
    # float(10**400) raises OverflowError; 10**5000 cannot even be printed by repr.
    with pytest.raises(ConfigError, match=r"^sensor\.jam_s = .*: must be between 0\.1 and "
                                          r"120\.0$"):
        config_from_dict({"sensor": {"jam_s": value}})


@pytest.mark.parametrize("data, message", [
    ({"flap": {"rest_angle": 80, "max_angle": 70}},
     "flap.rest_angle = 80.0: outside min_angle..max_angle (-90.0..70.0)"),
    ({"flap": {"rest_angle": -80, "min_angle": -70}},
     "flap.rest_angle = -80.0: outside min_angle..max_angle (-70.0..90.0)"),
    ({"flap": {"min_angle": 0, "max_angle": 0, "angles": dict.fromkeys(
        ("recyclable", "kitchen", "hazardous", "other"), 0)}},
     "flap.min_angle = 0.0: must be smaller than flap.max_angle (0.0)"),
    ({"gate": {"open_angle": 91}}, "gate.open_angle = 91.0: must be between -90 and 90"),
    ({"gate": {"closed_angle": -90.5}}, "gate.closed_angle = -90.5: must be between -90 and 90"),
    ({"gate": {"enabled": True, "open_angle": 0, "closed_angle": 0}},
     "gate.closed_angle = 0.0: must differ from gate.open_angle (0.0)"),
    ({"sensor": {"jam_s": 0.75}},
     "sensor.jam_s = 0.75: must be more than flap.move_s + flap.hold_s (0.35 + 0.4 = 0.75 s"),
    ({"sensor": {"jam_s": 2.0}, "flap": {"move_s": 1.0, "hold_s": 1.5}},
     "sensor.jam_s = 2.0: must be more than flap.move_s + flap.hold_s (1 + 1.5 = 2.5 s"),
    ({"mqtt": {"enabled": True, "host": ""}},
     "mqtt.host = '': must name the broker when mqtt.enabled is true"),
    ({"mqtt": {"host": "mqtt://broker.local"}},
     "mqtt.host = 'mqtt://broker.local': must be a host name or IP address"),
    ({"mqtt": {"host": "broker local"}}, "mqtt.host = 'broker local': must be a host name"),
    ({"bin": {"id": ""}}, "bin.id = '': must be a single MQTT topic level"),
    ({"bin": {"id": "a/b"}}, "bin.id = 'a/b': must be a single MQTT topic level"),
    ({"bin": {"id": "bin+1"}}, "bin.id = 'bin+1': must be a single MQTT topic level"),
    ({"bin": {"id": "bin#"}}, "bin.id = 'bin#': must be a single MQTT topic level"),
    ({"bin": {"id": "my bin"}}, "bin.id = 'my bin': must be a single MQTT topic level"),
    ({"bin": {"id": "bin\n2"}}, "bin.id = 'bin\\n2': must be a single MQTT topic level"),
    ({"bin": {"id": "x" * 65}}, "must be a single MQTT topic level: 1 to 64 characters"),
    ({"bin": {"state_dir": "/var/lib/\0smartbin"}},
     "bin.state_dir = '/var/lib/\\x00smartbin': must not contain a NUL character"),
    ({"model": {"bundle": "n" * 256}}, "must not have a file or folder name longer than 255"),
    ({"model": {"backbone": "/x" * 2100}}, "must be at most 4096 bytes long"),
    ({"mqtt": {"username": "bob\0"}}, "mqtt.username = 'bob\\x00': must not contain a NUL"),
    ({"mqtt": {"username": "\udcff"}}, "mqtt.username = '\\udcff': must be valid text"),
    ({"camera": {"type": "simulated"}, "hardware": {"pin_factory": "mock"},
      "simulator": {"tip_deg": 30}},
     "flap.angles.kitchen = -20: only 20 degrees from flap.rest_angle (0); the simulated "
     "item slides off at simulator.tip_deg = 30"),
    ({"simulator": {"servo_deg_per_s": 0}},
     "simulator.servo_deg_per_s = 0.0: must be between 1.0 and 100000.0"),
    ({"simulator": {"seed": -1}}, "simulator.seed = -1: must be between 0 and 2147483647"),
    ({"sensor": {"zz" * 200: 1}}, "unknown key sensor.zzzzzzzz"),
])
def test_cross_checks_name_key_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(data)


def test_error_lines_stay_short_whatever_the_value():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"sensor": {"type": "x" * 100_000}})
    assert len(str(caught.value)) < 200 and "\n" not in str(caught.value)


def test_valid_edges_still_load():
    cfg = config_from_dict({"sensor": {"jam_s": 0.76}, "flap": {"rest_angle": 90},
                            "bin": {"id": "bin-7_\u5783\u573e"},
                            "mqtt": {"enabled": True, "host": "::1"}})
    assert cfg.sensor.jam_s == 0.76 and cfg.flap.rest_angle == 90.0
    assert config_from_dict({"mqtt": {"host": ""}}).mqtt.host == ""  # unused while disabled
    # The simulator's fast mode zeroes the flap times: any jam_s passes there.
    fast = {"flap": {"move_s": 0, "hold_s": 0}, "sensor": {"jam_s": 0.1}}
    assert config_from_dict(fast).sensor.jam_s == 0.1


@pytest.mark.parametrize("text, message", [
    ("[sensor]\npin = " + "9" * 5000, "not valid TOML: a number has more than 4300 digits"),
    ("a = " + "[" * 5000 + "]" * 5000, "not valid TOML: arrays or tables nested too deep"),
    ("a = " + "{b = " * 5000 + "1" + "}" * 5000, "not valid TOML: arrays or tables nested"),
    ("[sensor]\npin = 99999999999999999999999", "sensor.pin = 99999999999999999999999: must"),
    ("[model]\nconfidence_threshold = nan", "model.confidence_threshold = nan: must be a "
                                             "finite number between 0.0 and 1.0"),
    ("[loop]\ntick_s = nan", "loop.tick_s = nan: must be a finite number"),
    ("[flap]\nrest_angle = nan", "flap.rest_angle = nan: must be a finite number"),
    ("[flap]\nmin_pulse_s = -inf", "flap.min_pulse_s = -inf: must be a finite number"),
    ('[bin]\nstate_dir = "a\\u0000b"', "bin.state_dir = 'a\\x00b': must not contain a NUL"),
])
def test_hostile_files_are_one_config_error(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)


def test_unreadable_files_are_one_config_error(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=rf"big\.toml: larger than {MAX_CONFIG_BYTES:,} bytes"):
        load_config(big)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"a = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match=r"bin\.toml: cannot read: not UTF-8 text"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"cannot read: Is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"^'c\\x00\.toml': cannot read: embedded null byte"):
        load_config("c\0.toml")


def test_nan_from_the_command_line_side_is_refused_too():
    # Overrides (the CLI's, the simulator's) go through the same checks as the file.
    with pytest.raises(ConfigError, match=r"^loop\.tick_s = nan"):
        config_from_dict({}, {"loop": {"tick_s": float("nan")}})
    with pytest.raises(ConfigError, match=r"^mqtt\.host = ''"):
        config_from_dict({}, {"mqtt": {"enabled": True, "host": ""}})


@pytest.mark.parametrize("table", [{"\n": []}, {"model": {"a\tb": 1}},
                                   {"flap": {"angles": {"x\ny": 3}}}])
def test_a_key_with_a_line_break_is_quoted_in_its_one_line_error(table):
    with pytest.raises(ConfigError) as err:
        config_from_dict(table)
    assert "\n" not in str(err.value) and "\t" not in str(err.value)


@pytest.mark.parametrize("url", ["http://bin.local:8080/", "https://10.0.0.5/dash", ""])
def test_dashboard_url_accepts_a_web_address_or_nothing(url):
    assert config_from_dict({"mqtt": {"dashboard_url": url}}).mqtt.dashboard_url == url


@pytest.mark.parametrize("url", ["bin.local:8080", "ftp://bin.local/", "http://", "http:///x",
                                 "http://bin local/", "http://bin.local:port/",
                                 "javascript:alert(1)", "http://bin.local/\n"])
def test_dashboard_url_refuses_what_home_assistant_would_refuse(url):
    with pytest.raises(ConfigError, match=r"mqtt\.dashboard_url = .*: must be an http:// or "
                                          r"https:// address"):
        config_from_dict({"mqtt": {"dashboard_url": url}})
