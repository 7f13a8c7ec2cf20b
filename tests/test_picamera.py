"""The picamera2 camera against a fake picamera2 (tests/fake_picamera2), and the camera
tools: the capture contract (no frame older than the LED, colour order, every request
released, errors as CameraError, a camera that stops delivering), locked exposure, the
region of interest, snapshot/preview/check, and the loop end to end."""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin
from PIL import Image

from bin_controller.config import config_from_dict
from bin_controller.domain import SortEvent, State
from bin_controller.errors import BusyError, CameraError, CommandError, ConfigError, HardwareError
from bin_controller.hardware import frame_quality as fq
from bin_controller.hardware.picamera import PiCamera
from hardware_sim import items
from hardware_sim.mechanics import empty_flap
from tests.test_cli import smartbin

FAKE_DIR = Path(__file__).resolve().parent / "fake_picamera2"
VERSIONS = ("0.3.12", "0.3.15", "0.3.17", "0.3.20")
LED_PIN = 5
RED, GREEN, BLUE = ((200, 20, 30), (20, 200, 30), (20, 30, 200))
FAST = {"sensor": {"settle_s": 0.0, "jam_s": 5.0}, "flap": {"move_s": 0.0, "hold_s": 0.0},
        "loop": {"cooldown_s": 0.0, "tick_s": 0.05}, "model": {"retries": 1}}


def plain(rgb, size=(64, 48)) -> np.ndarray:
    return np.full((size[1], size[0], 3), rgb, np.uint8)


@pytest.fixture
def fake(monkeypatch):
    """The fake picamera2, importable as `picamera2` for this test only."""
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    sys.modules.pop("picamera2", None)
    import picamera2

    picamera2.reset()
    yield picamera2
    picamera2.reset()
    sys.modules.pop("picamera2", None)


@pytest.fixture
def pins():
    factory = MockFactory(pin_class=MockPWMPin)
    yield factory
    factory.close()


@pytest.fixture
def cameras():
    opened: list[PiCamera] = []
    yield opened
    for cam in opened:
        cam.close()


def camera_config(**camera):
    return config_from_dict({"hardware": {"pin_factory": "mock"},
                             "camera": {"warmup_s": 0.0, "led_settle_s": 0.0, "timeout_s": 2.0,
                                        **camera}})


def open_camera(cameras, pins, **camera) -> PiCamera:
    cam = PiCamera(camera_config(**camera).camera, pins)
    cameras.append(cam)
    return cam


def is_colour(frame: np.ndarray, rgb) -> bool:
    return bool(np.abs(frame.reshape(-1, 3).mean(0) - np.array(rgb)).max() < 10)


