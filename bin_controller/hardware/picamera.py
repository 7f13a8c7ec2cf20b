"""The camera on the bin: picamera2, imported only when a camera exists.

The capture contract. The camera streams continuously (switching modes costs hundreds of
ms), and picamera2 keeps the last completed frame queued, so "the next frame" may have been
exposed before the item settled or before the LED was lit. `capture()` therefore:

1. lights the LED (when there is one) and waits `camera.led_settle_s`;
2. takes the moment that follows as the earliest allowed exposure start, and asks for a
   frame that started after it: `capture_request(flush=<that moment, ns>)` (picamera2
   0.3.15 and later); with older picamera2 it drops requests until one's exposure started
   later. Either way the frame's own metadata is checked: its exposure started at
   `SensorTimestamp - 1000 * ExposureTime` (on the Raspberry Pi `SensorTimestamp` is the
   start of read-out, in ns). picamera2 compares that clock with `time.monotonic_ns()`
   (its own `flush=True`), and so does this module. libcamera documents the timestamp
   against CLOCK_BOOTTIME; the Pi's V4L2 buffers use CLOCK_MONOTONIC; the two differ only by
   time spent suspended, which a bin never is;
3. copies the frame out and releases the request (always, in `finally`: a request that is
   never released is a buffer the camera never gets back, and with none left it stops);
4. records when and how the frame was exposed (`last_frame`), which the loop journals.

A camera that stops delivering (a loose ribbon cable, a stalled ISP) fails the capture
after `camera.timeout_s` with CameraError on picamera2 0.3.17 and later, whose `wait`
takes a timeout; the loop retries, then sorts the item as failed. With `timeout_s = 0`, or
an older picamera2, the capture waits for ever: the loop's heartbeat stops and the systemd
watchdog restarts the service.

`camera.exposure = "locked"`: at start, and on `recalibrate()`, auto exposure and white
balance settle for `warmup_s` on the lit, empty flap; the values they chose
(ExposureTime, AnalogueGain, ColourGains) are then fixed, so every item is photographed the
same way and colour means the same thing from item to item.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from gpiozero import Factory

from bin_controller.config import CameraSection, Config
from bin_controller.domain import FrameInfo
from bin_controller.errors import CameraError, HardwareError, SmartbinError
from bin_controller.hardware.frame_quality import apply_crop, crop_box

log = logging.getLogger(__name__)

# One buffer held in picamera2's queue, one held by us while the frame is copied out, and
# two for the sensor to keep streaming into meanwhile.
BUFFERS = 4
# Controls that exposure locking sets; a newer libcamera drops AeEnable (setting
# ExposureTime and AnalogueGain makes them manual there), so only advertised ones are sent.
AUTO_CONTROLS: dict[str, Any] = {"AeEnable": True, "AwbEnable": True, "ExposureTime": 0,
                                 "AnalogueGain": 0.0}


def _exposure_start_ns(md: Mapping[str, Any]) -> int | None:
    """When the frame's exposure started (monotonic ns), from its metadata."""
    if "SensorTimestamp" not in md or "ExposureTime" not in md:
        return None
    return int(md["SensorTimestamp"]) - 1000 * int(md["ExposureTime"])


def frame_info(md: Mapping[str, Any]) -> FrameInfo:
    """The frame's exposure start as Unix time, its exposure time and analogue gain."""
    start = _exposure_start_ns(md)
    now = time.time()
    t = now if start is None else now - (time.monotonic_ns() - start) / 1e9
    exposure = md.get("ExposureTime")
    gain = md.get("AnalogueGain")
    return FrameInfo(time=round(t, 4),
                     exposure_us=int(exposure) if exposure is not None else None,
                     analogue_gain=round(float(gain), 3) if gain is not None else None)


