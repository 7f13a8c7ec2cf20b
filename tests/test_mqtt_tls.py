"""TLS with client certificates and username/password, against a real mosquitto."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time

import pytest

from bin_controller.config import config_from_dict
from bin_controller.errors import SmartbinError
from bin_controller.mqtt.telemetry import Telemetry
from bin_controller.payloads import event_message
from bin_controller.store import Store
from tests.broker import Broker, mosquitto_binary

PASSWORD = "s3cret-Pa55-do-not-log"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder):
    if not shutil.which("openssl"):
        if os.environ.get("CI"):
            pytest.fail("openssl is missing (./dev test installs it)")
        pytest.skip("openssl is not installed")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=smartbin test CA", cwd=folder)
    for name, cn in (("server", "127.0.0.1"), ("client", "bin-1")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
        ext = folder / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else
                       "extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                 str(ext), cwd=folder)
    for f in folder.iterdir():
        f.chmod(0o644)


@pytest.fixture
def tls_broker(tmp_path):
    mosquitto_binary()
    make_pki(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "bin-1", PASSWORD],
                   check=True, capture_output=True)
    passwd.chmod(0o644)
    broker = Broker(tmp_path)
    broker.conf.write_text(broker.conf.read_text() + "\n".join([
        "allow_anonymous false",
        f"password_file {passwd}",
        f"cafile {tmp_path / 'ca.crt'}",
        f"certfile {tmp_path / 'server.crt'}",
        f"keyfile {tmp_path / 'server.key'}",
        "require_certificate true", ""]).replace("allow_anonymous true\n", ""))
    broker.start()
    yield broker, tmp_path
    broker.stop()


def _telemetry(port, pki, tmp_path, **over):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": port, "tls": True,
            "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "client.crt"),
            "key_file": str(pki / "client.key"), "username": "bin-1",
            "password_file": str(tmp_path / "pw"), **over}
    cfg = config_from_dict({"bin": {"id": "tls1"}, "mqtt": mqtt})
    store = Store(tmp_path / "state", message=event_message)
    return Telemetry(cfg.mqtt, bin_id="tls1", store=store), store


def test_tls_client_certificate_and_password(tls_broker, tmp_path, caplog):
    broker, pki = tls_broker
    caplog.set_level(logging.DEBUG)
    telemetry, store = _telemetry(broker.port, pki, tmp_path)
    telemetry.start()
    try:
        assert telemetry.connected.wait(15), (broker.folder / "broker.log").read_text()[-800:]
        from tests.test_store import event

        store.record(event("kitchen"))
        telemetry.wake()
        assert telemetry.drain(10)
    finally:
        telemetry.stop()
        store.close()
    assert PASSWORD not in caplog.text
    log = (broker.folder / "broker.log").read_text()
    assert PASSWORD not in log


def test_wrong_password_is_refused_and_logged_without_it(tls_broker, tmp_path, caplog):
    broker, pki = tls_broker
    caplog.set_level(logging.DEBUG)
    (tmp_path / "bad").write_text("wrong")
    telemetry, store = _telemetry(broker.port, pki, tmp_path,
                                  password_file=str(tmp_path / "bad"))
    telemetry.start()
    try:
        time.sleep(2)
        assert not telemetry.connected.is_set()
    finally:
        telemetry.stop()
        store.close()
    assert "refused" in caplog.text.lower() or "not authorised" in caplog.text.lower()
    assert "wrong" not in caplog.text


def test_missing_tls_files_are_a_clear_error(tmp_path):
    cfg = config_from_dict({"mqtt": {"enabled": True, "tls": True,
                                     "ca_file": str(tmp_path / "nope.crt")}})
    store = Store(tmp_path / "s", message=event_message)
    with pytest.raises(SmartbinError, match="mqtt TLS files"):
        Telemetry(cfg.mqtt, bin_id="x", store=store)
    store.close()


def test_systemd_credential_is_used(tmp_path, monkeypatch):
    from bin_controller.mqtt.connection import read_password

    (tmp_path / "mqtt_password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config_from_dict({"mqtt": {"username": "u"}})
    assert read_password(cfg.mqtt) == "from-credential"
    (tmp_path / "mqtt_password").write_text("")
    assert read_password(cfg.mqtt) is None
    assert json.dumps(cfg.mqtt.__dict__).find("from-credential") == -1
