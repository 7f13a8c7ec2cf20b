"""`smartbin simulate`: the whole bin on a laptop, with a line per item and a summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bin_controller.bins import BINS
from bin_controller.cli import MAX_SEED, name_or_path, number, path_arg, quote, whole
from bin_controller.config import load_config, merge
from bin_controller.errors import SmartbinError
from bin_controller.fill import Emptied
from bin_controller.overrides import cli_overrides
from hardware_sim.mechanics import SimItem
from hardware_sim.simulate import EMPTY_AFTER_S, Faults, Simulation, sim_config
from hardware_sim.sources import FolderSource, GeneratedSource

if TYPE_CHECKING:
    from bin_controller.cli import CommandTables


# A slow classifier for one item is a delay of seconds; hours would only hang the run.
MAX_SLOW_S = 600.0
# What the simulated operator leaves a jam for, and the bin's jam time in a run with jams
# (not the bin's 4 s), unless the config's flap times need longer.
JAM_S = 1.0


def item_numbers(text: str) -> set[int]:
    """An argparse type: 1-based item numbers, e.g. 3,7."""
    parse = whole(1)
    try:
        numbers = {parse(part) for part in text.split(",") if part.strip()}
    except argparse.ArgumentTypeError:
        numbers = set()
    if not numbers:
        raise argparse.ArgumentTypeError(
            f"expected item numbers such as 3,7 (each 1 or more), not {quote(text)}")
    return numbers


def item_pairs(what: str, parse_value: Callable[[str], float], default: float,
               example: str, allowed: str) -> Callable[[str], dict[int, float]]:
    """An argparse type: ITEM[:VALUE],... with VALUE read by `parse_value`."""
    parse_item = whole(1)

    def parse(text: str) -> dict[int, float]:
        out: dict[int, float] = {}
        try:
            for part in text.split(","):
                if part.strip():
                    n, colon, value = part.partition(":")
                    out[parse_item(n)] = parse_value(value) if colon else default
        except argparse.ArgumentTypeError:
            out = {}
        if not out:
            raise argparse.ArgumentTypeError(
                f"expected ITEM[:{what}],... such as {example} (item 1 or more, {allowed}), "
                f"not {quote(text)}")
        return out
    return parse


def cover_arg(text: str) -> dict[int, str]:
    """An argparse type: BIN:ITEM,... (whose fill sensor a sheet covers from which item)."""
    parse_item = whole(1)
    out: dict[int, str] = {}
    try:
        for part in text.split(","):
            if part.strip():
                b, colon, n = part.partition(":")
                if not colon or b.strip() not in BINS:
                    raise argparse.ArgumentTypeError(text)
                out[parse_item(n)] = b.strip()
    except argparse.ArgumentTypeError:
        out = {}
    if not out:
        raise argparse.ArgumentTypeError(
            f"expected BIN:ITEM such as kitchen:5 (bins {', '.join(BINS)}; item 1 or more), "
            f"not {quote(text)}")
    return out


def fill_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--capacity-l, --fill-sensor and --when-full over the config's [fill]."""
    fill: dict[str, Any] = {}
    if args.capacity_l is not None:
        fill["capacity_l"] = dict.fromkeys(BINS, args.capacity_l)
    if args.fill_sensor is not None:
        fill["sensor"] = args.fill_sensor
    if args.when_full is not None:
        fill["when_full"] = args.when_full
    return {"fill": fill} if fill else {}


