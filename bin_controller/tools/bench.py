"""`smartbin bench classify`: what the classifier costs beyond the bare interpreter."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bin_controller.config import load_config
from bin_controller.vision.backends import available_backends
from bin_controller.vision.classifier import Classifier
from bin_controller.vision.preprocess import prepare_array

CAMERA_FRAME = (304, 224)  # the camera's default frame (config camera.width/height)


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    a = np.asarray(samples_ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def _time(fn, runs: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _bare_invoke(classifier: Classifier, pixels: np.ndarray):
    """invoke() of every stage on inputs already in place: the floor of classify."""
    x = classifier._to_input(pixels)
    inputs = []
    for i, stage in enumerate(classifier.stages):
        if i:
            x = classifier._between[i - 1](x)
        inputs.append(x.reshape(stage.input_shape))
        x = stage.run(x)
    for stage, inp in zip(classifier.stages, inputs, strict=True):
        stage.interpreter.set_tensor(stage.input_index, inp)
    calls = [stage.interpreter.invoke for stage in classifier.stages]
    flips = 2 if classifier.bundle.test_time_flip else 1

    def run() -> None:
        for _ in range(flips):
            for call in calls:
                call()

    return run


def _sample_frame(rng: np.random.Generator) -> np.ndarray:
    from hardware_sim import items

    kind = items.KINDS[0]
    return np.asarray(Image.fromarray(items.render(kind, rng, 240)).resize(CAMERA_FRAME))


def run(args: argparse.Namespace) -> int:
    backends = args.backends.split(",") if args.backends else available_backends()
    threads = [int(t) for t in args.thread_counts.split(",")]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.image:
            jpeg = Path(args.image)
            frame = np.asarray(Image.open(jpeg).convert("RGB").resize(CAMERA_FRAME))
        else:
            frame = _sample_frame(rng)
            jpeg = Path(tmp) / "item.jpg"
            Image.fromarray(frame).resize((512, 384)).save(jpeg, quality=90)
        with Image.open(jpeg) as im:
            jpeg_size = f"{im.width}x{im.height}"
        print(f"model {args.model}; frame {CAMERA_FRAME[0]}x{CAMERA_FRAME[1]} RGB array; "
              f"JPEG {jpeg_size}; {args.runs} runs per row; times in ms (p50 / p95)")
        print(f"{'backend':15} {'thr':>3}  {'bare invoke':>15}  {'classify array':>15}  "
              f"{'ratio':>5}  {'classify JPEG':>15}  {'ratio':>5}")
        for backend in backends:
            for n in threads:
                c = Classifier(args.model, backend=backend, num_threads=n,
                               backbone=args.backbone, models_dir=load_config(None).model.dir)
                bare = percentiles(_time(_bare_invoke(c, prepare_array(frame, c.input_spec)),
                                         args.runs))
                arr = percentiles(_time(lambda c=c: c.classify_array(frame), args.runs))
                jp = percentiles(_time(lambda c=c: c.classify_file(jpeg), args.runs))
                print(f"{c.backend:15} {n:>3}  {bare[0]:7.2f} / {bare[1]:5.2f}  "
                      f"{arr[0]:7.2f} / {arr[1]:5.2f}  {arr[0] / bare[0]:5.2f}  "
                      f"{jp[0]:7.2f} / {jp[1]:5.2f}  {jp[0] / bare[0]:5.2f}", flush=True)
    return 0


def run_cycle(args: argparse.Namespace) -> int:
    """Sensor edge to servo command over many simulated items, beside the bare invoke()."""
    from bin_controller.config import load_config
    from hardware_sim.simulate import run_simulation
    from hardware_sim.sources import FolderSource, GeneratedSource

    cfg = load_config(args.config)
    classifier = Classifier(args.model, backend=args.backend, num_threads=args.threads,
                            backbone=args.backbone, models_dir=cfg.model.dir)
    if args.images:
        items = FolderSource(args.images, args.bin_map, 0,
                             (cfg.camera.width, cfg.camera.height)).items(args.items)
    else:
        items = GeneratedSource(0).items(args.items)
    result = run_simulation(cfg, items, classifier, fast=True)
    decisions = [e.decision_ms for e in result.events]
    frame = items[0].image
    bare = percentiles(_time(_bare_invoke(classifier, prepare_array(frame, classifier.input_spec)),
                             max(args.items, 50)))
    d50, d95 = percentiles(decisions)
    print(f"model {args.model} ({classifier.backend}, {args.threads} thread(s)), "
          f"{len(decisions)} items, fast mechanics")
    print(f"sensor edge -> servo command  p50 {d50:6.2f} ms  p95 {d95:6.2f} ms")
    print(f"bare invoke() (all stages)     p50 {bare[0]:6.2f} ms  p95 {bare[1]:6.2f} ms")
    print(f"overhead at p95: {d95 - bare[1]:+.2f} ms (goal: within +10 ms)")
    return 0


def run_idle(args: argparse.Namespace) -> int:
    """CPU used by the idle service: the loop waiting for an item on simulated pins."""
    import resource
    import threading

    from bin_controller.config import load_config
    from bin_controller.hardware.flap import Flap
    from bin_controller.hardware.sensors import make_sensor
    from bin_controller.sorter import MemoryRecorder, SortingLoop
    from hardware_sim.mechanics import SimBin, SimCamera, Timing
    from hardware_sim.simulate import sim_config

    cfg = sim_config(load_config(args.config), fast=False)
    classifier = Classifier(args.model, backend=args.backend, num_threads=args.threads,
                            backbone=args.backbone, models_dir=cfg.model.dir)
    sim = SimBin(cfg, Timing())
    loop = SortingLoop(config=cfg, sensor=make_sensor(cfg.sensor, sim.pin_factory),
                       camera=SimCamera(sim), classifier=classifier,
                       flap=Flap(cfg.flap, sim.pin_factory), recorder=MemoryRecorder())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    time.sleep(1.0)  # past start-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(args.seconds)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    loop.stop()
    thread.join(5)
    sim.close()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"idle {t1 - t0:.1f} s with sensor '{cfg.sensor.type}': CPU {cpu * 1000:.1f} ms = "
          f"{100 * cpu / (t1 - t0):.3f} % of one core (goal: under 1 %)")
    return 0


def run_store(args: argparse.Namespace) -> int:
    """Items committed per second (count + journal + outbox in one transaction)."""
    from bin_controller.domain import SortEvent
    from bin_controller.store import Store

    print(f"{args.items} items per run, each: begin (pending) + commit (count, journal, "
          "outbox) as the loop does")
    for mode in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store = Store(tmp, synchronous=mode)
            t0 = time.perf_counter()
            for _ in range(args.items):
                e = SortEvent(time=time.time(), bin="other", label="x", label_en="x",
                              confidence=0.9, uncertain=False, failed=False, forced=False,
                              cycle_ms=1.0, decision_ms=1.0, model="m", model_version="1")
                store.record(store.begin(e))
            dt = time.perf_counter() - t0
            store.close()
        print(f"synchronous={mode:6}  {args.items / dt:8.0f} items/s  "
              f"{1000 * dt / args.items:6.2f} ms per item")
    return 0


def run_service(args: argparse.Namespace) -> int:
    """Process start to READY=1, and resident memory after many simulated items."""
    import os
    import socket
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        sock_path = os.path.join(tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(300)
        cmd = [sys.executable, "-m", "bin_controller", "run", "--simulate", "--sim-fast",
               "--sim-interval", "0.001", "--sim-items", str(args.items), "--state-dir",
               os.path.join(tmp, "state"), "--model", args.model]
        if args.backbone:
            cmd += ["--backbone", args.backbone]
        env = {**os.environ, "NOTIFY_SOCKET": sock_path}
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ready = None
        sorted_n = 0
        try:
            while True:
                fields = dict(line.split("=", 1) for line in
                              sock.recv(4096).decode().splitlines() if "=" in line)
                if fields.get("READY") == "1" and ready is None:
                    ready = time.monotonic() - t0
                    with open(f"/proc/{proc.pid}/status") as f:
                        rss_ready = next(int(line.split()[1]) for line in f
                                         if line.startswith("VmRSS"))
                status = fields.get("STATUS", "")
                if "sorted " in status:
                    sorted_n = int(status.split("sorted ", 1)[1].split(" ", 1)[0])
                if sorted_n >= args.items:
                    break
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            with open(f"/proc/{proc.pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"model {args.model}: process start to READY=1 {ready:.2f} s (resident "
              f"{rss_ready / 1024:.0f} MB); after {sorted_n} items resident {rss / 1024:.0f} MB "
              f"(peak {hwm / 1024:.0f} MB)")
    return 0
