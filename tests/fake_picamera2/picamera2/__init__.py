"""A stand-in for picamera2, for tests on machines without a camera.

It behaves like picamera2 0.3.x where smartbin depends on it (checked against its source):

- `Picamera2()` opens the camera (one user at a time); `global_camera_info()` lists cameras;
  `create_video_configuration` / `create_still_configuration(main={"size", "format"},
  buffer_count=...)`, `configure`, `start`, `stop`, `close`;
- a frame thread streams frames while started, each into one of `buffer_count` buffers; a
  frame needs a free buffer, so requests that are never released stall the stream, as on
  the real camera; like picamera2's event loop it keeps only the newest completed request
  queued (`queue=True`) and recycles older ones;
- each frame's picture is taken from `scene` when its exposure starts, and its metadata has
  `SensorTimestamp` (read-out start, `time.monotonic_ns()` clock), `ExposureTime` (us),
  `AnalogueGain`, `ColourGains`; the frame thread really spends `ExposureTime` exposing;
- `capture_request(wait, signal_function, flush)`: jobs as picamera2 runs them, `flush`
  True or a timestamp drops requests whose exposure started earlier (`SensorTimestamp -
  1000 * ExposureTime`); `wait(job, timeout)`; `cancel_all_and_flush()`;
- `request.make_array("main")` copies the buffer: "BGR888" arrives as R, G, B in numpy
  (libcamera names formats by their order in a little-endian word), "RGB888" as B, G, R;
  `get_metadata()`; `release()` (reference counted, counted here so leaks show);
- `set_controls` with picamera2's check that a control is advertised (`camera_controls`);
  auto exposure and white balance drift from frame to frame until they are fixed;
- failures on demand: `stop_delivering()`, `fail_make_array`, `fail_capture`, `fail_job`,
  `inject()` of a stale completed request, no camera at all.

API levels: `emulate("0.3.12")` (no flush), `"0.3.15"` (flush, wait without timeout),
`"0.3.17"` (wait with timeout, no cancel_all_and_flush), `"0.3.20"` (all; the default).
Environment for subprocesses: FAKE_PICAMERA2_SCENE (an image file shown to the camera),
FAKE_PICAMERA2_NO_CAMERA=1 (no camera connected).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CancelledError", "Picamera2", "emulate", "reset", "settings"]

FORMATS = ("BGR888", "RGB888", "XBGR8888", "XRGB8888")
ADVERTISED = {
    "AeEnable": (False, True, True), "AwbEnable": (False, True, True),
    "ExposureTime": (100, 1_000_000, 0), "AnalogueGain": (1.0, 16.0, 0.0),
    "ColourGains": (0.0, 32.0, None), "ScalerCrop": ((0, 0, 0, 0), (0, 0, 4608, 2592), None),
    "FrameDurationLimits": (10_000, 1_000_000, None),
}


class Settings:
    """What the next Picamera2() is like; tests change it before the camera is opened."""

    def __init__(self) -> None:
        self.cameras: list[dict[str, Any]] = [
            {"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "/base/fake/imx708@1a",
             "Num": 0}]
        if os.environ.get("FAKE_PICAMERA2_NO_CAMERA"):
            self.cameras = []
        self.scene: Any = _scene_from_env()
        self.frame_interval_s = 0.01
        self.ae_exposure_us = 6000  # where auto exposure settles
        self.ae_gain = 2.0
        self.awb_gains = (1.9, 1.6)
        self.drift = True  # auto exposure/white balance wander a little, frame to frame
        self.advertise_ae_enable = True  # libcamera 0.5 dropped AeEnable
        self.fail_open: Exception | None = None


def _scene_from_env() -> Any:
    path = os.environ.get("FAKE_PICAMERA2_SCENE")
    if path:
        return np.asarray(Image.open(path).convert("RGB"))
    # A grey card, lighter towards the right: plain, like an empty flap.
    ramp = np.linspace(90, 130, 64, dtype=np.float32)[None, :, None]
    return np.broadcast_to(ramp, (48, 64, 3)).astype(np.uint8)


settings = Settings()
instances: list[Any] = []
_in_use = threading.Lock()


def reset() -> None:
    global settings
    for cam in list(instances):
        if not cam.closed:
            cam.close()
    instances.clear()
    settings = Settings()
    emulate("0.3.20")


class Job:
    """picamera2's Job: a list of functions run on frame arrivals until all are done."""

    def __init__(self, functions: list[Any], signal_function: Any = None) -> None:
        self._functions = functions
        self._future: Future[Any] = Future()
        self._future.set_running_or_notify_cancel()
        self._signal_function = signal_function
        self._result: Any = None

    def execute(self) -> bool:
        try:
            while self._functions:
                done, result = self._functions[0]()
                if not done:
                    break
                self._functions.pop(0)
            if not self._functions:
                self._result = result
        except Exception as exc:
            self._future.set_exception(exc)
            self._functions = []
        return not self._functions

    def signal(self) -> None:
        if not self._future.done():
            self._future.set_result(self._result)
        if self._signal_function:
            self._signal_function(self)

    def get_result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout=timeout)

    def cancel(self) -> None:
        self._future.set_exception(CancelledError())