def in_thread(fn):
    """Run fn in a thread; returns (thread, box) where box gets its result or error."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("version", VERSIONS)
def test_no_frame_exposed_before_the_led_is_used(fake, pins, cameras, version):
    # Green while the LED is off, red while it is lit: the picture is taken when each
    # frame's exposure starts, so a frame begun before the LED shows green.
    fake.emulate(version)
    led = pins.pin(LED_PIN)
    fake.settings.scene = lambda: plain(RED) if led.state else plain(GREEN)
    cam = open_camera(cameras, pins, led_pin=LED_PIN)
    assert cam.flush_supported == (version != "0.3.12")
    for _ in range(6):
        before = time.time()
        frame = cam.capture()
        assert is_colour(frame, RED), f"a frame from before the LED was used: {frame[0, 0]}"
        assert cam.last_frame.time >= before - 0.005
        assert not led.state, "the LED stays lit after the shot"
        time.sleep(0.013)  # land at different points of the frame cycle
    assert cam.cam.held == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_a_queued_stale_frame_is_dropped_and_released(fake, pins, cameras, version):
    fake.emulate(version)
    fake.settings.scene = lambda: plain(RED)
    cam = open_camera(cameras, pins)
    fake_cam = cam.cam
    fake_cam.stop_delivering()
    time.sleep(0.05)
    with fake_cam.lock:  # nothing else queued: only the stale frame
        for req in fake_cam.completed_requests:
            req.release()
        fake_cam.completed_requests = []
    fake_cam.inject(plain(BLUE, fake_cam.size), time.monotonic_ns() - 500_000_000)
    stale = fake_cam.completed_requests[0]
    thread, box = in_thread(cam.capture)
    assert fake_cam.waiting.wait(5) or not thread.is_alive()
    time.sleep(0.05)
    fake_cam.resume_delivering()
    thread.join(10)
    assert "result" in box, box
    assert is_colour(box["result"], RED), "the stale (blue) frame was used"
    assert stale.released and fake_cam.held == 0


def test_no_led_a_frame_from_before_the_capture_call_is_not_used(fake, pins, cameras):
    # Without an LED the moment that counts is the call (the loop calls after settling).
    view = {"rgb": GREEN}
    fake.settings.scene = lambda: plain(view["rgb"])
    cam = open_camera(cameras, pins)
    for _ in range(5):
        view["rgb"] = GREEN
        time.sleep(0.03)
        view["rgb"] = RED  # the item has settled: every frame started from now shows it
        assert is_colour(cam.capture(), RED)


def test_colour_order_bgr888_arrives_as_rgb(fake, pins, cameras):
    fake.settings.scene = lambda: plain(RED)
    cam = open_camera(cameras, pins)
    frame = cam.capture()
    assert frame.dtype == np.uint8 and frame.shape == (224, 304, 3)
    r, g, b = frame.reshape(-1, 3).mean(0)
    assert r > 150 and g < 60 and b < 60
    # The fake is faithful here: "RGB888" would have handed numpy B, G, R.
    assert fake.settings and cam.cam.config["main"]["format"] == "BGR888"


def test_fake_rgb888_is_reversed(fake):
    fake.settings.scene = lambda: plain(RED)
    cam = fake.Picamera2()
    cam.configure(cam.create_still_configuration(main={"size": (64, 48), "format": "RGB888"}))
    cam.start()
    req = cam.capture_request()
    try:
        assert req.make_array("main")[0, 0].tolist() == list(RED[::-1])
    finally:
        req.release()
        cam.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_request_released_also_on_errors(fake, pins, cameras, version):
    fake.emulate(version)
    cam = open_camera(cameras, pins)
    fc = cam.cam
    cam.capture()
    assert fc.held == 0
    fc.fail_make_array = 1
    with pytest.raises(CameraError, match="cannot map the buffer"):
        cam.capture()
    assert fc.held == 0, "a request was kept after make_array failed"
    fc.fail_capture = RuntimeError("Camera must be started")
    with pytest.raises(CameraError, match="RuntimeError: Camera must be started"):
        cam.capture()
    fc.fail_job = RuntimeError("Camera frontend has timed out!")
    with pytest.raises(CameraError, match="frontend has timed out"):
        cam.capture()
    for _ in range(3 * fc.buffer_count):  # leaking one per capture would stall the stream
        assert cam.capture().shape == (224, 304, 3)
    assert fc.held == 0
    assert cam.last_frame is not None


def test_open_errors_are_hardware_errors(fake, pins, monkeypatch):
    fake.settings.cameras = []
    with pytest.raises(HardwareError, match="camera cannot start"):
        PiCamera(camera_config().camera, pins)
    fake.reset()
    fake.settings.fail_open = RuntimeError("Failed to acquire camera: Device or resource busy")
    with pytest.raises(HardwareError, match="resource busy"):
        PiCamera(camera_config(led_pin=LED_PIN).camera, pins)
    # The LED pin was given back: it can be claimed again.
    pins.pin(LED_PIN).close()
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(HardwareError, match="python3-picamera2"):
        PiCamera(camera_config().camera, pins)


@pytest.mark.parametrize("version", ("0.3.17", "0.3.20"))
def test_a_camera_that_stops_delivering_fails_within_the_timeout(fake, pins, cameras, version):
    fake.emulate(version)
    cam = open_camera(cameras, pins, timeout_s=0.3)
    fc = cam.cam
    cam.capture()
    fc.stop_delivering()
    time.sleep(0.05)
    thread, box = in_thread(cam.capture)
    thread.join(20)
    assert not thread.is_alive(), "capture hung although camera.timeout_s is set"
    assert isinstance(box.get("error"), CameraError)
    assert "no frame from the camera in 0.3 s" in str(box["error"])
    assert cam.last_frame is None
    fc.resume_delivering()
    for _ in range(2 * fc.buffer_count):
        cam.capture()
    # The timed-out job was cancelled (0.3.20) or its request released later (0.3.17).
    assert fc.held == 0


# --------------------------------------------------------------------------- exposure


def test_locked_exposure_is_fixed_after_warmup_and_recalibrated(fake, pins, cameras):
    fake.settings.ae_exposure_us = 6000
    auto = open_camera(cameras, pins)
    seen = set()
    for _ in range(8):
        auto.capture()
        seen.add(auto.last_frame.exposure_us)
        time.sleep(0.012)
    assert len(seen) > 1, "auto exposure should drift in the fake"
    with pytest.raises(HardwareError, match="nothing to recalibrate"):
        auto.recalibrate()
    auto.close()
    cameras.clear()

    cam = open_camera(cameras, pins, exposure="locked", warmup_s=0.1, led_pin=LED_PIN)
    locked = dict(cam.locked)
    assert locked["AeEnable"] is False and locked["AwbEnable"] is False
    assert abs(locked["ExposureTime"] - 6000) <= 300  # what AE chose near its target
    assert cam.cam.controls["ExposureTime"] == locked["ExposureTime"]
    assert cam.cam.controls["ColourGains"] == locked["ColourGains"]
    for _ in range(6):
        cam.capture()
        assert cam.last_frame.exposure_us == locked["ExposureTime"]
        assert cam.last_frame.analogue_gain == round(locked["AnalogueGain"], 3)
        time.sleep(0.012)
    fake.settings.ae_exposure_us = 12000  # the light changed
    cam.capture()
    assert cam.last_frame.exposure_us == locked["ExposureTime"], "locked exposure drifted"
    settled = cam.recalibrate()
    assert abs(settled["exposure_us"] - 12000) <= 300
    assert cam.locked["ExposureTime"] == settled["exposure_us"]
    cam.capture()
    assert cam.last_frame.exposure_us == settled["exposure_us"]
    # Auto exposure was on while it settled, and the LED lit.
    assert {"AeEnable": True, "AwbEnable": True, "ExposureTime": 0,
            "AnalogueGain": 0.0} in cam.cam.controls_log
    assert cam.cam.held == 0


def test_locking_on_a_libcamera_without_ae_enable(fake, pins, cameras):
    fake.settings.advertise_ae_enable = False  # set_controls would raise for AeEnable
    cam = open_camera(cameras, pins, exposure="locked")
    assert "AeEnable" not in cam.cam.controls
    assert cam.cam.controls["ExposureTime"] == cam.locked["ExposureTime"]


# --------------------------------------------------------------------------- crop


def coordinates(width=304, height=224) -> np.ndarray:
    """R = x, G = y: each pixel says where it is."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx % 256, yy, np.zeros_like(xx)], axis=2).astype(np.uint8)


