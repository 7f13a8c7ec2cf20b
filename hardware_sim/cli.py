"""`smartbin simulate`: the whole bin on a laptop, with a line per item and a summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bin_controller.app import attach, cli_overrides, open_store
from bin_controller.bins import BINS
from bin_controller.config import load_config
from bin_controller.errors import SmartbinError
from bin_controller.vision.classifier import Classifier
from hardware_sim.mechanics import SimItem
from hardware_sim.simulate import Faults, run_simulation
from hardware_sim.sources import FolderSource, GeneratedSource


def _item_numbers(text: str | None) -> set[int]:
    return {int(x) for x in text.split(",") if x.strip()} if text else set()


def _pairs(text: str | None, kind) -> dict[int, float]:
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        n, _, value = part.partition(":")
        out[int(n)] = kind(value) if value else kind(1)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration (default: built-in)")
    p.add_argument("--model", help="model bundle (default: the config's, i.e. demo)")
    p.add_argument("--backbone", help="local file or folder for a downloadable backbone")
    p.add_argument("--images", type=Path,
                   help="folder of class subfolders to photograph (default: generated items)")
    p.add_argument("--bin-map", type=Path,
                   help="JSON class -> bin for --images (default: from <bin>_<item> names)")
    p.add_argument("--items", type=int, default=20, help="how many items to drop (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="no mechanical delays")
    p.add_argument("--report", type=Path, help="write a JSON report here")
    p.add_argument("--jam", help="item numbers that jam, e.g. 3,7")
    p.add_argument("--camera-fail", help="ITEM[:FAILURES],... failed captures for an item")
    p.add_argument("--slow", help="ITEM[:SECONDS],... a slow classifier for an item")
    p.add_argument("--double-drop", help="item numbers followed by a second item mid-sort")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish to this MQTT broker")
    p.add_argument("--bin-id", help="bin id in topics (default: the host name)")
    p.add_argument("--state-dir", type=Path,
                   help="count database folder (default: a fresh temporary folder)")
    p.add_argument("--pace", type=float, default=0.0,
                   help="seconds between one item landing and the next drop")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="at the end, wait up to this long for the broker to take every event")


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
    if args.items < 1:
        raise SmartbinError("--items must be 1 or more")
    cfg = load_config(args.config, cli_overrides(args))
    model = cfg.model.bundle
    classifier = Classifier(model, backend=cfg.model.backend, num_threads=cfg.model.threads,
                            backbone=cfg.model.backbone or None)
    if args.images:
        source = FolderSource(args.images, args.bin_map, args.seed,
                              (cfg.camera.width, cfg.camera.height))
    else:
        source = GeneratedSource(args.seed)
    items = source.items(args.items)
    faults = Faults(
        jam=_item_numbers(args.jam),
        camera_fail={k: int(v) for k, v in _pairs(args.camera_fail, int).items()},
        slow_classifier_s=_pairs(args.slow, float),
        double_drop=_item_numbers(args.double_drop),
    )
    if faults.jam:
        cfg = cfg.with_overrides({"sensor": {"jam_s": min(cfg.sensor.jam_s, 1.0)}})
    print(f"simulating {len(items)} items from {source.name} with model {model} "
          f"({classifier.backend}), {'fast' if args.fast else 'real-time'} mechanics",
          flush=True)
    on_item = None if args.quiet else (lambda item: print(_line(item), flush=True))
    with ExitStack() as stack:
        state_dir = args.state_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="smartbin-sim-"))
        store = open_store(cfg, state_dir)
        stack.callback(store.close)
        telemetry: list = []

        def on_loop(loop) -> None:
            t = attach(cfg, loop, store)
            if t is not None:
                telemetry.append(t)

        # With a kept state folder the simulated world is kept beside the counts, so a
        # killed and restarted run finds items where they were.
        world = Path(state_dir) / "sim-world" if args.state_dir else None
        result = run_simulation(cfg, items, classifier, fast=args.fast, faults=faults,
                                on_item=on_item, recorder=store, on_loop=on_loop,
                                world=world, pace_s=args.pace)
        counts = store.snapshot()
        if telemetry:
            drained = telemetry[0].drain(args.drain_s)
            telemetry[0].stop()
            if not drained:
                print(f"warning: {store.outbox_size()} events still wait for the broker at "
                      f"{cfg.mqtt.host}:{cfg.mqtt.port}; they stay in {store.path}",
                      file=sys.stderr)
    report = result.report()
    report.update(model=model, backend=classifier.backend, source=source.name, seed=args.seed,
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
    if args.report:
        args.report.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                               encoding="utf-8")
    if result.timed_out:
        print("smartbin: error: an item never finished its cycle (see the log)", file=sys.stderr)
        return 1
    return 0


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
