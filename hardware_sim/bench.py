"""Benchmarks that need the simulated bin: `smartbin bench cycle` and `smartbin bench idle`."""

from __future__ import annotations

import argparse
import resource
import time

from bin_controller.assembly import make_classifier
from bin_controller.config import Config, load_config
from bin_controller.memory_recorder import MemoryRecorder
from bin_controller.overrides import cli_overrides
from bin_controller.tools.bench import bare_invoke, percentiles, time_runs
from bin_controller.vision.preprocess import prepare_array
from hardware_sim.simulate import Simulation, run_simulation, sim_config
from hardware_sim.sources import FolderSource, GeneratedSource


def _config(args: argparse.Namespace, *, fast: bool) -> Config:
    cfg = load_config(args.config, cli_overrides(args))
    return sim_config(cfg.with_overrides({"model": {"threads": args.threads,
                                                    "backend": args.backend}}), fast)


def run_cycle(args: argparse.Namespace) -> int:
    """Sensor edge to servo command over many simulated items, beside the bare invoke()."""
    cfg = _config(args, fast=True)
    classifier = make_classifier(cfg.model)
    if args.images:
        items = FolderSource(args.images, args.bin_map, 0,
                             (cfg.camera.width, cfg.camera.height)).items(args.items)
    else:
        items = GeneratedSource(0).items(args.items)
    result = run_simulation(cfg, items, classifier, fast=True)
    decisions = [e.decision_ms for e in result.events]
    frame = items[0].image
    bare = percentiles(time_runs(bare_invoke(classifier, prepare_array(
        frame, classifier.input_spec)), max(args.items, 50)))
    d50, d95 = percentiles(decisions)
    print(f"model {cfg.model.bundle} ({classifier.backend}, {cfg.model.threads} thread(s)), "
          f"{len(decisions)} items, fast mechanics")
    print(f"sensor edge -> servo command  p50 {d50:6.2f} ms  p95 {d95:6.2f} ms")
    print(f"bare invoke() (all stages)     p50 {bare[0]:6.2f} ms  p95 {bare[1]:6.2f} ms")
    print(f"overhead at p95: {d95 - bare[1]:+.2f} ms (goal: within +10 ms)")
    return 0


def run_idle(args: argparse.Namespace) -> int:
    """CPU used by the idle service: the loop waiting for an item on simulated pins."""
    cfg = _config(args, fast=False)
    with Simulation(cfg, recorder=MemoryRecorder()):
        time.sleep(1.0)  # past start-up
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        time.sleep(args.seconds)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"idle {t1 - t0:.1f} s with sensor '{cfg.sensor.type}': CPU {cpu * 1000:.1f} ms = "
          f"{100 * cpu / (t1 - t0):.3f} % of one core (goal: under 1 %)")
    return 0