def test_crop_is_applied_before_the_model(fake, pins, cameras):
    fake.settings.scene = coordinates
    cam = open_camera(cameras, pins, crop={"x": 40, "y": 10, "width": 200, "height": 150})
    frame = cam.capture()
    assert frame.shape == (150, 200, 3) and frame.flags.c_contiguous
    assert frame[0, 0, :2].tolist() == [40, 10]
    assert frame[-1, -1, :2].tolist() == [239, 159]
    assert cam.capture_full().shape == (224, 304, 3)


@pytest.mark.parametrize("crop, message", [
    ({"x": 0, "y": 0, "width": 100}, "needs exactly the keys x, y, width, height"),
    ({"x": 0.5, "y": 0, "width": 100, "height": 100}, "camera.crop.x = 0.5: must be a whole"),
    ({"x": 210, "y": 0, "width": 100, "height": 100}, "lies outside the 304x224 frame"),
    ({"x": 0, "y": 0, "width": 100, "height": 4}, "camera.crop.height = 4: must be at least"),
])
def test_crop_validation(crop, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"camera": {"crop": crop}})


def test_exposure_choices():
    with pytest.raises(ConfigError, match=r"camera\.exposure = 'fixed': must be one of auto"):
        config_from_dict({"camera": {"exposure": "fixed"}})


