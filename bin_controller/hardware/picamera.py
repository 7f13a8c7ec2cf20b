"""The camera on the bin: picamera2, imported only when a camera exists."""

from __future__ import annotations

import time

import numpy as np
from gpiozero import Factory

from bin_controller.config import CameraSection, Config
from bin_controller.errors import CameraError, HardwareError


class PiCamera:
    """picamera2 configured once and kept running: switching modes costs hundreds of ms."""

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
        try:
            self.cam = Picamera2()
            # "BGR888" is libcamera's name for the byte order that numpy sees as RGB.
            config = self.cam.create_video_configuration(
                main={"size": (cfg.width, cfg.height), "format": "BGR888"}, buffer_count=2)
            self.cam.configure(config)
            self.cam.start()
        except Exception as exc:
            raise HardwareError(f"camera cannot start: {exc}") from exc
        time.sleep(cfg.warmup_s)  # let auto-exposure and white balance settle
        self.led = None
        if cfg.led_pin >= 0:
            from gpiozero import LED

            self.led = LED(cfg.led_pin, pin_factory=pin_factory)

    def capture(self) -> np.ndarray:
        try:
            if self.led:
                self.led.on()
                time.sleep(self.cfg.led_settle_s)
            frame: np.ndarray = self.cam.capture_array("main")[..., :3]
            return frame
        except Exception as exc:
            raise CameraError(str(exc)) from exc
        finally:
            if self.led:
                self.led.off()

    def close(self) -> None:
        self.cam.stop()
        self.cam.close()
        if self.led:
            self.led.close()


def open_camera(cfg: Config, pin_factory: Factory) -> PiCamera:
    """The registry's `camera.type = "picamera2"`."""
    return PiCamera(cfg.camera, pin_factory)
