"""`smartbin bench classify`: what the classifier costs beyond the bare interpreter."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
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


def time_runs(fn: Callable[[], object], runs: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bare_invoke(classifier: Classifier, pixels: np.ndarray) -> Callable[[], None]:
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
    """A smooth, photo-like frame (the model's speed does not depend on what it shows)."""
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(CAMERA_FRAME, Image.Resampling.BICUBIC))


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
                bare = percentiles(time_runs(bare_invoke(c, prepare_array(frame, c.input_spec)),
                                         args.runs))
                arr = percentiles(time_runs(partial(c.classify_array, frame), args.runs))
                jp = percentiles(time_runs(partial(c.classify_file, jpeg), args.runs))
                print(f"{c.backend:15} {n:>3}  {bare[0]:7.2f} / {bare[1]:5.2f}  "
                      f"{arr[0]:7.2f} / {arr[1]:5.2f}  {arr[0] / bare[0]:5.2f}  "
                      f"{jp[0]:7.2f} / {jp[1]:5.2f}  {jp[0] / bare[0]:5.2f}", flush=True)
    return 0


def run_store(args: argparse.Namespace) -> int:
    """Items committed per second (count + journal + outbox in one transaction)."""
    from bin_controller.domain import SortEvent
    from bin_controller.payloads import event_message
    from bin_controller.store import Store

    print(f"{args.items} items per run, each: begin (pending) + commit (count, journal, "
          "outbox) as the loop does")
    for mode in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store = Store(tmp, synchronous=mode, message=event_message)
            t0 = time.perf_counter()
            for _ in range(args.items):
                e = SortEvent(time=time.time(), bin="other", label="x", label_en="x",
                              confidence=0.9, uncertain=False, failed=False, forced=False,
                              cycle_ms=1.0, decision_ms=1.0, model="m", model_version="1")
                store.commit(store.begin(e))
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