# --------------------------------------------------------------------------- frame quality


def test_frame_quality_measures():
    flat = empty_flap()
    rng = np.random.default_rng(3)
    item = items.render(items.KINDS[0], rng)
    assert 60 < fq.brightness(flat) < 100
    sharp = np.zeros((64, 64, 3), np.uint8)
    sharp[::2] = 255
    blurred = np.full((64, 64, 3), 128, np.uint8)
    assert fq.sharpness(sharp) > 1000 > fq.sharpness(blurred) == 0.0
    assert fq.emptiness(flat).empty
    assert not fq.emptiness(item).empty
    # A patterned flap is not plain, but it is empty when it matches its reference.
    checker = np.kron((np.indices((8, 8)).sum(0) % 2) * 120 + 60, np.ones((16, 16)))
    patterned = np.repeat(checker[..., None], 3, axis=2).astype(np.uint8)
    assert not fq.emptiness(patterned).empty
    assert fq.emptiness(patterned, patterned).empty
    lit = np.clip(patterned.astype(int) + 30, 0, 255).astype(np.uint8)  # brighter exposure
    assert fq.emptiness(lit, patterned).empty
    with_item = patterned.copy()
    with_item[30:100, 30:100] = item[:70, :70]
    assert not fq.emptiness(with_item, patterned).empty


def test_frame_report(fake, pins, cameras):
    from bin_controller.tools.camera_cmd import frame_report

    fake.settings.scene = lambda: empty_flap()
    cam = open_camera(cameras, pins)
    line = frame_report(cam)
    assert line.startswith("brightness 8") and "sharpness" in line and "flap looks empty" in line
    fake.settings.scene = lambda: items.render(items.KINDS[2], np.random.default_rng(1))
    with pytest.raises(HardwareError, match=r"something is in view.*clear the flap"):
        frame_report(cam)
    fake.settings.scene = lambda: plain((10, 12, 8))
    with pytest.raises(HardwareError, match="too dark"):
        frame_report(cam)
    fake.settings.scene = lambda: plain((250, 250, 250))
    with pytest.raises(HardwareError, match="too bright"):
        frame_report(cam)
    with pytest.raises(HardwareError, match="reference photo is 10x10"):
        frame_report(cam, reference=plain(GREEN, (10, 10)))


def test_camera_report_on_the_simulator(tmp_path):
    from bin_controller.tools.camera_cmd import camera_report

    cfg = config_from_dict({"hardware": {"pin_factory": "mock"}, "camera": {"type": "simulated"},
                            "bin": {"state_dir": str(tmp_path)}})
    assert "flap looks empty (0% of the view stands out" in camera_report(cfg)


def test_simulated_camera_shows_the_empty_flap():
    from hardware_sim.mechanics import SimBin, SimCamera

    cfg = config_from_dict({"hardware": {"pin_factory": "mock"}, "camera": {"type": "simulated"},
                            "simulator": {"fast": True}})
    sim = SimBin(cfg)
    camera = SimCamera(sim)
    try:
        frame = camera.capture()
        assert frame.shape == (items.FRAME, items.FRAME, 3) and camera.captures == 0
        assert fq.emptiness(frame).empty
    finally:
        sim.close()


# --------------------------------------------------------------------------- commands


def fake_env(scene: Path | None = None) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([str(FAKE_DIR), os.environ.get("PYTHONPATH", "")])}
    if scene is not None:
        env["FAKE_PICAMERA2_SCENE"] = str(scene)
    return env


