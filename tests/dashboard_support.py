"""Real parts for the dashboard tests: simulated bins publishing to a real mosquitto, and
`smartbin dashboard` run as a process, as a user starts it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bin_controller.config import config_from_dict
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import GeneratedSource
from tests.broker import Listener

PASSWORD = "correct horse battery"
VIEWER_PASSWORD = "lobby screen"
LISTEN_LINE = re.compile(r"^smartbin dashboard listening on (http://127\.0\.0\.1:(\d+)/)$")


class SimBin:
    """One simulated bin with MQTT telemetry, its own id, store and site log; items are
    dropped on demand."""

    def __init__(self, port: int, demo, state: Path, bin_id: str, *, seed: int = 0) -> None:
        self.bin_id = bin_id
        self.port = port
        self.state = state
        cfg = sim_config(config_from_dict({
            "bin": {"id": bin_id, "state_dir": str(state)},
            "photos": {"thumbnail_px": 96},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port,
                     "stats_interval_s": 1.0, "discovery": False}}), fast=True)
        self.simulation = Simulation(cfg, classifier=demo).__enter__()
        self.telemetry = self.simulation.bin.telemetry
        self.photos = self.simulation.bin.photos
        assert self.telemetry.subscribed.wait(10)
        self._seed = seed * 1000

    def drop(self, n: int) -> None:
        self._seed += 1
        result = self.simulation.drop(GeneratedSource(self._seed).items(n))
        assert not result.timed_out
        assert self.photos.flush()

    @property
    def loop(self):
        return self.simulation.loop

    def close(self) -> None:
        self.simulation.__exit__(None, None, None)


def retained_counts(port: int, bin_ids: list[str], prefix: str = "smartbin") -> dict[str, dict]:
    """What a consumer subscribing now gets as each bin's retained `counts`."""
    listener = Listener(port, topic=f"{prefix}/+/counts", client_id=f"counts-{time.time()}")
    try:
        topics = [f"{prefix}/{b}/counts" for b in bin_ids]
        assert listener.wait_for(lambda li: all(t in li.retained for t in topics))
        return {b: json.loads(listener.retained[f"{prefix}/{b}/counts"]) for b in bin_ids}
    finally:
        listener.close()


class DashboardProcess:
    """`python -m bin_controller dashboard ...`, started and waited for its listen line."""

    def __init__(self, tmp: Path, mqtt_port: int, *extra: str, viewer: bool = True) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "password").write_text(PASSWORD + "\n")
        (tmp / "viewer").write_text(VIEWER_PASSWORD + "\n")
        self.history = tmp / "dashboard.db"
        args = [sys.executable, "-m", "bin_controller", "dashboard",
                "--mqtt", f"127.0.0.1:{mqtt_port}", "--listen", "127.0.0.1:0",
                "--password-file", str(tmp / "password"), "--history", str(self.history),
                *(["--viewer-password-file", str(tmp / "viewer")] if viewer else []), *extra]
        env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.proc.stdout.readline().rstrip("\n") if self.proc.stdout else ""
        match = LISTEN_LINE.match(line)
        if match is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no listen line: {line!r}; stderr: {''.join(self.stderr)}")
        self.url, self.port = match.group(1), int(match.group(2))
        self.line = line

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_for_bins(self, session_cookie: str, bin_ids: list[str],
                      timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            req = urllib.request.Request(self.url + "api/fleet",
                                         headers={"Cookie": session_cookie})
            fleet = json.loads(urllib.request.urlopen(req, timeout=5).read())
            seen = {b["id"]: b for b in fleet["bins"]}
            if all(b in seen and seen[b]["counts"] for b in bin_ids):
                return seen
            assert time.monotonic() < deadline, sorted(seen)
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the dashboard did not stop on SIGTERM") from None
        return self.proc.returncode
