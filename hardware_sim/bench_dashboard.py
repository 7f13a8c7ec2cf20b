"""`smartbin bench dashboard`: the web dashboard under a fleet's load, seen from a browser.

A local mosquitto, `smartbin dashboard`, N simulated bins as real `smartbin run --simulate
--sim-fast` processes (a person drops an item every 1/rate s in each), and the fleet page
open and logged in in Debian's chromium, driven by Playwright (launched by executable_path:
Playwright's own browser download is never used). Printed, each beside its goal:

- latency from a bin's commit (the event's `time`, Unix seconds, same machine clock) to the
  item in the open page: the page keeps `window.__smartbinItems` entries
  `{bin, seq, time, received}` (received: the page's Date.now()), the contract with the
  dashboard's pages; p50, p95, max over the items committed during the run;
- the dashboard's CPU (% of one core over the run, /proc/<pid>/stat) and peak resident memory
  (VmHWM, /proc/<pid>/status);
- the fleet page's transfer size on first load, cache emptied, every bin known: the bodies
  of every response of that load (HTML, scripts, styles, the first API reads; not the open
  event stream); the same for one bin's page (which adds the chart library and the photo).

Also printed: the items the bins published and the share that reached the page, and the
bins' own CPU, to tell a dashboard that is slow from a machine that cannot keep up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bin_controller.errors import SmartbinError
from bin_controller.tools.bench import percentiles
from hardware_sim.broker import Broker
from hardware_sim.children import (
    Child,
    Passwords,
    smartbin_argv,
    start_dashboard,
    stop_all,
    stop_on_signals,
    write_toml,
)

GOAL_P95_MS = 500.0
GOAL_RSS_MB = 150.0
GOAL_PAGE_KB = 500.0
MAX_BINS = 50
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
START_S = 180.0  # every bin publishes within this long, on a busy 2-core machine
SETTLE_S = 3.0  # after the page's load event, its first API reads finish
CLK_TCK = os.sysconf("SC_CLK_TCK")


def chromium_path() -> str:
    found = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).exists():
        raise SmartbinError("chromium is not installed: sudo apt-get install chromium "
                            "(./dev test installs it)")
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SmartbinError(f"/proc/{pid}/status has no VmHWM")


@dataclass
class Published:
    """Every item event on the broker, as a subscriber beside the dashboard sees it."""

    events: list[tuple[str, int, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, client: mqtt.Client, userdata: object,
                   msg: mqtt.MQTTMessage) -> None:
        arrived = time.time()
        try:
            data = json.loads(msg.payload)
            seq, sent = int(data["seq"]), float(data["time"])
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            self.events.append((msg.topic.split("/")[-2], seq, sent, arrived))

    def bins(self) -> set[str]:
        with self.lock:
            return {e[0] for e in self.events}

    def since(self, start: float, end: float) -> list[tuple[str, int, float, float]]:
        with self.lock:
            return [e for e in self.events if start <= e[2] < end]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bin_controller.cli import number, path_arg, whole

    p.add_argument("--bins", type=whole(1, MAX_BINS), default=20,
                   help=f"simulated bins (1 to {MAX_BINS}, default 20)")
    p.add_argument("--rate", type=number(0.05, 10), default=1.0,
                   help="items a second from each bin (0.05 to 10, default 1)")
    p.add_argument("--seconds", type=number(1, 3600), default=60.0,
                   help="how long to measure, after every bin has published (default 60)")
    p.add_argument("--json", type=path_arg, metavar="FILE", help="also write the figures here")


def run_bench(args: argparse.Namespace) -> int:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    browser_path = chromium_path()
    stop = stop_on_signals()
    folder = Path(tempfile.mkdtemp(prefix="smartbin-bench-dashboard-"))
    broker = Broker(folder / "broker", own_session=True)
    bins: list[Child] = []
    dashboard: Child | None = None
    subscriber: mqtt.Client | None = None
    try:
        broker.start()
        published = Published()
        subscriber = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                 client_id="smartbin-bench-dashboard")
        subscriber.on_connect = lambda c, u, f, rc, p: c.subscribe("smartbin/+/event", qos=1)
        subscriber.on_message = published.on_message
        subscriber.connect("127.0.0.1", broker.port)
        subscriber.loop_start()
        passwords = Passwords.create(folder)
        dashboard, url = start_dashboard(folder, mqtt_port=broker.port,
                                         listen="127.0.0.1:0", passwords=passwords,
                                         stop=stop)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
            try:
                page = _log_in(browser, url, passwords.admin)
                bins = _start_bins(folder, args, broker.port, url)
                _wait_for_bins(bins, published, args.bins, stop)
                # Loaded with every bin known, as a person opens it; then it stays open.
                fleet_load = _load_size(page, url)
                bin_page = page.context.new_page()
                bin_load = _load_size(bin_page, f"{url}bin/bench-1")
                bin_page.close()
                return _measure(args, dashboard, bins, page, published,
                                {"fleet": fleet_load, "bin": bin_load}, stop)
            except PlaywrightError as exc:
                raise SmartbinError(f"the browser failed: {str(exc).splitlines()[0]}") from None
            finally:
                browser.close()
    except KeyboardInterrupt:
        return 130
    finally:
        if subscriber is not None:
            subscriber.loop_stop()
            subscriber.disconnect()
        stop_all(bins)
        if dashboard is not None:
            dashboard.stop()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _log_in(browser: Any, url: str, password: str) -> Any:
    """A fresh context (nothing cached), logged in through the login form."""
    page = browser.new_context().new_page()
    page.goto(url)  # redirected to the login page
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    if "/login" in page.url:
        raise SmartbinError("the dashboard refused the benchmark's password")
    return page


def _load_size(page: Any, url: str) -> tuple[int, int]:
    """Load `url` with the browser's cache emptied and add up the bodies of its responses
    (the page, scripts, styles, its first API reads): (bytes, responses)."""
    page.context.new_cdp_session(page).send("Network.clearBrowserCache")
    responses: list[Any] = []

    def keep(response: Any) -> None:
        responses.append(response)

    page.on("response", keep)
    page.goto(url, wait_until="load")
    page.wait_for_timeout(SETTLE_S * 1000)
    page.remove_listener("response", keep)
    total = files = 0
    for response in responses:
        if "text/event-stream" in (response.headers.get("content-type") or ""):
            continue  # the live stream never ends; it is not part of the load
        total += len(response.body())
        files += 1
    return total, files


def _bin_config(folder: Path, i: int, port: int, url: str) -> Path:
    state = folder / f"bench-{i}"
    state.mkdir()
    config = state / "config.toml"
    write_toml(config, {
        "bin": {"id": f"bench-{i}", "state_dir": str(state)},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port, "dashboard_url": url},
    })
    return config


def _start_bins(folder: Path, args: argparse.Namespace, port: int, url: str) -> list[Child]:
    interval = f"{1 / args.rate:g}"
    return [Child(f"bench-{i}", smartbin_argv(
        "run", "--simulate", "--sim-fast", "--sim-interval", interval, "--seed", str(i),
        "--config", str(_bin_config(folder, i, port, url))), folder / f"bench-{i}" / "run.log",
        env={"SMARTBIN_OFFLINE": "1"}, cwd=folder / f"bench-{i}")
        for i in range(1, args.bins + 1)]


def _check_children(children: list[Child]) -> None:
    for child in children:
        code = child.exited()
        if code is not None:
            raise SmartbinError(f"{child.name} stopped by itself (exit {code}): "
                                f"{child.last_words() or 'no message'}")


def _wait_for_bins(bins: list[Child], published: Published, n: int,
                   stop: threading.Event) -> None:
    end = time.monotonic() + START_S
    while len(published.bins()) < n:
        _check_children(bins)
        if stop.wait(0.2):
            raise KeyboardInterrupt
        if time.monotonic() > end:
            raise SmartbinError(f"only {len(published.bins())} of {n} bins published an item "
                                f"within {START_S:g} s")


def _measure(args: argparse.Namespace, dashboard: Child, bins: list[Child], page: Any,
             published: Published, loads: dict[str, tuple[int, int]],
             stop: threading.Event) -> int:
    start_wall = time.time()
    cpu0, bins0 = cpu_seconds(dashboard.pid), sum(cpu_seconds(b.pid) for b in bins)
    t0 = time.monotonic()
    while not stop.wait(0.5) and time.monotonic() - t0 < args.seconds:
        _check_children([*bins, dashboard])
    wall = time.monotonic() - t0
    end_wall = time.time()
    cpu = (cpu_seconds(dashboard.pid) - cpu0) / wall * 100
    bins_cpu = (sum(cpu_seconds(b.pid) for b in bins) - bins0) / wall * 100
    rss = peak_rss_mb(dashboard.pid)
    # Items committed during the run, and a little grace for the last ones to arrive.
    page.wait_for_timeout(2000)
    seen = page.evaluate("window.__smartbinItems || []")
    sent = published.since(start_wall, end_wall)
    latencies = []
    for entry in seen:
        t, received = entry.get("time"), entry.get("received")
        if not isinstance(t, (int, float)) or not isinstance(received, (int, float)):
            continue
        received_s = received / 1000 if received > 1e11 else received  # Date.now() is ms
        if start_wall <= t < end_wall:
            latencies.append((received_s - t) * 1000)
    broker_ms = [(arrived - t) * 1000 for _, _, t, arrived in sent]
    report: dict[str, Any] = {
        "bins": args.bins, "rate_per_bin": args.rate, "seconds": round(wall, 1),
        "how": "real smartbin run --simulate --sim-fast processes",
        "items_published": len(sent), "items_in_page": len(latencies),
        "items_per_s": round(len(sent) / wall, 2),
        "latency_ms": _spread(latencies),
        "broker_latency_ms": _spread(broker_ms),
        "dashboard_cpu_pct": round(cpu, 1), "dashboard_peak_rss_mb": round(rss, 1),
        "bins_cpu_pct": round(bins_cpu, 1),
        "page_bytes": loads["fleet"][0], "page_responses": loads["fleet"][1],
        "bin_page_bytes": loads["bin"][0], "bin_page_responses": loads["bin"][1],
        "goals": {"latency_p95_ms": GOAL_P95_MS, "rss_mb": GOAL_RSS_MB,
                  "page_kb": GOAL_PAGE_KB},
    }
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _spread(samples_ms: list[float]) -> dict[str, float | None]:
    if not samples_ms:
        return {"p50": None, "p95": None, "max": None}
    p50, p95 = percentiles(samples_ms)
    return {"p50": round(p50, 1), "p95": round(p95, 1), "max": round(max(samples_ms), 1)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _print(r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    ok = lat["p95"] is not None and lat["p95"] < GOAL_P95_MS
    print(f"{r['bins']} bins ({r['how']}), {r['rate_per_bin']:g} item/s each, "
          f"{r['seconds']:.0f} s: {r['items_published']} items published "
          f"({r['items_per_s']:.1f}/s), {r['items_in_page']} reached the open page")
    print(f"commit -> page   p50 {_ms(lat['p50'])} ms, p95 {_ms(lat['p95'])} ms, max "
          f"{_ms(lat['max'])} ms   (goal p95 < {GOAL_P95_MS:.0f} ms: "
          f"{'met' if ok else 'NOT met'})")
    b = r["broker_latency_ms"]
    if b["p50"] is not None:
        print(f"commit -> broker p50 {_ms(b['p50'])} ms, p95 {_ms(b['p95'])} ms "
              f"(a subscriber beside the dashboard)")
    print(f"dashboard CPU    {r['dashboard_cpu_pct']:.1f} % of one core")
    rss = r["dashboard_peak_rss_mb"]
    print(f"dashboard memory {rss:.1f} MB peak resident   (goal < {GOAL_RSS_MB:.0f} MB: "
          f"{'met' if rss < GOAL_RSS_MB else 'NOT met'})")
    kb = r["page_bytes"] / 1024
    print(f"fleet page load  {kb:.1f} KB in {r['page_responses']} responses   (goal < "
          f"{GOAL_PAGE_KB:.0f} KB: {'met' if kb < GOAL_PAGE_KB else 'NOT met'})")
    kb = r["bin_page_bytes"] / 1024
    print(f"bin page load    {kb:.1f} KB in {r['bin_page_responses']} responses   (goal < "
          f"{GOAL_PAGE_KB:.0f} KB: {'met' if kb < GOAL_PAGE_KB else 'NOT met'})")
    target = r["bins"] * r["rate_per_bin"]
    print(f"the bins' CPU    {r['bins_cpu_pct']:.0f} % of one core in all "
          f"({os.cpu_count()} cores); they published {r['items_per_s'] / target:.0%} of the "
          f"{target:g} items/s asked for", flush=True)
