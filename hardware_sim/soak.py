"""`smartbin bench soak`: many items through the simulated bin, with faults, and proof that
nothing was lost or counted twice.

Two processes and a broker. The *service* (`python -m hardware_sim.soak worker`) is the bin
as `build_bin` makes it, on the simulator in fast mode, with a persistent simulated world
and the SQLite store in one state folder; a person in it drops generated items one after
another, some of them meeting the faults of a plan made beforehand (jams, failed captures,
failed classifier calls, a second item dropped mid-sort, a full disk). The *benchmark*
(this module's `run_soak`) starts a real mosquitto, listens to the bin's events like a
dashboard, SIGKILLs the service at planned items (at a random moment of the next cycles)
and starts it again where it stopped, stops the broker for a few seconds now and then,
and at the end compares three records that are kept apart:

- the simulated world's: every item that landed, in which compartment, and its true bin
  (jammed items are taken off the flap by hand: `removed`);
- the database's counts;
- the events the listener received, by `seq`.

Items land and are counted one at a time, in the same order, so the k-th item the world
saw land is the item of event `seq` k: that pairs each event with its item's truth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bin_controller.bins import BINS
from bin_controller.errors import SmartbinError
from hardware_sim import items as kinds
from hardware_sim.broker import Broker
from hardware_sim.mechanics import SimItem

log = logging.getLogger(__name__)

RSS_LIMIT_MB = 10.0  # growth allowed between item 1,000 and the end (the bound)
RSS_FIRST_ITEM = 1000  # where the memory baseline is taken (past start-up and warm-up)
RSS_SAMPLE_EVERY = 1000  # items between the samples of the report's memory series
# Fault rates per item of a --faults plan: a few hundred faults in 100,000 items.
JAM_RATE = 1 / 400
CAMERA_FAIL_RATE = 1 / 150
CLASSIFIER_FAIL_RATE = 1 / 150
DOUBLE_DROP_RATE = 1 / 1000
MAX_FAILED_CALLS = 4  # 1-2 failed calls are absorbed by model.retries (2); 3-4 fail the item
# Length of the disk-full episode. A full disk still lets SQLite reuse the free pages inside
# the database (the outbox's churn frees a few), so the journal must grow by more than
# those before the store meets the limit: about 35 items per 4 KB page.
DISK_FULL_ITEMS = 300
# And not soon after a broker outage: the outbox backlog it leaves behind is free pages
# enough for hundreds of items.
OUTAGE_SHADOW = 1500
ITEMS_PER_KILL = 4000  # default kill count: one per this many items ("every few thousand")
ITEMS_PER_BROKER_RESTART = 10_000
OUTAGE_S = (2.0, 5.0)  # how long the broker stays down
# A kill lands in the cycles after its item, within this many items; no jam, double drop
# or disk-full item is planned there. A SIGKILL while a jammed (already counted) item lies
# on the flap would have it counted again at restart, and one between an item and the
# second item that slid through behind it loses the second one's count: both are limits
# of the service, reported by the soak's author, not what this benchmark measures.
KILL_WINDOW = 8
KILL_DELAY_S = (0.0, 0.04)  # after the kill item is reported: anywhere in the next cycles
KILL_WAIT_S = 120.0  # the service waits this long to be killed before it carries on
JAM_S = 0.3  # the bin's sensor.jam_s in the soak (no mechanics delays in fast mode)
JAM_CLEAR_S = 0.1  # the operator takes the jammed item off the flap this long after
HARVEST_EVERY = 25  # items between hand-overs of the landed record to the log (small: the
# world file is rewritten on every landing)
ITEM_TIMEOUT_S = 30.0  # an item that takes longer has stopped the bin: the service exits
DRAIN_S = 120.0  # at the end the service waits this long for the broker to take its outbox
DELIVERY_S = 120.0  # and the benchmark this long for every event to reach its listener
MAX_CRASHES = 5  # unplanned service exits the benchmark restarts (as systemd would)
STUCK_EXIT = 3

LANDED_LOG = "soak-landed.jsonl"
PLAN_FILE = "soak-plan.json"
WORLD = "sim-world"
BIN_ID = "soak"


# ---------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Which items meet which trouble (1-based item numbers over the whole soak)."""

    items: int
    seed: int
    kills: list[int] = field(default_factory=list)
    broker_restarts: list[int] = field(default_factory=list)
    jam: list[int] = field(default_factory=list)
    camera_fail: dict[int, int] = field(default_factory=dict)
    classifier_fail: dict[int, int] = field(default_factory=dict)
    double_drop: list[int] = field(default_factory=list)
    disk_full: list[tuple[int, int]] = field(default_factory=list)  # (from item, for n)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Plan:
        raw = json.loads(path.read_text(encoding="utf-8"))
        for key in ("camera_fail", "classifier_fail"):
            raw[key] = {int(k): v for k, v in raw[key].items()}
        raw["disk_full"] = [tuple(pair) for pair in raw["disk_full"]]
        return cls(**raw)

    def summary(self) -> dict[str, int]:
        return {"kills": len(self.kills), "broker_restarts": len(self.broker_restarts),
                "jams": len(self.jam), "camera_failures": len(self.camera_fail),
                "classifier_failures": len(self.classifier_fail),
                "double_drops": len(self.double_drop),
                "disk_full_items": sum(n for _, n in self.disk_full)}