class CompletedRequest:
    def __init__(self, cam: _Camera, image: np.ndarray, metadata: dict[str, Any]) -> None:
        self.cam = cam
        self.image = image
        self.metadata = metadata
        self.format = cam.format
        self.ref_count = 1  # the "use" of being in completed_requests
        self.stop_count = cam.stop_count
        self.released = False

    def acquire(self) -> None:
        with self.cam.lock:
            if self.ref_count == 0:
                raise RuntimeError("CompletedRequest: acquiring lock with ref_count 0")
            self.ref_count += 1

    def release(self) -> None:
        with self.cam.lock:
            self.ref_count -= 1
            if self.ref_count < 0:
                raise RuntimeError("CompletedRequest: lock now has negative ref_count")
            if self.ref_count == 0:
                self.released = True
                self.cam.handed_out.discard(self)
                self.cam.released += 1
                self.cam.free_buffers += 1

    def get_metadata(self) -> dict[str, Any]:
        if self.released:
            raise AssertionError("get_metadata on a released request")
        return dict(self.metadata)

    def make_array(self, name: str) -> np.ndarray:
        if self.released:
            raise AssertionError("make_array on a released request")
        if name != "main":
            raise RuntimeError(f"Stream {name!r} is not defined")
        with self.cam.lock:
            if self.cam.fail_make_array > 0:
                self.cam.fail_make_array -= 1
                raise RuntimeError("fake: cannot map the buffer")
        rgb = self.image
        if self.format == "BGR888":  # bytes B, G, R in memory: numpy's last axis is R, G, B
            return rgb.copy()
        if self.format == "RGB888":
            return rgb[..., ::-1].copy()
        alpha = np.full((*rgb.shape[:2], 1), 255, np.uint8)
        if self.format == "XBGR8888":
            return np.concatenate([rgb, alpha], axis=2)
        return np.concatenate([rgb[..., ::-1], alpha], axis=2)