def test_snapshot_and_preview_on_the_simulator(tmp_path):
    snap = tmp_path / "snap.png"
    r = smartbin("camera", "snapshot", str(snap), "--simulate", "--state-dir",
                 str(tmp_path / "state"), "--reference")
    assert r.returncode == 0, r.stderr
    image = np.asarray(Image.open(snap))
    assert image.shape == (items.FRAME, items.FRAME, 3)
    assert (tmp_path / "state" / "camera-reference.png").is_file()
    assert "brightness" in r.stdout and "reference photo" in r.stdout
    r = smartbin("camera", "preview", "--simulate", "--state-dir", str(tmp_path / "state"),
                 "--interval", "0.2", "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "state" / "camera-preview.jpg").is_file()
    assert len([line for line in r.stdout.splitlines() if "sharpness" in line]) >= 2
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'[hardware]\npin_factory = "mock"\n[camera]\ntype = "simulated"\n'
                   f'[bin]\nstate_dir = "{tmp_path / "state"}"\n')
    r = smartbin("camera", "snapshot", str(tmp_path / "s.jpg"), "--config", str(cfg))
    assert r.returncode == 0 and (tmp_path / "s.jpg").is_file(), r.stderr


def test_snapshot_and_preview_with_picamera2(tmp_path):
    scene = tmp_path / "scene.png"
    Image.fromarray(coordinates()).save(scene)
    cfg = tmp_path / "bin.toml"
    cfg.write_text('[hardware]\npin_factory = "mock"\n'
                   '[camera]\ntype = "picamera2"\nwarmup_s = 0.0\nled_pin = 5\n'
                   'crop = { x = 40, y = 10, width = 200, height = 150 }\n'
                   f'[bin]\nstate_dir = "{tmp_path / "state"}"\n')
    snap = tmp_path / "snap.png"
    r = smartbin("camera", "snapshot", str(snap), "--config", str(cfg), env=fake_env(scene))
    assert r.returncode == 0, r.stderr
    image = np.asarray(Image.open(snap))
    assert image.shape == (224, 304, 3)  # the whole frame ...
    assert image[10, 50].tolist() == [40, 230, 60]  # ... with camera.crop drawn in green
    assert image[100, 40].tolist() == [40, 230, 60]
    assert image[5, 100, :2].tolist() == [100, 5]  # outside it the scene is untouched
    # Inside, the demo model's centre square (150x150 of the 200x150 crop) in yellow.
    assert image[100, 65].tolist() == [250, 210, 0]
    out = tmp_path / "live" / "view.jpg"
    r = smartbin("camera", "preview", "--config", str(cfg), "--out", str(out), "--interval",
                 "0.2", "--seconds", "0.3", env=fake_env(scene))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (304, 224)
    r = smartbin("camera", "snapshot", str(tmp_path / "snap.gif"), "--config", str(cfg),
                 env=fake_env(scene))
    assert r.returncode == 2 and r.stderr.startswith("smartbin: error: ")
    assert "name it .jpg or .png" in r.stderr and "Traceback" not in r.stderr
    r = smartbin("camera", "snapshot", str(snap), "--config", str(cfg),
                 env={**fake_env(scene), "FAKE_PICAMERA2_NO_CAMERA": "1"})
    assert r.returncode == 2 and "camera cannot start" in r.stderr, r.stderr


# --------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def demo_classifier():
    from bin_controller.assembly import make_classifier

    return make_classifier(config_from_dict({}).model)


def bin_config(tmp_path, **camera):
    return config_from_dict({**FAST, "hardware": {"pin_factory": "mock"},
                             "bin": {"state_dir": str(tmp_path / "state")},
                             "camera": {"warmup_s": 0.0, "led_settle_s": 0.0,
                                        "led_pin": LED_PIN, **camera}})


class Chute:
    """The test's hand: puts an item in view and breaks the beam, clears both again."""

    def __init__(self, smartbin, fake) -> None:
        self.beam = smartbin.pin_factory.pin(smartbin.config.sensor.pin)
        self.beam.drive_high()  # beam intact (broken is low)
        self.item: np.ndarray | None = None
        self.empty = empty_flap()
        fake.settings.scene = lambda: self.item if self.item is not None else self.empty
        self.events: list[SortEvent] = []
        self.got = threading.Event()
        smartbin.loop.on_event.append(self.sorted)

    def drop(self, image: np.ndarray) -> None:
        self.got.clear()
        self.item = image
        self.beam.drive_low()

    def sorted(self, event: SortEvent) -> None:
        self.events.append(event)
        self.item = None  # it slid off the tipped flap
        self.beam.drive_high()
        self.got.set()


