"""Benchmarks that need the simulated bin: `smartbin bench cycle` and `smartbin bench idle`."""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
from PIL import Image

from bin_controller.assembly import make_classifier
from bin_controller.config import Config, load_config
from bin_controller.domain import SortEvent
from bin_controller.memory_recorder import MemoryRecorder
from bin_controller.overrides import cli_overrides
from bin_controller.photolog import PhotoLog
from bin_controller.tools.bench import bare_invoke, percentiles, time_runs
from bin_controller.vision.preprocess import prepare_array
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import FolderSource, GeneratedSource


def _config(args: argparse.Namespace, *, fast: bool) -> Config:
    cfg = load_config(args.config, cli_overrides(args))
    return sim_config(cfg.with_overrides({"model": {"threads": args.threads,
                                                    "backend": args.backend}}), fast)


class _TimedPhotos:
    """The loop's photo sink, timed: how long the loop spends handing each item over."""

    def __init__(self, inner: PhotoLog) -> None:
        self.inner = inner
        self.keep_ms: list[float] = []

    def wants(self, event: SortEvent) -> bool:
        return self.inner.wants(event)

    def keep(self, event: SortEvent, frame: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        self.inner.keep(event, frame)
        self.keep_ms.append((time.perf_counter() - t0) * 1000)


def _time_writer(photos: PhotoLog) -> list[float]:
    """Time the photo writer's work per photo (encode, write, log row), on its own thread."""
    samples: list[float] = []
    write = photos._write

    def timed(event: SortEvent, image: Image.Image) -> bool:
        t0 = time.perf_counter()
        try:
            return write(event, image)
        finally:
            samples.append((time.perf_counter() - t0) * 1000)

    photos._write = timed  # type: ignore[method-assign]
    return samples


class CycleTimer:
    """Sensor edge to item counted, per item, in ms: the cycle as the bin lives it."""

    def __init__(self, sim: Simulation) -> None:
        self.cycles: list[float] = []
        self._edge: list[float] = []  # the first edge of the item being sorted
        sim.bin.sensor.on_change(self._arrived)
        sim.loop.on_event.append(self._counted)

    def _arrived(self, present: bool, t: float) -> None:
        if present and not self._edge:
            self._edge.append(t)

    def _counted(self, _event: SortEvent) -> None:
        # Listeners run after the store committed the item and its photo was handed over.
        if self._edge:
            self.cycles.append((time.monotonic() - self._edge.pop()) * 1000)


def run_cycle(args: argparse.Namespace) -> int:
    """Sensor edge to servo command, and to the item counted in the SQLite store with its
    photo handed to the photo log, over many simulated items; beside the bare invoke()."""
    with tempfile.TemporaryDirectory(prefix="smartbin-bench-") as state:
        cfg = _config(args, fast=True).with_overrides(
            {"bin": {"state_dir": state}, "photos": {"keep": args.photos}})
        classifier = make_classifier(cfg.model)
        if args.images:
            items = FolderSource(args.images, args.bin_map, 0,
                                 (cfg.camera.width, cfg.camera.height)).items(args.items)
        else:
            items = GeneratedSource(0).items(args.items)
        # Taken now: the simulator lets go of an item's picture once it has landed.
        frame = items[0].image.copy()
        with Simulation(cfg, classifier=classifier) as sim:
            photos, store = sim.bin.photos, sim.bin.store
            assert photos is not None and store is not None  # no recorder: SQLite
            timed = _TimedPhotos(photos)
            sim.loop.photos = timed
            writer_ms = _time_writer(photos)
            cycles = CycleTimer(sim).cycles
            result = sim.drop(items, pace_s=args.pace)
            photos.flush(timeout=60)
            stats = photos.stats()
    decisions = [e.decision_ms for e in result.events]
    bare = percentiles(time_runs(bare_invoke(classifier, prepare_array(
        frame, classifier.input_spec)), max(args.items, 50)))
    d50, d95 = percentiles(decisions)
    c50, c95 = percentiles(cycles)
    k50, k95 = percentiles(timed.keep_ms)
    print(f"model {cfg.model.bundle} ({classifier.backend}, {cfg.model.threads} thread(s)), "
          f"{len(decisions)} items, fast mechanics, SQLite store, photos.keep = {args.photos} "
          f"({frame.shape[1]}x{frame.shape[0]} frames), "
          + (f"{args.pace:g} s between items" if args.pace else "items back to back"))
    print(f"sensor edge -> servo command  p50 {d50:6.2f} ms  p95 {d95:6.2f} ms")
    print(f"sensor edge -> item counted   p50 {c50:6.2f} ms  p95 {c95:6.2f} ms")
    print(f"photo hand-off (in the loop)  p50 {k50:6.3f} ms  p95 {k95:6.3f} ms  max "
          f"{max(timed.keep_ms):6.3f} ms (goal: within 2 ms at p95)")
    if writer_ms:
        w50, w95 = percentiles(writer_ms)
        print(f"photo writer (off the loop)   p50 {w50:6.2f} ms  p95 {w95:6.2f} ms per photo "
              f"(encode, write, log row); {len(writer_ms)} photos, {stats['photos_mb']} MB, "
              f"{stats['photos_dropped']} dropped")
    else:
        print("photo writer (off the loop)   no photos written")
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