class FillLines:
    """Prints the fill levels as the run goes: a line when a level has moved 10 points (or
    changed state) since the last one, and one per emptying."""

    STEP = 10.0

    def __init__(self, simulation: Simulation) -> None:
        self.simulation = simulation
        self.shown: dict[str, tuple[float, str]] = {}
        simulation.on_emptied.append(self.emptied)

    def after_item(self) -> None:
        fill = self.simulation.fill
        if fill is None:
            return
        levels = fill.snapshot()
        now = {b: (levels[b]["pct"], levels[b]["state"]) for b in BINS}
        if self.shown and all(abs(now[b][0] - self.shown[b][0]) < self.STEP
                              and now[b][1] == self.shown[b][1] for b in BINS):
            return
        self.shown = now
        parts = []
        for b in BINS:
            pct, state = now[b]
            flag = "" if state == "ok" else f" {state.upper()}"
            fault = " sensor fault" if levels[b]["sensor_fault"] else ""
            parts.append(f"{b} {pct:3.0f}%{flag}{fault}")
        print("      fill: " + ", ".join(parts), flush=True)

    def emptied(self, event: Emptied) -> None:
        print(f"      emptied {event.bin} ({event.source}): it was {event.pct_before:.0f} % "
              f"full with {event.items} items", flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=path_arg, help="TOML configuration (default: built-in)")
    p.add_argument("--model", type=name_or_path,
                   help="model bundle (default: the config's, i.e. demo)")
    p.add_argument("--backbone", type=name_or_path,
                   help="local file or folder for a downloadable backbone")
    p.add_argument("--images", type=path_arg,
                   help="folder of class subfolders to photograph (default: generated items)")
    p.add_argument("--bin-map", type=path_arg,
                   help="JSON class -> bin for --images (default: from <bin>_<item> names)")
    p.add_argument("--items", type=whole(1), default=20,
                   help="how many items to drop (default 20)")
    p.add_argument("--seed", type=whole(0, MAX_SEED), default=0)
    p.add_argument("--fast", action="store_true", help="no mechanical delays")
    p.add_argument("--report", type=path_arg, help="write a JSON report here")
    p.add_argument("--jam", type=item_numbers, default=set(),
                   help="item numbers that jam, e.g. 3,7")
    p.add_argument("--camera-fail", default={}, help="ITEM[:FAILURES],... failed captures for "
                   "an item", type=item_pairs("FAILURES", whole(1), 1, "5:3",
                                              "failures 1 or more"))
    p.add_argument("--slow", default={}, help="ITEM[:SECONDS],... a slow classifier for an item",
                   type=item_pairs("SECONDS", number(0, MAX_SLOW_S), 1.0, "6:0.5",
                                   f"seconds from 0 to {MAX_SLOW_S:g}"))
    p.add_argument("--double-drop", type=item_numbers, default=set(),
                   help="item numbers followed by a second item mid-sort")
    p.add_argument("--classifier-fail", default={}, help="ITEM[:FAILURES],... failed "
                   "classifier calls for an item", type=item_pairs(
                       "FAILURES", whole(1), 1, "4:2", "failures 1 or more"))
    p.add_argument("--disk-full-at", default={}, help="ITEM:N,... the disk is full from ITEM "
                   "for N items (the count database may not grow)", type=item_pairs(
                       "N", whole(1), 1, "10:5", "N 1 or more"))
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish to this MQTT broker")
    p.add_argument("--bin-id", help="bin id in topics (default: the host name)")
    p.add_argument("--state-dir", type=path_arg,
                   help="count database folder (default: a fresh temporary folder)")
    p.add_argument("--pace", type=number(0, 3600), default=0.0,
                   help="seconds between one item landing and the next drop")
    p.add_argument("--capacity-l", type=number(0, 100000, above=True),
                   help="litres of every compartment (fill.capacity_l; default: the config's)")
    p.add_argument("--fill-sensor", choices=("none", "ultrasonic"),
                   help="fill.sensor: none (estimate from the items) or ultrasonic "
                        "(default: the config's)")
    p.add_argument("--when-full", choices=("fallback_bin", "pause", "hold"),
                   help="fill.when_full: what happens to an item for a full compartment")
    p.add_argument("--cover-sensor", type=cover_arg, default={}, metavar="BIN:ITEM",
                   help="a sheet covers BIN's fill sensor from item ITEM on (lifted by the "
                        "operator once the bin reports it)")
    p.add_argument("--empty-after", type=number(0, 3600), metavar="SECONDS",
                   help="the operator empties a full compartment this long after the alert "
                        f"(default {EMPTY_AFTER_S:g} s, 0 with --fast)")
    p.add_argument("--drain-s", type=number(0, 3600), default=30.0,
                   help="at the end, wait up to this long for the broker to take every event")


def _check_item_numbers(args: argparse.Namespace) -> None:
    """Item numbers past --items would silently do nothing."""
    for option, numbers in (("--jam", args.jam), ("--camera-fail", args.camera_fail),
                            ("--slow", args.slow), ("--double-drop", args.double_drop),
                            ("--classifier-fail", args.classifier_fail),
                            ("--disk-full-at", args.disk_full_at),
                            ("--cover-sensor", args.cover_sensor)):
        beyond = sorted(n for n in numbers if n > args.items)
        if beyond:
            raise SmartbinError(f"{option}: item {beyond[0]} is past the last item "
                                f"(--items {args.items})")