class _Camera:
    """Everything but the version-dependent methods."""

    def __init__(self, camera_num: int = 0, **_: Any) -> None:
        if settings.fail_open is not None:
            raise settings.fail_open
        if not settings.cameras:
            raise IndexError("list index out of range")  # picamera2 with no camera
        if not _in_use.acquire(blocking=False):
            raise RuntimeError("Failed to acquire camera: Device or resource busy")
        self.settings = settings
        self.lock = threading.RLock()
        self.closed = False
        self.started = False
        self.config: dict[str, Any] | None = None
        self.format = "BGR888"
        self.size = (640, 480)
        self.buffer_count = 0
        self.free_buffers = 0
        self.max_queue_len = 1
        self.completed_requests: list[CompletedRequest] = []
        self._job_list: list[Job] = []
        self.handed_out: set[CompletedRequest] = set()
        self.released = 0
        self.frames = 0
        self.stop_count = 0
        self.controls: dict[str, Any] = {}
        self.controls_log: list[dict[str, Any]] = []
        self.delivering = True
        self.fail_make_array = 0
        self.fail_capture: Exception | None = None
        self.fail_job: Exception | None = None
        self.waiting = threading.Event()  # a job is queued and waiting for frames
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_auto = (settings.ae_exposure_us, settings.ae_gain, settings.awb_gains)
        instances.append(self)

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return [dict(c) for c in settings.cameras]

    @property
    def camera_controls(self) -> dict[str, Any]:
        out = dict(ADVERTISED)
        if not self.settings.advertise_ae_enable:
            del out["AeEnable"]
        return out

    def _configuration(self, use_case: str, main: dict[str, Any] | None, buffer_count: int,
                       controls: dict[str, Any] | None, queue: bool) -> dict[str, Any]:
        main = {"format": "XBGR8888", "size": (640, 480), **(main or {})}
        if main["format"] not in FORMATS:
            raise ValueError(f"fake: format {main['format']} not supported here")
        return {"use_case": use_case, "main": main, "buffer_count": buffer_count,
                "controls": dict(controls or {}), "queue": queue}

    def create_video_configuration(self, main: dict[str, Any] | None = None, lores: Any = None,
                                   raw: Any = None, transform: Any = None,
                                   colour_space: Any = None, buffer_count: int = 6,
                                   controls: dict[str, Any] | None = None,
                                   display: str | None = "main", encode: str | None = "main",
                                   queue: bool = True, **_: Any) -> dict[str, Any]:
        return self._configuration("video", main, buffer_count, controls, queue)

    def create_still_configuration(self, main: dict[str, Any] | None = None, lores: Any = None,
                                   raw: Any = None, transform: Any = None,
                                   colour_space: Any = None, buffer_count: int = 1,
                                   controls: dict[str, Any] | None = None,
                                   display: str | None = None, encode: str | None = None,
                                   queue: bool = True, **_: Any) -> dict[str, Any]:
        return self._configuration("still", main, buffer_count, controls, queue)

    def configure(self, config: dict[str, Any]) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        self.config = config
        self.format = config["main"]["format"]
        self.size = tuple(config["main"]["size"])
        self.buffer_count = self.free_buffers = config["buffer_count"]
        self.max_queue_len = 1 if config["queue"] else 0
        self.set_controls(config["controls"])

    def start(self) -> None:
        if self.config is None:
            raise RuntimeError("Camera has not been configured")
        if self.started:
            return
        self.started = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._stream, name="fake-camera", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self.started:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self.lock:
            self.started = False
            self.stop_count += 1
            for req in self.completed_requests:
                req.release()
            self.completed_requests = []

    def close(self) -> None:
        if self.closed:
            return
        self.stop()
        self.closed = True
        _in_use.release()

    # ------------------------------------------------------------------ controls

    def set_controls(self, controls: dict[str, Any]) -> None:
        for name in controls:
            if name not in self.camera_controls:
                raise RuntimeError(f"Control {name} is not advertised by libcamera")
        with self.lock:
            self.controls.update(controls)
            self.controls_log.append(dict(controls))

    def _exposure(self) -> tuple[int, float, tuple[float, float]]:
        """(ExposureTime, AnalogueGain, ColourGains) of the frame about to start."""
        s, c = self.settings, self.controls
        wobble = ((self.frames % 5) - 2) if s.drift else 0
        auto = (s.ae_exposure_us + 150 * wobble, round(s.ae_gain + 0.05 * wobble, 3),
                (round(s.awb_gains[0] + 0.02 * wobble, 3), round(s.awb_gains[1] - 0.02 * wobble,
                                                                  3)))
        ae = c.get("AeEnable", True) and not c.get("ExposureTime")
        exposure = auto[0] if ae else int(c.get("ExposureTime") or self._last_auto[0])
        gain = auto[1] if ae and not c.get("AnalogueGain") else float(
            c.get("AnalogueGain") or self._last_auto[1])
        awb = c.get("AwbEnable", True) and "ColourGains" not in c
        gains = auto[2] if awb else tuple(c.get("ColourGains") or self._last_auto[2])
        if ae:
            self._last_auto = auto
        return exposure, gain, gains  # type: ignore[return-value]

    # ------------------------------------------------------------------ streaming

    def _render(self) -> np.ndarray:
        scene = self.settings.scene
        picture = scene() if callable(scene) else scene
        picture = np.asarray(picture, np.uint8)
        if (picture.shape[1], picture.shape[0]) != self.size:
            picture = np.asarray(Image.fromarray(picture).resize(self.size,
                                                                 Image.Resampling.BILINEAR))
        return picture

    def _stream(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            with self.lock:
                ready = self.delivering and self.free_buffers > 0
                if ready:
                    exposure, gain, gains = self._exposure()
            if ready:
                start_ns = time.monotonic_ns()
                image = self._render()  # what is in view as the exposure starts
                time.sleep(exposure / 1e6)
                self.deliver(image, start_ns, exposure, gain, gains)
            self._stop.wait(max(0.0, self.settings.frame_interval_s
                                - (time.monotonic() - began)))

    def deliver(self, image: np.ndarray, start_ns: int, exposure: int, gain: float = 2.0,
                gains: tuple[float, float] = (1.9, 1.6)) -> CompletedRequest | None:
        """A completed frame whose exposure started at `start_ns` (taking a buffer)."""
        md = {"SensorTimestamp": start_ns + 1000 * exposure, "ExposureTime": exposure,
              "AnalogueGain": gain, "ColourGains": gains, "FrameDuration": exposure + 1000}
        with self.lock:
            if not self.started or self.free_buffers <= 0:
                return None
            self.free_buffers -= 1
            self.frames += 1
            req = CompletedRequest(self, np.asarray(image, np.uint8), md)
            self.completed_requests.append(req)
            finished = self._run_jobs()
            while len(self.completed_requests) > self.max_queue_len:
                self.completed_requests.pop(0).release()
        for job in finished:
            job.signal()
        return req

    def inject(self, image: np.ndarray, start_ns: int, exposure: int = 5000) -> None:
        """Queue a completed request as if it had arrived earlier (a stale frame)."""
        self.deliver(image, start_ns, exposure)

    def stop_delivering(self) -> None:
        self.delivering = False

    def resume_delivering(self) -> None:
        self.delivering = True

    @property
    def held(self) -> int:
        """Requests handed to the application and not released yet."""
        with self.lock:
            return len(self.handed_out)

    # ------------------------------------------------------------------ jobs

    def _run_jobs(self) -> list[Job]:
        finished = []
        while self._job_list:
            if self._job_list[0].execute():
                finished.append(self._job_list.pop(0))
            else:
                break
        if not self._job_list:
            self.waiting.clear()
        return finished

    def _dispatch(self, functions: list[Any], wait: Any, signal_function: Any,
                  timeout_ok: bool) -> Any:
        if wait is None:
            wait = signal_function is None
        with self.lock:
            job = Job(functions, signal_function)
            self._job_list.append(job)
            self.waiting.set()
            finished = self._run_jobs() if self.completed_requests else []
        for done in finished:
            done.signal()
        if not wait:
            return job
        timeout = None if wait is True or not timeout_ok else wait
        return job.get_result(timeout=timeout)

    def _wait_for_timestamp(self, timestamp_ns: int | None) -> tuple[bool, None]:
        if not timestamp_ns:
            return True, None
        while self.completed_requests:
            md = self.completed_requests[0].metadata
            if md["SensorTimestamp"] - 1000 * md["ExposureTime"] >= timestamp_ns:
                return True, None
            self.completed_requests.pop(0).release()
        return False, None

    def _capture_request(self) -> tuple[bool, CompletedRequest | None]:
        if self.fail_job is not None:
            error, self.fail_job = self.fail_job, None
            raise error
        if not self.completed_requests:
            return False, None
        req = self.completed_requests.pop(0)
        self.handed_out.add(req)
        return True, req

    def _capture(self, wait: Any, signal_function: Any, flush: Any,
                 timeout_ok: bool) -> Any:
        if self.fail_capture is not None:
            error, self.fail_capture = self.fail_capture, None
            raise error
        if flush is True:
            flush = time.monotonic_ns()
        functions = [lambda: self._wait_for_timestamp(flush), self._capture_request]
        return self._dispatch(functions, wait, signal_function, timeout_ok)


class _V0312(_Camera):
    """picamera2 before 0.3.15: no flush, and wait() without a timeout."""

    def capture_request(self, wait: Any = None, signal_function: Any = None) -> Any:
        return self._capture(wait, signal_function, None, timeout_ok=False)

    def wait(self, job: Job) -> Any:
        return job.get_result()


class _V0315(_Camera):
    """0.3.15 and 0.3.16: capture_request(flush=...), wait() still without a timeout."""

    def capture_request(self, wait: Any = None, signal_function: Any = None,
                        flush: Any = None) -> Any:
        return self._capture(wait, signal_function, flush, timeout_ok=False)

    def wait(self, job: Job) -> Any:
        return job.get_result()


class _V0317(_V0315):
    """0.3.17 to 0.3.19: wait(job, timeout)."""

    def capture_request(self, wait: Any = None, signal_function: Any = None,
                        flush: Any = None) -> Any:
        return self._capture(wait, signal_function, flush, timeout_ok=True)

    def wait(self, job: Job, timeout: float | None = None) -> Any:  # type: ignore[override]
        return job.get_result(timeout=timeout)


class Picamera2(_V0317):
    """0.3.20 and later: cancel_all_and_flush() tidies up after a timed-out job."""

    def cancel_all_and_flush(self) -> None:
        with self.lock:
            for job in self._job_list:
                job.cancel()
            self._job_list = []
            self.waiting.clear()


LATEST = Picamera2
VERSIONS: dict[str, type[_Camera]] = {"0.3.12": _V0312, "0.3.15": _V0315, "0.3.17": _V0317,
                                      "0.3.20": Picamera2}


def emulate(version: str) -> None:
    """Make `picamera2.Picamera2` behave like that release's API."""
    globals()["Picamera2"] = VERSIONS[version]
