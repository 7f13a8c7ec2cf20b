"""`smartbin demo`: broker, simulated bins and dashboard up, reachable, and all gone after."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.broker import Listener, mosquitto_binary
from tests.conftest import REPO
from tests.test_cli import smartbin

START_S = 180.0  # two bins and the dashboard start on a busy 2-core machine


class Demo:
    """`smartbin demo ARGS` as a subprocess, with what it printed on start."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bin_controller", "demo", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        text = self._read_until("password:")
        self.broker_port = int(re.search(r"broker 127\.0\.0\.1:(\d+)", text).group(1))
        self.folder = Path(re.search(r"files in (\S+)", text).group(1))
        self.url = re.search(r"^dashboard: (http://\S+/)$", text, re.M).group(1)
        self.password = re.search(r"^password: (\S+)", text, re.M).group(1)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_until(self, marker: str) -> str:
        end = time.monotonic() + START_S
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.out.append(line)
            if line.startswith(marker):
                return "".join(self.out)
        self.proc.kill()
        pytest.fail(f"the demo did not start: {''.join(self.out)}{self.proc.stderr.read()}")

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, err


def processes_using(folder: Path) -> dict[int, str]:
    """pid -> command line of every process whose command line names the demo's folder."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in cmdline:
            found[int(entry.name)] = cmdline
    return found


def parent_of(pid: int) -> int | None:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


@pytest.fixture
def needs_mosquitto():
    mosquitto_binary()  # skips (fails in CI) without mosquitto


def _counts(listener: Listener, bin_id: str) -> dict | None:
    raw = listener.retained.get(f"smartbin/{bin_id}/counts")
    return json.loads(raw) if raw else None


def test_demo_serves_the_dashboard_runs_the_bins_and_leaves_nothing(needs_mosquitto):
    demo = Demo("--bins", "2", "--seconds", "45")
    try:
        running = processes_using(demo.folder)
        # The broker (its config), the dashboard (its password file), two bins (their config).
        assert len(running) >= 4, running
        assert any("dashboard" in c for c in running.values())
        assert sum("run --simulate" in c for c in running.values()) == 2
        # The URL answers with the login page (a password field).
        with urllib.request.urlopen(demo.url, timeout=30) as response:
            assert response.status == 200
            page = response.read().decode()
        assert re.search(r"""type=["']?password""", page), page[:500]
        listener = Listener(demo.broker_port, topic="smartbin/+/counts", client_id="t-demo")
        try:
            assert listener.wait_for(lambda li: all(
                (_counts(li, b) or {}).get("total", 0) >= 1 for b in ("demo-1", "demo-2")),
                timeout=60), listener.retained.keys()
        finally:
            listener.close()
        code, err = demo.finish()
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
    assert code == 0, err
    assert not demo.folder.exists()
    assert processes_using(demo.folder) == {}


def test_ctrl_c_stops_the_bins_before_the_broker(needs_mosquitto):
    demo = Demo("--bins", "2")
    listener = Listener(demo.broker_port, topic="smartbin/+/availability", client_id="t-ctrl")
    try:
        assert listener.wait_for(lambda li: all(
            li.retained.get(f"smartbin/{b}/availability") == b"online"
            for b in ("demo-1", "demo-2")), timeout=60)
        demo.proc.send_signal(signal.SIGINT)
        # Each bin said offline itself (a clean stop), before the broker went away.
        assert listener.wait_for(lambda li: all(
            li.retained.get(f"smartbin/{b}/availability") == b"offline"
            for b in ("demo-1", "demo-2")), timeout=60), listener.retained
        code, err = demo.finish()
    finally:
        listener.close()
        if demo.proc.poll() is None:
            demo.proc.kill()
    assert code == 0, err
    assert not demo.folder.exists() and processes_using(demo.folder) == {}


def test_a_child_that_dies_stops_the_demo_with_one_line(needs_mosquitto):
    demo = Demo("--bins", "2")
    try:
        # The demo's own child: a bin forking a helper (ctypes' find_library runs ldconfig)
        # shows the same command line for a moment.
        victim = [pid for pid, c in processes_using(demo.folder).items()
                  if "demo-2" in c and "run --simulate" in c and parent_of(pid) == demo.proc.pid]
        assert len(victim) == 1
        os.kill(victim[0], signal.SIGKILL)
        code, err = demo.finish()
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "demo-2 stopped by itself (exit -9)" in lines[0], err
    assert not demo.folder.exists() and processes_using(demo.folder) == {}


def test_demo_options_are_checked():
    r = smartbin("demo", "--bins", "21")
    assert r.returncode == 2 and "--bins" in r.stderr and "Traceback" not in r.stderr
    r = smartbin("demo", "--seconds", "0")
    assert r.returncode == 2 and "--seconds" in r.stderr


def _images_config(tmp_path: Path, images: Path) -> Path:
    path = tmp_path / "images.toml"
    path.write_text(f"[simulator]\nimages = {json.dumps(str(images))}\n")
    return path


def test_the_simulated_person_drops_photos_from_a_folder(tmp_path):
    """simulator.images: the demo's TrashNet bin. Only batteries in the folder: every
    item the service sorts is a battery (generated items would be of eight kinds)."""
    import numpy as np
    from PIL import Image

    from hardware_sim import items

    battery = next(k for k in items.KINDS if k.name_en == "battery")
    folder = tmp_path / "photos" / battery.name  # 有害垃圾_电池: the bin from its prefix
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(4):
        # Photos of the camera's 304x224 shape, the item in the middle square the model
        # sees: a square photo would be stretched to the frame, and the demo (trained to
        # doubt what it does not know) is unsure of a stretched battery.
        photo = np.pad(items.render(battery, rng, 224), ((0, 0), (40, 40), (0, 0)), "edge")
        Image.fromarray(photo).save(folder / f"{i}.png")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bin_controller", "run", "--simulate", "--sim-fast",
         "--sim-interval", "0.2", "--state-dir", str(tmp_path / "state"), "--verbose",
         "--config", str(_images_config(tmp_path, tmp_path / "photos"))],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    sorted_lines: list[str] = []
    try:
        for line in proc.stderr:
            if "sorted #" in line:
                sorted_lines.append(line)
                if len(sorted_lines) == 5:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert len(sorted_lines) == 5
    assert all("battery -> hazardous" in line for line in sorted_lines), sorted_lines


def test_a_missing_photo_folder_is_one_error_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "bin_controller", "run", "--simulate", "--state-dir",
         str(tmp_path / "state"), "--config", str(_images_config(tmp_path, tmp_path / "nothing"))],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nothing: no such folder" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
