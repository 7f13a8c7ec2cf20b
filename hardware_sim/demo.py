"""`smartbin demo`: the laptop demo in one command (`./dev demo`).

A local mosquitto on a free port, the web dashboard on it, and simulated bins
(`smartbin run --simulate`, each with its own config, seed and state folder) in which a
person drops an item every few seconds. One bin sorts real TrashNet photos with the trashnet
bundle when the shared data is there ($SMARTBIN_SHARED, else ../shared beside the checkout).
The demo itself plays the person who empties a full compartment (`cmd/emptied`), so the fill
bars keep moving. Everything lives in one temporary folder, removed at the end.

Ctrl-C or SIGTERM stops the bins first (each finishes its item and says `offline`), then the
dashboard, then the broker. A child that dies on its own stops the demo with exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

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

MAX_BINS = 20
# Small compartments, so that the fill bars move within a minute or two of the demo.
CAPACITY_L = {"recyclable": 4.0, "kitchen": 3.0, "hazardous": 1.0, "other": 4.0}
# The demo's janitor empties a full compartment this long after the bin said so.
EMPTY_AFTER_S = 15.0
TICK_S = 0.25


def shared_folder() -> Path:
    return Path(os.environ.get("SMARTBIN_SHARED") or Path(__file__).resolve().parents[2]
                / "shared")


@dataclass(frozen=True)
class BinPlan:
    """One simulated bin of the demo."""

    bin_id: str
    bundle: str
    seed: int
    interval_s: float
    images: str = ""  # a folder of class folders the person drops photos from
    backbone: str = ""

    @property
    def what(self) -> str:
        source = "TrashNet photos" if self.images else "generated items"
        return (f"{self.bin_id} ({self.bundle} bundle, {source}, seed {self.seed}, an item "
                f"every {self.interval_s:g} s)")


def plan_bins(n: int, shared: Path) -> list[BinPlan]:
    """demo bundle bins with seeds 1, 2, ...; the third sorts TrashNet photos when the shared
    data has them (and the backbone the trashnet bundle needs)."""
    photos = shared / "datasets" / "trashnet"
    backbone = shared / "models" / "mobilenet_v2_1.0_224_quant"
    plans = []
    for i in range(1, n + 1):
        # 2 to 5 s between drops, different per bin, so the fleet does not tick in step.
        interval = 2.0 + (i - 1) % 4
        if i == 3 and photos.is_dir() and backbone.exists():
            plans.append(BinPlan(f"trashnet-{i}", "trashnet", i, interval,
                                 images=str(photos), backbone=str(backbone)))
        else:
            plans.append(BinPlan(f"demo-{i}", "demo", i, interval))
    return plans


def bin_config(plan: BinPlan, *, state_dir: Path, mqtt_port: int,
               dashboard_url: str) -> dict[str, dict[str, object]]:
    model: dict[str, object] = {"bundle": plan.bundle}
    if plan.backbone:
        model["backbone"] = plan.backbone
    return {
        "bin": {"id": plan.bin_id, "state_dir": str(state_dir)},
        "model": model,
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": mqtt_port,
                 "stats_interval_s": 10.0, "dashboard_url": dashboard_url},
        "photos": {"keep": "all"},
        "fill": {"capacity_l": CAPACITY_L},
        **({"simulator": {"images": plan.images, "images_bin_map": plan.bundle}}
           if plan.images else {}),
    }


class Janitor:
    """Empties a compartment EMPTY_AFTER_S after its bin reported it full (`cmd/emptied`),
    as the person with the bags would."""

    def __init__(self, port: int, prefix: str = "smartbin") -> None:
        self.prefix = prefix
        self.due: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="smartbin-demo-janitor")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/+/fill", qos=1)
        self.client.on_message = self._on_fill
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_fill(self, client: mqtt.Client, userdata: object,
                 msg: mqtt.MQTTMessage) -> None:
        bin_id = msg.topic.split("/")[-2]
        try:
            levels = json.loads(msg.payload)
            full = {name for name, level in levels.items()
                    if isinstance(level, dict) and level.get("state") == "full"}
        except (ValueError, AttributeError):
            return  # not ours to judge: the dashboard shows what it can
        with self.lock:
            for name in full:
                self.due.setdefault((bin_id, name), time.monotonic() + EMPTY_AFTER_S)
            for key in [k for k in self.due if k[0] == bin_id and k[1] not in full]:
                del self.due[key]

    def tick(self) -> None:
        now = time.monotonic()
        with self.lock:
            ready = [k for k, at in self.due.items() if at <= now]
            for key in ready:
                self.due[key] = now + EMPTY_AFTER_S  # again, should this one be lost
        for bin_id, name in ready:
            self.client.publish(f"{self.prefix}/{bin_id}/cmd/emptied",
                                json.dumps({"bin": name}), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bin_controller.cli import number, whole

    p.add_argument("--bins", type=whole(1, MAX_BINS), default=3,
                   help=f"how many simulated bins (1 to {MAX_BINS}, default 3)")
    p.add_argument("--port", type=whole(0, 65535), default=0,
                   help="the dashboard's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--seconds", type=number(0, above=True),
                   help="stop by itself after this long (default: at Ctrl-C)")


def run_demo(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    folder = Path(tempfile.mkdtemp(prefix="smartbin-demo-"))
    bins: list[Child] = []
    dashboard: Child | None = None
    janitor: Janitor | None = None
    broker = Broker(folder / "broker", own_session=True)
    try:
        broker.start()
        passwords = Passwords.create(folder)
        dashboard, url = start_dashboard(folder, mqtt_port=broker.port,
                                         listen=f"127.0.0.1:{args.port}",
                                         passwords=passwords, stop=stop)
        plans = plan_bins(args.bins, shared_folder())
        for plan in plans:
            state = folder / plan.bin_id
            state.mkdir()
            config = state / "config.toml"
            write_toml(config, bin_config(plan, state_dir=state, mqtt_port=broker.port,
                                          dashboard_url=url))
            bins.append(Child(plan.bin_id, smartbin_argv(
                "run", "--simulate", "--config", str(config), "--seed", str(plan.seed),
                "--sim-interval", f"{plan.interval_s:g}"), state / "run.log",
                env={"SMARTBIN_OFFLINE": "1"}, cwd=state))
        janitor = Janitor(broker.port)
        print(f"smartbin demo: broker 127.0.0.1:{broker.port}, files in {folder}")
        for plan in plans:
            print(f"  bin {plan.what}")
        print(f"dashboard: {url}")
        print(f"password: {passwords.admin}   (read-only viewer: {passwords.viewer})")
        print("Ctrl-C stops it all." if args.seconds is None
              else f"stops by itself after {args.seconds:g} s (or at Ctrl-C).", flush=True)
        return _watch([*bins, dashboard], broker, janitor, stop, args.seconds)
    except KeyboardInterrupt:  # Ctrl-C while starting: stop what started, as later
        return 0
    finally:
        if janitor is not None:
            janitor.close()
        stop_all(bins)  # bins first: each finishes its item and publishes offline
        if dashboard is not None:
            dashboard.stop()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
        print("smartbin demo: stopped", flush=True)


def _watch(children: list[Child], broker: Broker, janitor: Janitor, stop: threading.Event,
           seconds: float | None) -> int:
    end = None if seconds is None else time.monotonic() + seconds
    while not stop.wait(TICK_S):
        if not broker.running:
            print(f"smartbin demo: the broker stopped by itself; see "
                  f"{broker.folder / 'broker.log'}", file=sys.stderr, flush=True)
            return 1
        for child in children:
            code = child.exited()
            if code is not None:
                print(f"smartbin demo: {child.name} stopped by itself (exit {code}): "
                      f"{child.last_words() or 'no message'}", file=sys.stderr, flush=True)
                return 1
        janitor.tick()
        if end is not None and time.monotonic() >= end:
            break
    return 0
