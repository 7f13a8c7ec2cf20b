"""Command-line mistakes are one line and exit code 2, never a traceback; `smartbin check`
reports failures on stderr and really logs in to the broker."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from bin_controller.cli import main
from hardware_sim import items
from tests.broker import Broker, mosquitto_binary
from tests.test_cli import smartbin
from tests.test_mqtt_tls import PASSWORD, make_pki


def _usage_error(capsys, *argv: str) -> str:
    """argparse's refusal: exit 2, a usage line, then one error line (returned)."""
    with pytest.raises(SystemExit) as stopped:
        main(list(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: smartbin")
    return lines[-1]


# ------------------------------------------------------------------ classify options


@pytest.mark.parametrize("argv, message", [
    (["--top", "0"], "argument --top: expected a whole number of 1 or more, not '0'"),
    (["--top", "-2"], "argument --top: expected a whole number of 1 or more, not '-2'"),
    (["--top", "many"], "argument --top: expected a whole number of 1 or more, not 'many'"),
    (["--top", "9" * 5000], "argument --top: expected a whole number of 1 or more, not '999"),
    (["--threads", "0"], "argument --threads: expected a whole number from 1 to 64, not '0'"),
    (["--threads", "-1"], "argument --threads: expected a whole number from 1 to 64"),
    (["--threads", "1000"], "argument --threads: expected a whole number from 1 to 64"),
])
def test_classify_numbers_are_checked(capsys, argv, message):
    line = _usage_error(capsys, "classify", *argv, "x.jpg")
    assert line.startswith(f"smartbin classify: error: {message}")
    assert len(line) < 160


def test_top_zero_is_one_line_in_a_real_process():
    r = smartbin("classify", "--top", "0", "x.jpg")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        "smartbin classify: error: argument --top: expected a whole number of 1 or more, not '0'"


# ------------------------------------------------------------------ simulate options


@pytest.mark.parametrize("argv, message", [
    (["--jam", "abc"], "argument --jam: expected item numbers such as 3,7 (each 1 or more), "
                       "not 'abc'"),
    (["--jam", "0"], "argument --jam: expected item numbers such as 3,7"),
    (["--jam", ","], "argument --jam: expected item numbers such as 3,7"),
    (["--camera-fail", "5:x"], "argument --camera-fail: expected ITEM[:FAILURES],... such as "
                               "5:3 (item 1 or more, failures 1 or more), not '5:x'"),
    (["--camera-fail", "x:2"], "argument --camera-fail: expected ITEM[:FAILURES],..."),
    (["--camera-fail", "5:0"], "argument --camera-fail: expected ITEM[:FAILURES],..."),
    (["--slow", "2:-1"], "argument --slow: expected ITEM[:SECONDS],... such as 6:0.5 (item 1 "
                         "or more, seconds from 0 to 600), not '2:-1'"),
    (["--slow", "2:nan"], "argument --slow: expected ITEM[:SECONDS],..."),
    (["--slow", "2:inf"], "argument --slow: expected ITEM[:SECONDS],..."),
    (["--double-drop", "0"], "argument --double-drop: expected item numbers such as 3,7"),
    (["--seed", "-1"], "argument --seed: expected a whole number from 0 to 2147483647, "
                       "not '-1'"),
    (["--seed", "1.5"], "argument --seed: expected a whole number from 0 to 2147483647"),
    (["--items", "0"], "argument --items: expected a whole number of 1 or more, not '0'"),
    (["--pace", "-1"], "argument --pace: expected a number from 0 to 3600, not '-1'"),
    (["--pace", "nan"], "argument --pace: expected a number from 0 to 3600, not 'nan'"),
    (["--drain-s", "inf"], "argument --drain-s: expected a number from 0 to 3600"),
])
def test_simulate_options_are_checked(capsys, argv, message):
    line = _usage_error(capsys, "simulate", "--fast", *argv)
    assert line.startswith(f"smartbin simulate: error: {message}")


def test_fault_items_past_the_last_item_are_refused(capsys):
    assert main(["simulate", "--fast", "--items", "3", "--jam", "2,50"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "smartbin: error: --jam: item 50 is past the last item (--items 3)"


def test_good_fault_options_still_run(capsys, tmp_path):
    # The flap times here exceed the simulator's 1 s jam time: --jam must still work.
    config = tmp_path / "slow-flap.toml"
    config.write_text("[flap]\nmove_s = 0.6\nhold_s = 0.6\n")
    code = main(["simulate", "--fast", "--quiet", "--items", "4", "--config", str(config),
                 "--jam", "2", "--camera-fail", "3:1", "--slow", "4:0.01", "--seed", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "items 4, counted 4" in out and "'jam': 1" in out


# ------------------------------------------------------------------ NUL in paths

NUL = "a\0b"


@pytest.mark.parametrize("argv, option", [
    (["classify", "--model", NUL, "x.jpg"], "--model"),
    (["classify", "--backbone", NUL, "x.jpg"], "--backbone"),
    (["run", "--config", NUL], "--config"),
    (["run", "--state-dir", NUL], "--state-dir"),
    (["run", "--model", NUL], "--model"),
    (["check", "--config", NUL], "--config"),
    (["check", "--state-dir", NUL], "--state-dir"),
    (["simulate", "--config", NUL], "--config"),
    (["simulate", "--images", NUL], "--images"),
    (["simulate", "--bin-map", NUL], "--bin-map"),
    (["simulate", "--report", NUL], "--report"),
    (["simulate", "--state-dir", NUL], "--state-dir"),
    (["simulate", "--model", NUL], "--model"),
    (["train", "--data", NUL, "--out", "o"], "--data"),
    (["train", "--data", "d", "--out", NUL], "--out"),
    (["evaluate", "--model", "demo", "--data", NUL], "--data"),
    (["bench", "classify", "--image", NUL], "--image"),
    (["bench", "cycle", "--config", NUL], "--config"),
    (["bench", "store", "--dir", NUL], "--dir"),
])
def test_nul_in_a_path_option_is_one_line(capsys, argv, option):
    line = _usage_error(capsys, *argv)
    assert f"error: argument {option}: the path 'a\\x00b' must not contain a NUL character" \
        in line


def test_over_long_path_option_is_one_line(capsys):
    line = _usage_error(capsys, "check", "--config", "c" * 300)
    assert "argument --config: the path 'ccc" in line
    assert line.endswith("must not have a file or folder name longer than 255 bytes")


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "battery.jpg"
    Image.fromarray(items.render(items.KINDS[5], np.random.default_rng(1))).save(path)
    return str(path)


def test_classify_goes_on_after_a_nul_path(capsys, photo):
    code = main(["classify", "--json", photo, NUL, "n" * 300 + ".jpg", photo])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [photo, NUL, "n" * 300 + ".jpg", photo]
    assert records[1]["error"] == "the path must not contain a NUL character"
    assert "longer than 255 bytes" in records[2]["error"]
    assert records[0]["bin"] == records[3]["bin"] == "hazardous"


def test_classify_text_output_shows_a_nul_path_escaped(capsys, photo):
    assert main(["classify", NUL, photo]) == 1
    out, err = capsys.readouterr()
    assert err == "'a\\x00b': error: the path must not contain a NUL character\n"
    assert out.startswith(f"{photo}: ")


# ------------------------------------------------------------------ config through the CLI


def test_empty_broker_host_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[mqtt]\nenabled = true\nhost = ""\n')
    r = smartbin("run", "--simulate", "--config", str(config), "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"smartbin: error: {config}: mqtt.host = '': must name the broker when mqtt.enabled "
        "is true, e.g. \"localhost\"")


# ------------------------------------------------------------------ smartbin check


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory):
    """mosquitto with TLS, a client certificate and a password, as tests/test_mqtt_tls.py."""
    mosquitto_binary()
    folder = tmp_path_factory.mktemp("broker")
    make_pki(folder)
    passwd = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "bin-1", PASSWORD],
                   check=True, capture_output=True)
    passwd.chmod(0o644)
    broker = Broker(folder)
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", "")
                           + "\n".join(["allow_anonymous false", f"password_file {passwd}",
                                        f"cafile {folder / 'ca.crt'}",
                                        f"certfile {folder / 'server.crt'}",
                                        f"keyfile {folder / 'server.key'}",
                                        "require_certificate true", ""]))
    broker.start()
    yield broker, folder
    broker.stop()


def _check(capsys, tmp_path, port, pki, password: str | None, **mqtt) -> tuple[int, str, str]:
    pw = tmp_path / "pw"
    pw.write_text((password or "") + "\n")
    settings = {"enabled": True, "host": "127.0.0.1", "port": port, "tls": True,
                "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "client.crt"),
                "key_file": str(pki / "client.key"), "username": "bin-1",
                "password_file": str(pw), **mqtt}
    lines = ["[hardware]", 'pin_factory = "mock"', "[camera]", 'type = "simulated"', "[mqtt]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    config = tmp_path / "check.toml"
    config.write_text("\n".join(lines) + "\n")
    code = main(["check", "--config", str(config), "--state-dir", str(tmp_path / "s")])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_logs_in_with_the_configured_credentials(capsys, tmp_path, password_broker):
    broker, pki = password_broker
    code, out, err = _check(capsys, tmp_path, broker.port, pki, PASSWORD)
    assert code == 0, err
    assert f"ok   broker: 127.0.0.1:{broker.port} connected as bin-1, TLS\n" in out
    assert err == "" and PASSWORD not in out


def test_check_reports_a_wrong_password(capsys, tmp_path, password_broker):
    broker, pki = password_broker
    code, out, err = _check(capsys, tmp_path, broker.port, pki, "wrong-password")
    assert code == 2
    assert "broker:" not in out  # the failure is on stderr, not among the ok lines
    assert f"FAIL broker: 127.0.0.1:{broker.port} refused the connection: Not authorized " \
           f"(user bin-1; check the password in {tmp_path / 'pw'})" in err
    assert "wrong-password" not in out + err
    for part in ("config", "model", "pins", "camera", "disk"):
        assert f"ok   {part}: " in out


def test_check_reports_a_missing_password(capsys, tmp_path, password_broker):
    broker, pki = password_broker
    code, _, err = _check(capsys, tmp_path, broker.port, pki, None)
    assert code == 2 and "refused the connection: Not authorized" in err


def test_check_reports_tls_trouble(capsys, tmp_path, password_broker):
    broker, pki = password_broker
    code, _, err = _check(capsys, tmp_path, broker.port, pki, PASSWORD, tls=False)
    assert code == 2
    assert f"FAIL broker: 127.0.0.1:{broker.port} closed the connection before answering" in err
    other = tmp_path / "other-ca"
    other.mkdir()
    make_pki(other)
    code, _, err = _check(capsys, tmp_path, broker.port, pki, PASSWORD,
                          ca_file=str(other / "ca.crt"))
    assert code == 2
    assert f"FAIL broker: 127.0.0.1:{broker.port}: TLS failed: " in err
    assert "certificate" in err


def test_check_config_failure_is_on_stderr(capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[loop]\ntick_s = nan\n")
    assert main(["check", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"FAIL config: {config}: loop.tick_s = nan: must be a finite number between " \
                  "0.05 and 10.0\n"