def _line(item: SimItem) -> str:
    e = item.events[0] if item.events else None
    got = "-" if not e else (
        f"{e.label_en or e.label or '?'} {e.confidence:.0%}" if e.confidence is not None
        else e.error or "failed")
    flag = "ok" if item.compartment == item.true_bin else "WRONG"
    notes = []
    if e and e.uncertain:
        notes.append("uncertain")
    if e and e.failed:
        notes.append("failed")
    if item.passed_unsorted:
        notes.append("passed unsorted")
    cycle = f"{e.cycle_ms:7.0f} ms" if e and e.cycle_ms else " " * 10
    name = (item.label_en or item.true_class)[:18]
    return (f"#{item.id:<4} {name:18} ({item.true_bin:10}) -> {got[:28]:28} "
            f"-> {(e.bin if e else '-'):10} landed {item.compartment!s:10} {flag:5} {cycle}"
            f" {' '.join(notes)}").rstrip()


def run(args: argparse.Namespace) -> int:
    _check_item_numbers(args)
    faults = Faults(
        jam=set(args.jam),
        camera_fail={k: int(v) for k, v in args.camera_fail.items()},
        slow_classifier_s=dict(args.slow),
        double_drop=set(args.double_drop),
        classifier_fail={k: int(v) for k, v in args.classifier_fail.items()},
        disk_full={k: int(v) for k, v in args.disk_full_at.items()},
        cover_sensor=dict(args.cover_sensor),
    )
    with ExitStack() as stack:
        state_dir = args.state_dir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="smartbin-sim-")))
        overrides = merge(merge(cli_overrides(args), {"bin": {"state_dir": str(state_dir)}}),
                          fill_overrides(args))
        cfg = load_config(args.config, overrides)
        if faults.jam:
            # The operator clears a jam after half a second: do not wait the bin's 4 s,
            # but no less than the flap's tip (the config check requires more).
            tip_s = cfg.flap.move_s + cfg.flap.hold_s
            jam_s = JAM_S if tip_s < JAM_S else round(tip_s + JAM_S / 2, 3)
            cfg = cfg.with_overrides({"sensor": {"jam_s": jam_s}})
        # With a kept state folder the simulated world is kept beside the counts, so a
        # killed and restarted run finds items where they were.
        world = state_dir / "sim-world" if args.state_dir else None
        cfg = sim_config(cfg, args.fast, world)
        if args.images:
            source: FolderSource | GeneratedSource = FolderSource(
                args.images, args.bin_map, args.seed, (cfg.camera.width, cfg.camera.height))
        else:
            source = GeneratedSource(args.seed)
        items = source.items(args.items)
        if faults.cover_sensor and cfg.fill.sensor == "none":
            raise SmartbinError("--cover-sensor: there is no fill sensor to cover; add "
                                "--fill-sensor ultrasonic")
        simulation = stack.enter_context(Simulation(cfg, empty_after_s=args.empty_after))
        on_item = None
        if not args.quiet:
            lines = FillLines(simulation)

            def on_item(item: SimItem) -> None:
                print(_line(item), flush=True)
                lines.after_item()
        smartbin = simulation.bin
        assert smartbin.store is not None  # no recorder given: the SQLite store
        model = cfg.model.bundle
        backend = smartbin.classifier.backend
        print(f"simulating {len(items)} items from {source.name} with model {model} "
              f"({backend}), {'fast' if args.fast else 'real-time'} mechanics", flush=True)
        result = simulation.drop(items, faults=faults, on_item=on_item, pace_s=args.pace)
        counts = smartbin.store.snapshot()
        if smartbin.telemetry is not None and not smartbin.telemetry.drain(args.drain_s):
            print(f"warning: {smartbin.store.outbox_size()} events still wait for the broker "
                  f"at {cfg.mqtt.host}:{cfg.mqtt.port}; they stay in {smartbin.store.path}",
                  file=sys.stderr)
    report = result.report()
    report.update(model=model, backend=backend, source=source.name, seed=args.seed,
                  stored_counts=counts)
    print()
    print(f"{'bin':12} {'routed':>7} {'truth':>7}")
    for b in BINS:
        truth = sum(1 for i in items if i.true_bin == b)
        print(f"{b:12} {report['routed'][b]:>7} {truth:>7}")
    print(f"items {len(items)}, counted {report['counted']}, landed in the right compartment "
          f"{report['correct']} ({report['bin_accuracy']:.1%}), uncertain {report['uncertain']}, "
          f"failed {report['failed']}, faults {report['faults'] or 'none'}")
    c = report["cycle_ms"]
    if c["p50"] is not None:
        print(f"cycle p50 {c['p50']:.0f} ms, p95 {c['p95']:.0f} ms; "
              f"{report['seconds']:.1f} s in all")
    fill = report.get("fill")
    if fill:
        print(f"fill ({fill['sensor']}, when full: {fill['when_full']}): " + ", ".join(
            f"{b} {fill[b]['final_pct']:.0f}% (full {fill[b]['full_events']}x, emptied "
            f"{fill[b]['emptied_events']}x, onto full {fill[b]['sorted_onto_full']})"
            for b in BINS) + f"; sensor faults {fill['sensor_faults']}")
    if args.report:
        args.report.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                               encoding="utf-8")
    if result.timed_out:
        print("smartbin: error: an item never finished its cycle (see the log)", file=sys.stderr)
        return 1
    return 0


