"""`smartbin bench dashboard`, run small: every figure is printed and is a number.
(Speed is never asserted; the benchmark prints it.)"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from hardware_sim.bench_dashboard import cpu_seconds, peak_rss_mb
from tests.broker import mosquitto_binary
from tests.test_cli import smartbin

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


@pytest.fixture
def chromium():
    if not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (./dev test installs it)")
        pytest.skip("chromium is not installed: sudo apt-get install chromium")


def test_bench_dashboard_prints_every_figure(tmp_path, chromium):
    mosquitto_binary()
    report = tmp_path / "bench.json"
    r = smartbin("bench", "dashboard", "--bins", "2", "--seconds", "8", "--json", str(report))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    m = re.search(rf"{NUMBER} items published .*?, {NUMBER} reached the open page", out)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out
    m = re.search(rf"commit -> page +p50 {NUMBER} ms, p95 {NUMBER} ms, max {NUMBER} ms", out)
    assert m, out
    p50, p95, worst = (float(g) for g in m.groups())
    assert p50 <= p95 <= worst
    assert re.search(r"goal p95 < 500 ms", out)
    assert re.search(rf"dashboard CPU +{NUMBER} % of one core", out), out
    m = re.search(rf"dashboard memory {NUMBER} MB peak resident .*goal < 150 MB", out)
    assert m and float(m.group(1)) > 0, out
    m = re.search(rf"fleet page load +{NUMBER} KB in (\d+) responses .*goal < 500 KB", out)
    assert m and float(m.group(1)) > 0 and int(m.group(2)) >= 2, out  # the HTML and its script
    m = re.search(rf"bin page load +{NUMBER} KB in (\d+) responses .*goal < 500 KB", out)
    assert m and float(m.group(1)) > 0 and int(m.group(2)) >= 2, out
    data = json.loads(report.read_text())
    assert data["bins"] == 2 and data["items_in_page"] > 0
    assert all(isinstance(data["latency_ms"][k], float) for k in ("p50", "p95", "max"))
    assert isinstance(data["dashboard_peak_rss_mb"], float) and data["page_bytes"] > 0
    assert data["bin_page_bytes"] > 0


def test_bench_options_are_checked():
    for args, option in ((["--bins", "0"], "--bins"), (["--rate", "0"], "--rate"),
                         (["--seconds", "0"], "--seconds")):
        r = smartbin("bench", "dashboard", *args)
        assert r.returncode == 2 and option in r.stderr and "Traceback" not in r.stderr


def test_proc_readings_of_this_process():
    pid = os.getpid()
    before = cpu_seconds(pid)
    sum(i * i for i in range(2_000_000))  # some CPU, so the reading must move
    assert cpu_seconds(pid) > before
    assert 1 < peak_rss_mb(pid) < 100_000