def make_plan(items: int, seed: int, *, faults: bool, disk_full: bool = False,
              kills: int | None = None, broker_restarts: int | None = None) -> Plan:
    """A random plan. No jam, double drop or disk-full item lies where a kill may land."""
    rng = random.Random(seed)
    plan = Plan(items, seed)
    near_kill: set[int] = set()
    if faults:
        want = max(2, items // ITEMS_PER_KILL) if kills is None else kills
        plan.kills = _spread(rng, items, want)
        for k in plan.kills:
            near_kill.update(range(k - 1, k + KILL_WINDOW + 1))
        restarts = (max(1, items // ITEMS_PER_BROKER_RESTART) if broker_restarts is None
                    else broker_restarts)
        plan.broker_restarts = sorted(rng.sample(range(1, items + 1), min(restarts, items)))
    if disk_full:
        length = max(1, min(DISK_FULL_ITEMS, items // 4))
        starts = [n for n in range(2, items - length + 1)
                  if near_kill.isdisjoint(range(n, n + length + 1))]
        quiet = [n for n in starts if not any(n - OUTAGE_SHADOW <= b <= n + length
                                              for b in plan.broker_restarts)]
        if starts:
            plan.disk_full = [(rng.choice(quiet or starts), length)]
    if faults:
        _scatter(rng, plan, near_kill)
    return plan


def _spread(rng: random.Random, items: int, want: int) -> list[int]:
    """Up to `want` kill items, two kill windows apart at least, and a window before the
    end (the service must still be sorting when the kill comes)."""
    chosen: list[int] = []
    candidates = list(range(2, items - KILL_WINDOW))
    rng.shuffle(candidates)
    for k in candidates:
        if len(chosen) == want:
            break
        if all(abs(k - c) > 2 * KILL_WINDOW for c in chosen):
            chosen.append(k)
    return sorted(chosen)


def _scatter(rng: random.Random, plan: Plan, near_kill: set[int]) -> None:
    """At most one fault per item; a double drop's second item has none of its own. Failed
    captures and classifier calls may meet a kill: the item is still on the flap."""
    n = 1
    while n <= plan.items:
        r = rng.random()
        if r < JAM_RATE:
            if n not in near_kill:
                plan.jam.append(n)
        elif r < JAM_RATE + DOUBLE_DROP_RATE:
            if n < plan.items and near_kill.isdisjoint((n, n + 1)):
                plan.double_drop.append(n)
                n += 1
        elif r < JAM_RATE + DOUBLE_DROP_RATE + CAMERA_FAIL_RATE:
            plan.camera_fail[n] = rng.randint(1, MAX_FAILED_CALLS)
        elif r < JAM_RATE + DOUBLE_DROP_RATE + CAMERA_FAIL_RATE + CLASSIFIER_FAIL_RATE:
            plan.classifier_fail[n] = rng.randint(1, MAX_FAILED_CALLS)
        n += 1


# ---------------------------------------------------------------------- the service


def rss_kb(pid: int | str = "self") -> int | None:
    """Resident memory of a process (Linux), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def make_item(seed: int, number: int) -> SimItem:
    """Item `number` of the soak: the same picture whichever process drops it."""
    rng = np.random.default_rng((seed, number))
    kind = kinds.KINDS[int(rng.integers(len(kinds.KINDS)))]
    return SimItem(number, kind.name, kind.bin, kinds.render(kind, rng), label_en=kind.name_en)


def _batches(plan: Plan, first: int) -> Iterator[list[int]]:
    """Item numbers from `first`, one drop at a time (a double drop is two)."""
    double = set(plan.double_drop)
    n = first
    while n <= plan.items:
        batch = [n, n + 1] if n in double and n < plan.items else [n]
        yield batch
        n = batch[-1] + 1


def _prefetched(plan: Plan, first: int) -> Iterator[tuple[list[int], list[SimItem]]]:
    """The batches with their items, each drawn while the one before is being sorted (the
    drawing would otherwise be a third of the soak's time)."""
    with ThreadPoolExecutor(1, thread_name_prefix="soak-person") as pool:
        def draw(batch: list[int]) -> list[SimItem]:
            return [make_item(plan.seed, m) for m in batch]

        batches = _batches(plan, first)
        batch = next(batches, None)
        upcoming = pool.submit(draw, batch) if batch else None
        while batch is not None and upcoming is not None:
            items = upcoming.result()
            following = next(batches, None)
            upcoming = pool.submit(draw, following) if following else None
            yield batch, items
            batch = following


class Service:
    """The service under test, as its process runs it: the bin on the simulator, and a
    person dropping the plan's items from `first` to the end."""

    def __init__(self, state: Path, first: int, port: int) -> None:
        from bin_controller.config import FAST_MECHANICS, load_config, merge
        from hardware_sim.simulate import sim_config

        self.state, self.first = state, first
        self.plan = Plan.load(state / PLAN_FILE)
        overrides = merge(FAST_MECHANICS, {
            "bin": {"id": BIN_ID, "state_dir": str(state)},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port},
            "sensor": {"jam_s": JAM_S}})
        self.cfg = sim_config(load_config(None, overrides), fast=True, world=state / WORLD)
        self.disk_on = {at for at, _ in self.plan.disk_full}
        self.disk_off = {at + n for at, n in self.plan.disk_full}
        self._unharvested = 0
        self._kill_by = 0  # the item after which the service waits for its planned kill

    def run(self) -> int:
        from hardware_sim.simulate import Simulation

        with open(self.state / LANDED_LOG, "a", encoding="utf-8") as self._log, \
                Simulation(self.cfg) as simulation:
            for batch, dropped in _prefetched(self.plan, self.first):
                if not self._sort(simulation, batch, dropped):
                    print(f"stuck {batch[0]}", flush=True)
                    return STUCK_EXIT
                self._after(simulation, batch)
            simulation.world.hand_over_landed(self._keep)
            telemetry = simulation.bin.telemetry
            if telemetry is not None and not telemetry.drain(DRAIN_S):
                print("undrained", flush=True)
            print(f"done {self.plan.items} {rss_kb()}", flush=True)
        return 0

    def _sort(self, simulation: Any, batch: list[int], dropped: list[SimItem]) -> bool:
        from hardware_sim.simulate import Faults

        plan, n = self.plan, batch[0]
        if self.disk_on.intersection(batch):
            simulation.fill_disk()
        elif self.disk_off.intersection(batch):
            simulation.free_disk()
        faults = Faults(jam={1} if n in plan.jam else set(),
                        camera_fail={1: plan.camera_fail.get(n, 0)},
                        classifier_fail={1: plan.classifier_fail.get(n, 0)},
                        double_drop={1} if len(batch) == 2 else set(),
                        jam_clear_s=JAM_CLEAR_S)
        result = simulation.drop(dropped, faults=faults, item_timeout_s=ITEM_TIMEOUT_S)
        simulation.events.clear()  # the world and the database keep the record
        return not result.timed_out

    def _after(self, simulation: Any, batch: list[int]) -> None:
        """Hand the landed record over now and then; report; expect a planned kill."""
        self._unharvested += len(batch)
        if self._unharvested >= HARVEST_EVERY:
            simulation.world.hand_over_landed(self._keep)
            self._unharvested = 0
        last = batch[-1]
        print(f"item {last} {rss_kb()}", flush=True)
        if set(self.plan.kills).intersection(batch):
            print(f"kill {last}", flush=True)
            self._kill_by = last + KILL_WINDOW - 1
        if self._kill_by and last >= self._kill_by:
            # The benchmark was slow to kill: wait for it here rather than walk into a
            # planned fault with the kill still to come.
            time.sleep(KILL_WAIT_S)
            print(f"kill-missed {self._kill_by}", flush=True)
            self._kill_by = 0

    def _keep(self, entries: list[dict]) -> None:
        # Written before the world forgets them; a SIGKILL keeps what was written.
        self._log.write("".join(json.dumps(e) + "\n" for e in entries))
        self._log.flush()


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m hardware_sim.soak worker")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return Service(args.state_dir, args.first, args.port).run()


# ---------------------------------------------------------------------- the dashboard


class EventListener:
    """Subscribes like a dashboard (persistent session, QoS 1) and keeps, per `seq`, the
    bin the event names; also the retained counts and the faults reported."""

    def __init__(self, port: int, base: str) -> None:
        import paho.mqtt.client as mqtt

        self.base = base
        self.bins: dict[int, str] = {}
        self.duplicates = 0
        self.conflicts = 0  # the same seq naming another bin: never allowed
        self.malformed = 0
        self.counts_total: int | None = None
        self.faults: Counter[str] = Counter()
        self._changed = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="smartbin-soak-listener", clean_session=False)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        client.subscribe([(f"{self.base}/event", 1), (f"{self.base}/counts", 1),
                          (f"{self.base}/fault", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            data = json.loads(msg.payload)
            topic = msg.topic.removeprefix(self.base + "/")
            with self._changed:
                if topic == "event":
                    self._event(int(data["seq"]), str(data["bin"]))
                elif topic == "counts":
                    self.counts_total = int(data["total"])
                elif topic == "fault":
                    self.faults[str(data.get("kind", "?"))] += 1
                self._changed.notify_all()
        except (ValueError, TypeError, KeyError):
            self.malformed += 1

    def _event(self, seq: int, bin_name: str) -> None:
        seen = self.bins.get(seq)
        if seen is None:
            self.bins[seq] = bin_name
        elif seen != bin_name:
            self.conflicts += 1
        else:
            self.duplicates += 1

    def wait_complete(self, total: int, timeout: float) -> bool:
        """Until every seq from 1 to `total` has come, and the retained counts say total."""
        def complete() -> bool:
            return len(self.bins) >= total and self.counts_total == total and all(
                s in self.bins for s in range(1, total + 1))

        with self._changed:
            return self._changed.wait_for(complete, timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------------- the records


def read_world(state: Path) -> tuple[list[dict], int]:
    """Every item the world saw land, in order, once each; and how many lie on the flap."""
    entries: list[dict] = []
    log_path = state / LANDED_LOG
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            # A line cut short by a kill: the world file still holds its entry.
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    platform: list[dict] = []
    world_file = state / WORLD / "world.json"
    if world_file.is_file():
        world = json.loads(world_file.read_text(encoding="utf-8"))
        entries += world["landed"]
        platform = world["platform"]
    seen: set[str] = set()
    ordered = []
    for entry in entries:
        if entry["uid"] not in seen:
            seen.add(entry["uid"])
            ordered.append(entry)
    return ordered, len(platform)


def items_dropped(state: Path) -> int:
    landed, on_flap = read_world(state)
    return len(landed) + on_flap


def read_database(state: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{state / 'smartbin.db'}?mode=ro", uri=True)
    try:
        counts = dict(db.execute("SELECT bin, n FROM counts").fetchall())
        return {"counts": {b: int(counts.get(b, 0)) for b in BINS},
                "pending": int(db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]),
                "outbox": int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]),
                "seq": int(db.execute("SELECT value FROM meta WHERE key='seq'")
                           .fetchone()[0])}
    finally:
        db.close()


def evaluate(*, items: int, world: list[dict], on_flap: int, database: dict[str, Any],
             events: dict[int, str], duplicates: int, conflicts: int,
             counts_total: int | None, rss_first_kb: int | None, rss_end_kb: int | None,
             crashes: int, faults_reported: dict[str, int] | None = None,
             disk_full_planned: bool = False) -> dict[str, Any]:
    """The figures and the checks, from the three records (see the module doc)."""
    counts = database["counts"]
    landed = dict.fromkeys(BINS, 0)
    removed_counted_in = dict.fromkeys(BINS, 0)  # jammed items taken off by hand
    wrong_world = dict.fromkeys(BINS, 0)
    wrong_events = dict.fromkeys(BINS, 0)
    disagreements = 0  # events whose bin is not where their item landed
    for seq, entry in enumerate(world, start=1):
        event_bin = events.get(seq)
        if entry["compartment"] == "removed":
            if event_bin in removed_counted_in:
                removed_counted_in[event_bin] += 1
            continue
        b = entry["compartment"]
        landed[b] += 1
        if entry["true_bin"] != b:
            wrong_world[b] += 1
        if event_bin is not None:
            disagreements += event_bin != b
            if event_bin in wrong_events and entry["true_bin"] != event_bin:
                wrong_events[event_bin] += 1
    dropped = len(world) + on_flap
    missing = [s for s in range(1, dropped + 1) if s not in events]
    beyond = sorted(s for s in events if s > dropped)
    total = sum(counts.values())
    rss_growth = (None if rss_first_kb is None or rss_end_kb is None
                  else round((rss_end_kb - rss_first_kb) / 1024, 1))
    checks = {
        "counts_equal_items_dropped": total == dropped == items and on_flap == 0
        and database["pending"] == 0,
        "per_compartment_equal_world": all(
            counts[b] == landed[b] + removed_counted_in[b] for b in BINS),
        "every_seq_delivered": not missing and not beyond and conflicts == 0,
        "contamination_consistent": wrong_world == wrong_events and disagreements == 0,
        "retained_counts_equal": counts_total == total,
        "memory_within_limit": rss_growth is not None and rss_growth <= RSS_LIMIT_MB,
        "no_crashes": crashes == 0,
    }
    if disk_full_planned:
        # The store says so when the disk is full (and keeps counting in memory).
        checks["disk_full_reported"] = bool((faults_reported or {}).get("disk_full"))
    return {
        "items": items,
        "items_dropped": dropped,
        "counted": {**counts, "total": total},
        "world": {"landed": landed, "removed_by_hand_counted_in": removed_counted_in,
                  "on_flap": on_flap},
        "database": {"pending": database["pending"], "outbox": database["outbox"],
                     "seq": database["seq"]},
        "events": {"received": len(events), "duplicates": duplicates,
                   "conflicting": conflicts, "missing": missing[:20],
                   "missing_count": len(missing), "beyond_last": beyond[:20],
                   "disagreeing_with_world": disagreements},
        "contamination": {"world": wrong_world, "events": wrong_events},
        "memory": {"rss_at_item_kb": rss_first_kb, "rss_end_kb": rss_end_kb,
                   "growth_mb": rss_growth, "limit_mb": RSS_LIMIT_MB},
        "crashes": crashes,
        "faults_reported": dict(faults_reported or {}),
        "checks": checks,
        "ok": all(checks.values()),
    }


# ---------------------------------------------------------------------- the benchmark


@dataclass
class Process:
    """One life of the service, as the benchmark saw it."""

    first: int
    pid: int
    last_item: int = 0
    items: int = 0
    rss_start_kb: int | None = None
    rss_end_kb: int | None = None
    end: str = "running"


class Soak:
    def __init__(self, state: Path, plan: Plan, *, progress: Callable[[str], None]) -> None:
        self.state, self.plan, self.progress = state, plan, progress
        self.broker = Broker(state / "broker")
        self.processes: list[Process] = []
        self.crashes = 0
        self.rss_first_kb: int | None = None  # when item RSS_FIRST_ITEM was sorted
        self.rss_end_kb: int | None = None
        self.rss_series: list[tuple[int, int]] = []  # (item, resident kB) every 1,000 items
        self._restarts = list(plan.broker_restarts)
        self._outages: list[threading.Thread] = []
        self._closing = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._rng = random.Random(plan.seed + 1)
        self._report_every = max(1000, plan.items // 10)
        self._next_report = self._report_every

    def run(self) -> None:
        self.broker.start()
        self.listener = EventListener(self.broker.port, f"smartbin/{BIN_ID}")
        while True:
            end = self._life(items_dropped(self.state) + 1)
            if end == "done":
                break
            if end != "killed":
                self.crashes += 1
                if self.crashes > MAX_CRASHES:
                    raise SmartbinError(f"the service stopped {self.crashes} times without "
                                        f"being killed; see {self.state / 'logs'}")
        for outage in self._outages:
            outage.join()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:  # interrupted: end it too
            self._proc.kill()
            self._proc.wait()
        self._closing.set()
        for outage in self._outages:
            outage.join()
        if hasattr(self, "listener"):
            self.listener.close()
        self.broker.stop()

    def _life(self, first: int) -> str:
        """Start the service at item `first` and watch it until it ends; returns how."""
        logs = self.state / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"service-{len(self.processes) + 1}.log", "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hardware_sim.soak", "worker", "--state-dir",
                 str(self.state), "--first", str(first), "--port", str(self.broker.port)],
                stdout=subprocess.PIPE, stderr=err, text=True)
        self._proc = proc
        life = Process(first, proc.pid)
        self.processes.append(life)
        killed = False
        assert proc.stdout is not None
        for line in proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word in ("item", "done"):
                self._item(life, rest)
                life.end = "done" if word == "done" else life.end
            elif word == "kill" and not killed:
                time.sleep(self._rng.uniform(*KILL_DELAY_S))
                life.rss_end_kb = rss_kb(proc.pid) or life.rss_end_kb
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        code = proc.wait()
        if killed:
            life.end = "killed"
        elif life.end != "done" or code != 0:
            life.end = f"exited {code}"
        return life.end

    def _item(self, life: Process, rest: str) -> None:
        parts = rest.split()
        number = int(parts[0])
        rss = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        life.items += number - max(life.last_item, life.first - 1)
        life.last_item = number
        if rss is not None:
            life.rss_start_kb = life.rss_start_kb or rss
            life.rss_end_kb = rss
            if self.rss_first_kb is None and number >= min(RSS_FIRST_ITEM, self.plan.items):
                self.rss_first_kb = rss
            if number >= self.plan.items:
                self.rss_end_kb = rss
            if not self.rss_series or number >= self.rss_series[-1][0] + RSS_SAMPLE_EVERY:
                self.rss_series.append((number, rss))
        while self._restarts and number >= self._restarts[0]:
            self._restarts.pop(0)
            outage = threading.Thread(target=self._outage, daemon=True)
            outage.start()
            self._outages.append(outage)
        if number >= self._next_report:
            self.progress(f"  {number:>7,} items, {len(self.processes)} service start(s)")
            self._next_report = number + self._report_every

    def _outage(self) -> None:
        seconds = self._rng.uniform(*OUTAGE_S)
        self.broker.stop()
        self._closing.wait(seconds)
        self.broker.start()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=100_000, help="items to drop (default 100000)")
    p.add_argument("--faults", action="store_true",
                   help="jams, camera and classifier failures, double drops, SIGKILLs of the "
                        "service and broker restarts")
    p.add_argument("--disk-full", action="store_true",
                   help=f"a disk-full episode of {DISK_FULL_ITEMS} items (the count database "
                        "may not grow)")
    p.add_argument("--kills", type=int, default=None,
                   help=f"SIGKILLs of the service (default with --faults: one per "
                        f"{ITEMS_PER_KILL} items, at least 2)")
    p.add_argument("--broker-restarts", type=int, default=None,
                   help=f"broker outages (default with --faults: one per "
                        f"{ITEMS_PER_BROKER_RESTART} items, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", type=Path,
                   help="an empty or new folder for the service's state, the world, the "
                        "broker and the logs (default: a temporary folder, kept on failure)")
    p.add_argument("--report", type=Path, help="write the JSON report here")


def _validate(args: argparse.Namespace) -> None:
    if args.items < 1:
        raise SmartbinError(f"--items {args.items}: give 1 or more")
    if args.seed < 0:
        raise SmartbinError(f"--seed {args.seed}: give 0 or more")
    for name in ("kills", "broker_restarts"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise SmartbinError(f"--{name.replace('_', '-')} {value}: give 0 or more")
    state = args.state_dir
    if state is not None and state.exists() and (not state.is_dir() or any(state.iterdir())):
        raise SmartbinError(f"--state-dir {state}: give an empty or new folder (a soak "
                            "starts from zero counts)")


def run_soak(args: argparse.Namespace) -> int:
    _validate(args)
    plan = make_plan(args.items, args.seed, faults=args.faults, disk_full=args.disk_full,
                     kills=args.kills, broker_restarts=args.broker_restarts)
    temporary = args.state_dir is None
    state = Path(tempfile.mkdtemp(prefix="smartbin-soak-")) if temporary else args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    plan.save(state / PLAN_FILE)
    injected = plan.summary()
    print(f"soak: {args.items:,} items, seed {args.seed}; "
          + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in injected.items()), flush=True)
    started = time.monotonic()
    soak = Soak(state, plan, progress=lambda text: print(text, flush=True))
    try:
        soak.run()
        delivered = soak.listener.wait_complete(args.items, DELIVERY_S)
        wall = time.monotonic() - started
        report = _report(soak, plan, state)
    except SmartbinError:
        if temporary:
            shutil.rmtree(state, ignore_errors=True)
        raise
    finally:
        soak.close()
    report.update(seed=args.seed, injected=injected, delivery_complete=delivered,
                  wall_s=round(wall, 1), items_per_s=round(args.items / wall, 1),
                  state_dir=None if temporary else str(state))
    _print(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if report["ok"]:
        if temporary:
            shutil.rmtree(state, ignore_errors=True)
        return 0
    print(f"smartbin: soak failed: {', '.join(k for k, v in report['checks'].items() if not v)}"
          f"; state kept in {state}", file=sys.stderr)
    return 1


def _report(soak: Soak, plan: Plan, state: Path) -> dict[str, Any]:
    world, on_flap = read_world(state)
    listener = soak.listener
    report = evaluate(
        items=plan.items, world=world, on_flap=on_flap, database=read_database(state),
        events=listener.bins, duplicates=listener.duplicates, conflicts=listener.conflicts,
        counts_total=listener.counts_total, rss_first_kb=soak.rss_first_kb,
        rss_end_kb=soak.rss_end_kb, crashes=soak.crashes, faults_reported=dict(listener.faults),
        disk_full_planned=bool(plan.disk_full))
    report["memory"].update(rss_at_item=min(RSS_FIRST_ITEM, plan.items),
                            series_kb=soak.rss_series)
    report["processes"] = [asdict(p) for p in soak.processes]
    return report


def _print(r: dict[str, Any]) -> None:
    def mark(check: str) -> str:
        return "ok" if r["checks"][check] else "FAILED"

    c, w, e, m = r["counted"], r["world"], r["events"], r["memory"]
    removed = sum(w["removed_by_hand_counted_in"].values())
    print(f"items dropped {r['items_dropped']:,}; counted {c['total']:,} ("
          + ", ".join(f"{b} {c[b]:,}" for b in BINS) + f"); pending {r['database']['pending']}"
          f"  [{mark('counts_equal_items_dropped')}]")
    print("per compartment, counted = landed in the world + jammed items taken off by hand "
          f"({removed}): " + ", ".join(
              f"{b} {w['landed'][b]:,}+{w['removed_by_hand_counted_in'][b]}" for b in BINS)
          + f"  [{mark('per_compartment_equal_world')}]")
    print(f"events: seq 1..{r['items_dropped']:,}, {e['received']:,} received, "
          f"{e['missing_count']} missing, {e['duplicates']} duplicates"
          f"  [{mark('every_seq_delivered')}]")
    print("contamination (world / events): " + ", ".join(
        f"{b} {r['contamination']['world'][b]}/{r['contamination']['events'][b]}"
        for b in BINS) + f"; events naming another compartment than the world "
        f"{e['disagreeing_with_world']}  [{mark('contamination_consistent')}]")
    print(f"retained counts total: {c['total']:,}  [{mark('retained_counts_equal')}]")

    def mb(kb: int | None) -> str:
        return "?" if kb is None else f"{kb / 1024:.1f} MB"

    growth = "?" if m["growth_mb"] is None else f"{m['growth_mb'] + 0:+.1f} MB"
    print(f"service memory: {mb(m['rss_at_item_kb'])} at item {m['rss_at_item']:,}, "
          f"{mb(m['rss_end_kb'])} at the end ({growth}; limit {m['limit_mb']:g} MB)"
          f"  [{mark('memory_within_limit')}]")
    ends = Counter(p["end"] for p in r["processes"])
    print(f"service lives: {len(r['processes'])} (" + ", ".join(
        f"{v} {k}" for k, v in ends.items()) + f"); faults reported "
        f"{r.get('faults_reported') or 'none'}  [{mark('no_crashes')}]")
    if "disk_full_reported" in r["checks"]:
        print(f"disk-full episode reported by the service  [{mark('disk_full_reported')}]")
    print(f"wall time {r['wall_s']:,} s ({r['items_per_s']} items/s)")


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m hardware_sim.soak worker ... (started by smartbin bench soak)")
    sys.exit(worker_main(sys.argv[2:]))