class PiCamera:
    """picamera2 configured once and kept running; see the module doc for the contract."""

    def __init__(self, cfg: CameraSection, pin_factory: Factory) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise HardwareError(
                "camera.type = 'picamera2' but picamera2 is not importable: on Raspberry Pi OS "
                "run 'sudo apt install python3-picamera2' and create the venv with "
                "--system-site-packages"
            ) from exc
        self.cfg = cfg
        self.crop_box = crop_box(cfg.crop)
        self.last_frame: FrameInfo | None = None
        self.locked: dict[str, Any] | None = None  # the controls fixed by locked exposure
        self._abandoned: list[Any] = []  # timed-out jobs that may still take a request
        self._lock = threading.Lock()  # one capture or recalibration at a time
        self.led = None
        if cfg.led_pin >= 0:
            from gpiozero import LED

            self.led = LED(cfg.led_pin, pin_factory=pin_factory)
        self.cam: Any = None
        try:
            self.cam = Picamera2()
            # "BGR888" is libcamera's name for the byte order that numpy sees as RGB.
            config = self.cam.create_video_configuration(
                main={"size": (cfg.width, cfg.height), "format": "BGR888"},
                buffer_count=BUFFERS)
            self.cam.configure(config)
            self.cam.start()
        except Exception as exc:
            # A camera opened but not started is still held by this process.
            with contextlib.suppress(Exception):
                self.close()
            raise HardwareError(f"camera cannot start: {exc}; is it connected (rpicam-hello "
                                "--list-cameras) and not used by another program?") from exc
        # What this picamera2 can do, read from its own signatures (it has no version
        # attribute): flush by timestamp from 0.3.15, a wait timeout from 0.3.17.
        self.flush_supported = "flush" in inspect.signature(self.cam.capture_request).parameters
        self.timeout_supported = "timeout" in inspect.signature(self.cam.wait).parameters
        try:
            if cfg.exposure == "locked":
                self.recalibrate()
            else:
                time.sleep(cfg.warmup_s)  # let auto exposure and white balance settle
        except SmartbinError as exc:
            with contextlib.suppress(Exception):
                self.close()
            raise HardwareError(f"camera started but delivers no usable frame: {exc}") from exc

    # ------------------------------------------------------------------ capture

    def capture(self) -> np.ndarray:
        """The region of interest (camera.crop) of a fresh frame: RGB uint8 [H, W, 3]."""
        return apply_crop(self.capture_full(), self.crop_box)

    def capture_full(self) -> np.ndarray:
        """A whole frame taken after the LED was lit (for aiming tools and the loop)."""
        with self._lock:
            self.last_frame = None
            try:
                self._light(True)
                frame, md = self._take(after_ns=time.monotonic_ns())
            except SmartbinError:
                raise
            except Exception as exc:  # picamera2 raises plain RuntimeErrors and friends
                raise CameraError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._light(False)
            self.last_frame = frame_info(md)
            return frame

    def _take(self, after_ns: int) -> tuple[np.ndarray, dict[str, Any]]:
        """A frame whose exposure started at or after `after_ns`, copied out, its request
        released; and its metadata."""
        self._collect_abandoned()
        timeout = self.cfg.timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while True:
            request = self._next_request(after_ns, deadline)
            try:
                md: dict[str, Any] = request.get_metadata()
                start = _exposure_start_ns(md)
                if start is None and not self.flush_supported:
                    raise CameraError("frames carry no SensorTimestamp/ExposureTime, so a "
                                      "frame taken before the LED cannot be told apart; "
                                      "upgrade picamera2 to 0.3.15 or later")
                if start is not None and start < after_ns:
                    continue  # exposed before the LED was lit: dropped (and released)
                array = request.make_array("main")
                return self._rgb(array), md
            finally:
                request.release()

    def _next_request(self, after_ns: int, deadline: float | None) -> Any:
        kwargs = {"flush": after_ns} if self.flush_supported else {}
        job = self.cam.capture_request(wait=False, **kwargs)
        if deadline is None or not self.timeout_supported:
            return self.cam.wait(job)
        try:
            return self.cam.wait(job, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._abandon(job)
            raise CameraError(f"no frame from the camera in {self.cfg.timeout_s:g} s "
                              "(camera.timeout_s): check the ribbon cable and "
                              "'rpicam-hello --list-cameras'") from None

    def _abandon(self, job: Any) -> None:
        """A timed-out job stays queued in picamera2 and would take (and hold) the next
        frame: cancel it where picamera2 can (0.3.20+), and release whatever it took."""
        cancel = getattr(self.cam, "cancel_all_and_flush", None)
        if cancel is not None:
            cancel()
        self._abandoned.append(job)
        self._collect_abandoned()

    def _collect_abandoned(self) -> None:
        waiting = []
        for job in self._abandoned:
            try:
                request = self.cam.wait(job, timeout=0)
            except TimeoutError:
                waiting.append(job)  # still queued: look again next time
                continue
            except Exception:  # cancelled or failed: it holds no request
                continue
            if request is not None:
                request.release()
        self._abandoned = waiting

    def _rgb(self, array: np.ndarray) -> np.ndarray:
        if array.ndim != 3 or array.shape[2] < 3:
            raise CameraError(f"camera returned a {array.shape} array, not [H, W, 3]")
        return np.ascontiguousarray(array[..., :3], dtype=np.uint8)

    def _light(self, on: bool) -> None:
        if self.led is None:
            return
        if on:
            self.led.on()
            time.sleep(self.cfg.led_settle_s)  # the LED (and its driver) reach full light
        else:
            self.led.off()

    # ------------------------------------------------------------------ exposure

    def recalibrate(self) -> dict[str, Any]:
        """Let auto exposure and white balance settle on the lit flap for `warmup_s`, then
        fix what they chose (camera.exposure = "locked"). Run it with the flap empty."""
        if self.cfg.exposure != "locked":
            raise HardwareError("camera.exposure = 'auto': exposure follows the light, there "
                                "is nothing to recalibrate; set camera.exposure = 'locked'")
        with self._lock:
            try:
                self._set_controls(AUTO_CONTROLS)
                self._light(True)
                time.sleep(self.cfg.warmup_s)
                _frame, md = self._take(after_ns=time.monotonic_ns())
                locked = self._locked_controls(md)
                self._set_controls(locked)
            except SmartbinError:
                raise
            except Exception as exc:
                raise CameraError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._light(False)
        self.locked = locked
        settled = {"exposure_us": locked.get("ExposureTime"),
                   "analogue_gain": locked.get("AnalogueGain"),
                   "colour_gains": list(locked["ColourGains"]) if "ColourGains" in locked
                   else None}
        log.info("camera exposure locked: %s", settled)
        return settled

    @staticmethod
    def _locked_controls(md: Mapping[str, Any]) -> dict[str, Any]:
        if "ExposureTime" not in md or "AnalogueGain" not in md:
            raise CameraError("the camera reports no ExposureTime/AnalogueGain to lock; use "
                              "camera.exposure = 'auto'")
        locked: dict[str, Any] = {"AeEnable": False, "AwbEnable": False,
                                  "ExposureTime": int(md["ExposureTime"]),
                                  "AnalogueGain": float(md["AnalogueGain"])}
        if "ColourGains" in md:  # absent on a monochrome sensor
            red, blue = md["ColourGains"]
            locked["ColourGains"] = (float(red), float(blue))
        return locked

    def _set_controls(self, controls: Mapping[str, Any]) -> None:
        advertised = getattr(self.cam, "camera_controls", None)
        if isinstance(advertised, Mapping):
            controls = {k: v for k, v in controls.items() if k in advertised}
        self.cam.set_controls(dict(controls))

    # ------------------------------------------------------------------ end

    def _close_led(self) -> None:
        if self.led is not None:
            self.led.close()
            self.led = None

    def close(self) -> None:
        try:
            if self.cam is not None:
                self._collect_abandoned()
                self.cam.stop()
                self.cam.close()
                self.cam = None
        finally:
            self._close_led()


def open_camera(cfg: Config, pin_factory: Factory) -> PiCamera:
    """The registry's `camera.type = "picamera2"`."""
    return PiCamera(cfg.camera, pin_factory)