def register(tables: CommandTables) -> None:
    """The simulator's commands, found by `smartbin` through the entry point group
    `smartbin.commands` (see pyproject.toml)."""
    p = tables.commands.add_parser("simulate", help="run the whole bin on simulated hardware")
    add_arguments(p)
    p.set_defaults(func=_simulate)
    from hardware_sim.demo import add_arguments as add_demo_arguments

    d = tables.commands.add_parser("demo", help="the laptop demo: a local broker, simulated "
                                   "bins and the web dashboard; Ctrl-C stops it all")
    add_demo_arguments(d)
    d.set_defaults(func=_demo)
    b = tables.bench.add_parser("cycle", help="sensor edge to servo command and to the item "
                                "counted (SQLite store, photo log), fast simulator")
    tables.add_model_options(b)
    b.add_argument("--config", type=path_arg)
    b.add_argument("--items", type=whole(1), default=200)
    b.add_argument("--images", type=path_arg,
                   help="folder of class subfolders (default: generated)")
    b.add_argument("--bin-map", type=path_arg)
    b.add_argument("--photos", choices=("all", "uncertain", "none"), default="all",
                   help="photos.keep for the run (default all): the photo log's cost")
    b.add_argument("--pace", type=number(0, 60), default=0.0,
                   help="seconds between one item landing and the next drop (default 0: "
                        "back to back, the photo writer still busy with the last item)")
    b.set_defaults(func=_bench_cycle)
    b = tables.bench.add_parser("dashboard", help="the web dashboard with a simulated fleet "
                                "and an open page in chromium: item latency, CPU, memory, "
                                "page size")
    from hardware_sim.bench_dashboard import add_arguments as add_dashboard_bench_arguments

    add_dashboard_bench_arguments(b)
    b.set_defaults(func=_bench_dashboard)
    b = tables.bench.add_parser("idle", help="CPU use of the idle service")
    tables.add_model_options(b)
    b.add_argument("--config", type=path_arg)
    b.add_argument("--seconds", type=number(0, above=True), default=30.0)
    b.set_defaults(func=_bench_idle)
    b = tables.bench.add_parser("soak", help="many items with faults, kills and broker "
                                             "restarts: nothing lost, nothing counted twice")
    b.set_defaults(func=_bench_soak)
    from hardware_sim.soak import add_arguments as add_soak_arguments

    add_soak_arguments(b)


def _simulate(args: argparse.Namespace) -> int:
    configure_logging(False)
    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from hardware_sim.demo import run_demo

    configure_logging(False)
    return run_demo(args)


def _bench_cycle(args: argparse.Namespace) -> int:
    from hardware_sim.bench import run_cycle

    return run_cycle(args)


def _bench_dashboard(args: argparse.Namespace) -> int:
    from hardware_sim.bench_dashboard import run_bench

    configure_logging(False)
    return run_bench(args)


def _bench_idle(args: argparse.Namespace) -> int:
    from hardware_sim.bench import run_idle

    return run_idle(args)


def _bench_soak(args: argparse.Namespace) -> int:
    from hardware_sim.soak import run_soak

    return run_soak(args)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