def wait_for(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def running(smartbin):
    thread = threading.Thread(target=smartbin.loop.run, daemon=True)
    thread.start()
    return thread


def test_loop_end_to_end_journals_the_frame(fake, tmp_path, demo_classifier):
    from bin_controller.assembly import build_bin

    cfg = bin_config(tmp_path, exposure="locked")
    rng = np.random.default_rng(7)
    with build_bin(cfg, classifier=demo_classifier) as smartbin:
        assert isinstance(smartbin.camera, PiCamera)
        chute = Chute(smartbin, fake)
        smartbin.start()
        thread = running(smartbin)
        try:
            for kind in (items.KINDS[0], items.KINDS[5]):
                dropped = time.time()
                chute.drop(items.render(kind, rng))
                assert chute.got.wait(20), "the item was not sorted"
                event = chute.events[-1]
                assert not event.failed and event.label is not None, event
                assert dropped - 0.005 <= event.frame_time <= event.time
                assert event.exposure_us == smartbin.camera.locked["ExposureTime"]
                assert event.analogue_gain is not None
        finally:
            smartbin.loop.stop()
            thread.join(10)
        journal = smartbin.store.journal()
        assert [e.frame_time for e in journal] == [e.frame_time for e in chute.events]
        assert all(e.exposure_us for e in journal)
        assert smartbin.camera.cam.held == 0
    # The MQTT event carries the same fields (its payload is the event's fields).
    from bin_controller.payloads import event_message

    assert '"exposure_us"' in event_message(chute.events[0]).payload


def test_recalibrate_between_items(fake, tmp_path, demo_classifier):
    from bin_controller.assembly import build_bin

    cfg = bin_config(tmp_path, exposure="locked")
    with build_bin(cfg, classifier=demo_classifier) as smartbin:
        chute = Chute(smartbin, fake)
        thread = running(smartbin)
        try:
            fake.settings.ae_exposure_us = 15000
            settled = smartbin.loop.recalibrate_camera()
            assert abs(settled["exposure_us"] - 15000) <= 300
            smartbin.loop.pause()
            chute.beam.drive_low()  # an item on the flap while paused
            time.sleep(0.2)
            with pytest.raises(BusyError, match="flap empty"):
                smartbin.loop.recalibrate_camera()
            chute.beam.drive_high()
        finally:
            smartbin.loop.stop()
            thread.join(10)
    sim = config_from_dict({**FAST, "hardware": {"pin_factory": "mock"},
                            "camera": {"type": "simulated"},
                            "bin": {"state_dir": str(tmp_path / "sim")}})
    with build_bin(sim, classifier=demo_classifier) as smartbin, \
            pytest.raises(CommandError, match="no exposure to recalibrate"):
        smartbin.loop.recalibrate_camera()


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.pings: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "WATCHDOG=1" in data:
                self.pings.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()


@pytest.mark.parametrize("version, timeout_s", [("0.3.15", 1.0), ("0.3.20", 0.0)])
def test_a_stuck_capture_stops_the_watchdog(fake, tmp_path, monkeypatch, demo_classifier,
                                            version, timeout_s):
    """picamera2 without a wait timeout, or camera.timeout_s = 0: a camera that stops
    delivering blocks the capture, the loop's heartbeat goes stale and the watchdog pings
    stop (systemd then restarts the service); once frames flow again the item is sorted."""
    from bin_controller.assembly import build_bin
    from bin_controller.sdnotify import Notifier, heartbeat_fresh

    fake.emulate(version)
    short = Path(f"/tmp/smartbin-notify-{os.getpid()}-{version}")  # AF_UNIX paths are short
    short.unlink(missing_ok=True)
    notify = NotifySocket(short)
    monkeypatch.setenv("NOTIFY_SOCKET", str(short))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s while healthy
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = bin_config(tmp_path, timeout_s=timeout_s)
    try:
        with build_bin(cfg, classifier=demo_classifier) as smartbin:
            chute = Chute(smartbin, fake)
            loop = smartbin.loop
            stop = Notifier().start_watchdog(heartbeat_fresh(lambda: loop.heartbeat))
            thread = running(smartbin)
            try:
                assert wait_for(lambda: len(notify.pings) >= 2), "no pings while healthy"
                smartbin.camera.cam.stop_delivering()
                time.sleep(0.05)
                chute.drop(items.render(items.KINDS[1], np.random.default_rng(2)))
                assert smartbin.camera.cam.waiting.wait(10)
                assert loop.state == State.CAPTURING
                stuck = time.monotonic()
                time.sleep(1.5)
                late = [t for t in notify.pings if t > stuck + 0.6]
                assert late == [], "the watchdog was fed by a loop stuck in capture"
                smartbin.camera.cam.resume_delivering()
                assert chute.got.wait(10), "the item was not sorted once frames came back"
                assert not chute.events[-1].failed
                assert wait_for(lambda: notify.pings[-1] > stuck + 1.5), "pings did not resume"
            finally:
                stop.set()
                loop.stop()
                thread.join(10)
    finally:
        notify.close()
        short.unlink(missing_ok=True)


def test_a_dead_camera_with_a_timeout_fails_items_and_keeps_the_loop_alive(
        fake, tmp_path, demo_classifier):
    from bin_controller.assembly import build_bin

    cfg = bin_config(tmp_path, timeout_s=0.2)
    with build_bin(cfg, classifier=demo_classifier) as smartbin:
        chute = Chute(smartbin, fake)
        thread = running(smartbin)
        try:
            smartbin.camera.cam.stop_delivering()
            time.sleep(0.05)
            chute.drop(items.render(items.KINDS[3], np.random.default_rng(4)))
            assert chute.got.wait(20)
            event = chute.events[-1]
            assert event.failed and event.bin == cfg.model.fallback_bin
            assert "no frame from the camera" in event.error
            assert event.frame_time is None and event.exposure_us is None
            smartbin.camera.cam.resume_delivering()
            chute.drop(items.render(items.KINDS[3], np.random.default_rng(4)))
            assert chute.got.wait(20) and not chute.events[-1].failed
        finally:
            smartbin.loop.stop()
            thread.join(10)
        assert smartbin.camera.cam.held == 0


# --------------------------------------------------------------------------- store


def test_store_adds_the_frame_columns_to_an_old_database(tmp_path):
    from bin_controller.store import EVENT_FIELDS, Store

    old_fields = [f for f in EVENT_FIELDS
                  if f not in ("frame_time", "exposure_us", "analogue_gain")]
    db = sqlite3.connect(tmp_path / "smartbin.db")
    db.executescript(f"""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE counts (bin TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE journal (seq INTEGER PRIMARY KEY, {", ".join(old_fields)});
        CREATE TABLE pending (id INTEGER PRIMARY KEY AUTOINCREMENT, {", ".join(old_fields)});
        INSERT INTO meta VALUES ('schema', '1'), ('seq', '1');
        INSERT INTO counts VALUES ('other', 1);
    """)
    old = {"time": 1.0, "bin": "other", "label": None, "label_en": None, "confidence": None,
           "uncertain": 0, "failed": 1, "forced": 0, "cycle_ms": 1.0, "decision_ms": 1.0,
           "model": "demo", "model_version": "1", "error": "old", "bin_confidence": None}
    db.execute(f"INSERT INTO journal (seq, {', '.join(old)}) VALUES "
               f"(1, {', '.join('?' * len(old))})", list(old.values()))
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        (first,) = store.journal()
        assert first.error == "old" and first.frame_time is None and first.exposure_us is None
        event = SortEvent(time=2.0, bin="kitchen", label="x", label_en="x", confidence=0.9,
                          uncertain=False, failed=False, forced=False, cycle_ms=1.0,
                          decision_ms=1.0, model="demo", model_version="1",
                          frame_time=1.5, exposure_us=8000, analogue_gain=2.0)
        store.commit(store.begin(event))
        last = store.last_event()
        assert (last.seq, last.frame_time, last.exposure_us, last.analogue_gain) == \
            (2, 1.5, 8000, 2.0)
    finally:
        store.close()
    store = Store(tmp_path)  # opening again adds nothing and loses nothing
    assert len(store.journal()) == 2
    store.close()
