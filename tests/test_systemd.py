"""The service under systemd's protocols: unit checks, sd_notify, watchdog, SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hardware_sim import items
from tests.broker import Broker, Listener
from tests.conftest import REPO

UNIT = REPO / "systemd" / "smartbin.service"
DASHBOARD_UNIT = REPO / "systemd" / "smartbin-dashboard.service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if not tool:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing")
        pytest.skip("systemd-analyze is not installed")
    return tool


@pytest.mark.parametrize("source", [UNIT, DASHBOARD_UNIT], ids=lambda p: p.name)
def test_unit_verifies(tmp_path, source):
    tool = _systemd_analyze()
    # verify insists that ExecStart exists; point it at a real file, keep the rest.
    text = source.read_text().replace("/opt/smartbin/venv/bin/smartbin", sys.executable)
    unit = tmp_path / source.name
    unit.write_text(text)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if source.name in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_unit_exposure_is_low():
    tool = _systemd_analyze()
    r = subprocess.run([tool, "security", "--offline=true", str(UNIT)], capture_output=True,
                       text=True)
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout).group(1))
    assert score <= 3.0, r.stdout[-2000:]
    for required in ("Type=notify", "WatchdogSec=", "SupplementaryGroups=gpio video",
                     "LoadCredential=mqtt_password", "StateDirectory=smartbin",
                     "ConfigurationDirectory=smartbin", "CacheDirectory=smartbin",
                     "Restart=on-failure"):
        assert required in UNIT.read_text()
    assert "PrivateDevices=yes" not in UNIT.read_text()


def test_dashboard_unit_exposure_is_low():
    tool = _systemd_analyze()
    r = subprocess.run([tool, "security", "--offline=true", str(DASHBOARD_UNIT)],
                       capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout).group(1))
    # No devices at all, unlike the bin: it may be tighter than the bin's 3.0.
    assert score <= 2.5, r.stdout[-2000:]
    text = DASHBOARD_UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()
    assert exec_start[:2] == ["/opt/smartbin/venv/bin/smartbin", "dashboard"]
    assert exec_start[exec_start.index("--listen") + 1].startswith("127.0.0.1:")
    for required in ("User=smartbin", "StateDirectory=smartbin-dashboard",
                     "LoadCredential=dashboard_password:/etc/smartbin/dashboard_password",
                     "PrivateDevices=yes", "Restart=on-failure"):
        assert required in text


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def pump(self, seconds: float, until=None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
            if until and until(fields):
                return

    def times(self, key: str) -> list[float]:
        return [t for t, f in self.messages if key in f]

    def statuses(self) -> list[str]:
        return [f["STATUS"] for _, f in self.messages if "STATUS" in f]


def _service(tmp_path, notify: NotifySocket, *args, env=None):
    cmd = [sys.executable, "-m", "bin_controller", "run", "--simulate", "--state-dir",
           str(tmp_path / "state"), "--bin-id", "svc", *args]
    environ = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000",
               "WATCHDOG_PID": "", **(env or {})}
    environ.pop("WATCHDOG_PID")
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ready_watchdog_status_and_sigterm_mid_cycle(tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    listener = Listener(broker.port, topic="smartbin/svc/#", client_id="svc-dash")
    notify = NotifySocket(tmp_path / "notify")
    proc = _service(tmp_path, notify, "--mqtt", f"127.0.0.1:{broker.port}",
                    "--sim-interval", "0.3", env={"JOURNAL_STREAM": "8:1"})
    try:
        notify.pump(60, until=lambda f: f.get("READY") == "1")
        ready = notify.times("READY")
        assert ready, proc.stderr.read() if proc.poll() is not None else "no READY"
        # READY comes with the status line, after everything is up.
        assert "sorted 0" in notify.statuses()[0] or "sorted" in notify.statuses()[0]
        notify.pump(4, until=lambda f: "sorting" in f.get("STATUS", "")
                    and len(notify.times("WATCHDOG")) >= 3)
        notify.pump(30, until=lambda f: f.get("STATUS", "").startswith("sorting"))
        assert any(s.startswith("sorting") for s in notify.statuses())
        pings = notify.times("WATCHDOG")
        assert len(pings) >= 2, "the loop should ping the watchdog while it turns"
        proc.send_signal(signal.SIGTERM)  # in the middle of a cycle
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err[-2000:]
        notify.pump(0.5)
        assert any(f.get("STOPPING") == "1" for _, f in notify.messages)
    finally:
        if proc.poll() is None:
            proc.kill()
    # journald-shaped logs: priorities, no second timestamp.
    lines = [line for line in err.splitlines() if line.startswith("<")]
    assert any(line.startswith("<6>smartbin: bin svc ready") for line in lines), err[-1500:]
    assert not re.match(r"<\d>\d{4}-\d\d-\d\d", lines[0])
    db = sqlite3.connect(tmp_path / "state" / "smartbin.db")
    total = db.execute("SELECT SUM(n) FROM counts").fetchone()[0]
    journal = db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
    pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    db.close()
    assert total == journal >= 1 and pending == 0  # the cut-short item was finished
    assert listener.wait_for(
        lambda li: li.retained.get("smartbin/svc/availability") == b"offline")
    listener.close()
    broker.stop()


def test_no_watchdog_ping_when_the_loop_is_stuck(tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    proc = _service(tmp_path, notify, "--sim-interval", "0.2", "--sim-hang-camera", "2")
    try:
        notify.pump(60, until=lambda f: f.get("READY") == "1")
        assert notify.times("READY")
        # The second capture never returns: wait until the loop is stuck in it.
        notify.pump(30, until=lambda f: f.get("STATUS", "").startswith("capturing")
                    and len(notify.times("STATUS")) > 6)
        stuck_since = time.monotonic()
        notify.pump(4)
        assert any(t < stuck_since for t in notify.times("WATCHDOG")), "pinged while healthy"
        late = [t for t in notify.times("WATCHDOG") if t > stuck_since + 1.5]
        assert late == [], "the watchdog was fed by a stuck loop"
    finally:
        proc.kill()
        proc.wait()


def test_install_script_is_idempotent(tmp_path):
    script = REPO / "systemd" / "install.sh"
    opts = ["--root", str(tmp_path), "--no-apt", "--no-systemctl", "--no-user", "--no-venv"]
    r = subprocess.run(["bash", str(script), *opts], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    config = tmp_path / "etc" / "smartbin" / "config.toml"
    assert config.read_text() == (REPO / "systemd" / "config.example.toml").read_text()
    # The dashboard gets a random password of its own on the first install, kept after.
    password = tmp_path / "etc/smartbin/dashboard_password"
    assert password.stat().st_mode & 0o077 == 0 and len(password.read_text().strip()) >= 12
    first_password = password.read_text()
    config.write_text('[bin]\nid = "corner-7"\n')
    r = subprocess.run(["bash", str(script), *opts], capture_output=True, text=True)
    assert r.returncode == 0 and "kept" in r.stdout
    assert config.read_text() == '[bin]\nid = "corner-7"\n'
    assert password.read_text() == first_password  # an upgrade keeps the owner's password
    assert (tmp_path / "etc/systemd/system/smartbin.service").read_text() == UNIT.read_text()
    # The dashboard's unit is installed but left disabled; the output says how to enable it.
    dashboard = tmp_path / "etc/systemd/system/smartbin-dashboard.service"
    assert dashboard.read_text() == DASHBOARD_UNIT.read_text()
    assert "systemctl enable --now smartbin-dashboard" in r.stdout
    # The service runs from the venv alone: no copy of the source tree is left behind.
    assert (tmp_path / "opt/smartbin/README.md").is_file()
    assert not (tmp_path / "opt/smartbin/src").exists()
    r = subprocess.run(["bash", str(script), "--uninstall", *opts], capture_output=True,
                       text=True)
    assert r.returncode == 0 and not (tmp_path / "opt/smartbin").exists()
    assert not dashboard.exists()
    assert config.is_file()  # kept without --purge
    r = subprocess.run(["bash", str(script), "--uninstall", "--purge", *opts],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not config.exists()


@pytest.mark.slow
def test_install_script_builds_a_venv_that_needs_no_source_tree(tmp_path):
    script = REPO / "systemd" / "install.sh"
    root = tmp_path / "root"
    opts = ["--root", str(root), "--no-apt", "--no-systemctl", "--no-user"]
    # A user's shell: nothing on PYTHONPATH that would hide a missing file in the venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHON"] = sys.executable
    before = sorted(REPO.iterdir())
    for _ in range(2):  # the second run is an upgrade in place, same version number
        r = subprocess.run(["bash", str(script), *opts], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "installed smartbin-" in r.stdout
    assert sorted(REPO.iterdir()) == before, "the build left files in the checkout"
    smartbin = root / "opt/smartbin/venv/bin/smartbin"
    work = tmp_path / "work"
    work.mkdir()
    photo = work / "item.jpg"
    kind = next(k for k in items.KINDS if k.bin == "hazardous")
    Image.fromarray(items.render(kind, np.random.default_rng(3))).save(photo)
    r = subprocess.run([str(smartbin), "classify", photo.name], cwd=work, capture_output=True,
                       text=True, env={**env, "SMARTBIN_MODELS": str(tmp_path / "models")})
    assert r.returncode == 0 and "-> hazardous" in r.stdout, r.stderr
    r = subprocess.run(["bash", str(script), "--uninstall", *opts], capture_output=True,
                       text=True)
    assert r.returncode == 0 and not (root / "opt/smartbin").exists()


def test_example_config_and_readme_follow_the_schema():
    from bin_controller.config import example_toml, load_config, reference_markdown

    example = REPO / "systemd" / "config.example.toml"
    assert example.read_text() == example_toml(), "regenerate: smartbin config-doc --toml"
    load_config(example)
    assert reference_markdown() in (REPO / "README.md").read_text(), \
        "README config reference is stale: smartbin config-doc"


def test_check_command(tmp_path):
    from tests.test_cli import smartbin

    good = tmp_path / "good.toml"
    good.write_text('[hardware]\npin_factory = "mock"\n[camera]\ntype = "simulated"\n')
    r = smartbin("check", "--config", str(good), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stdout
    for part in ("config", "model", "pins", "camera", "broker", "disk"):
        assert re.search(rf"^ok +{part}: ", r.stdout, re.M), r.stdout
    assert "FAIL" not in r.stderr
    # Failures go to stderr, the ok lines stay on stdout, and the exit code is the CLI's 2.
    r = smartbin("check", "--config", str(good), "--mqtt", "127.0.0.1:9",
                 "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "FAIL broker: 127.0.0.1:9 unreachable" in r.stderr
    assert "FAIL" not in r.stdout and re.search(r"^ok +disk: ", r.stdout, re.M)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbundle = 'nope'\n[hardware]\npin_factory = 'mock'\n")
    r = smartbin("check", "--config", str(bad))
    assert r.returncode == 2 and "FAIL model:" in r.stderr and "Traceback" not in r.stderr
    assert "FAIL" not in r.stdout
