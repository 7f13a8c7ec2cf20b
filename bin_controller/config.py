"""Configuration: one TOML file, validated against a schema on load.

Unknown keys are rejected, types and ranges checked, and an error names the key path, the
bad value and what is allowed. With no file at all the defaults run the simulator. The
schema also generates the configuration reference in the README (`smartbin config-doc`).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from bin_controller.bins import BINS
from bin_controller.errors import ConfigError

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "merge", "path_problem"]

# A configuration file is a page of settings; anything larger is not one (and is not read
# whole into memory to find out).
MAX_CONFIG_BYTES = 1_000_000
# TOML integers are 64-bit; a larger Python int (from code, not a file) is refused the same
# way rather than overflowing later in float() or in a C library.
MAX_INT = 2**63 - 1
# Linux limits: a path of more bytes, or a name in it of more, fails in every file call.
PATH_MAX_BYTES = 4096
NAME_MAX_BYTES = 255
# bin.id is a topic level and part of the MQTT client id; a host name is at most 63.
BIN_ID_MAX_CHARS = 64
# A bad value is quoted in the error up to this many characters: the error stays one line.
SHOWN_VALUE_CHARS = 80


def _opt(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None,
         min: float | None = None, max: float | None = None, factory: Any = None,
         path: bool = False) -> Any:
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _hostname() -> str:
    return socket.gethostname().split(".")[0] or "smartbin"


def _default_state_dir() -> str:
    # systemd's StateDirectory= hands the folder over in $STATE_DIRECTORY.
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "smartbin")


@dataclass(frozen=True)
class BinSection:
    id: str = _opt(None, "Bin id used in MQTT topics and logs: one topic level (no '/', "
                         "'+', '#' or spaces); defaults to the host name. Home Assistant "
                         "gets a safe id made from it (letters, digits, '_').",
                   factory=_hostname)
    state_dir: str = _opt(None, "Folder for the count database; defaults to $STATE_DIRECTORY "
                                "or ~/.local/state/smartbin.", factory=_default_state_dir,
                          path=True)


@dataclass(frozen=True)
class ModelSection:
    bundle: str = _opt("demo", "Model bundle: a folder, or a name looked up in model.dir, "
                               "then among the bundles shipped with smartbin.", path=True)
    dir: str = _opt(None, "Folder of trained and taught bundles; defaults to $SMARTBIN_MODELS "
                          "or <bin.state_dir>/models.", factory=str, path=True)
    backend: str = _opt("auto", "TFLite runtime.",
                        choices=("auto", "litert", "tflite-runtime", "tensorflow"))
    threads: int = _opt(2, "Interpreter threads.", min=1, max=8)
    backbone: str = _opt("", "Local file or folder for a downloadable backbone (optional).",
                         path=True)
    confidence_threshold: float = _opt(0.5, "Below this bin probability (the sum over "
                                            "the bin's labels) the item goes to fallback_bin, "
                                            "marked uncertain.", min=0.0, max=1.0)
    fallback_bin: str = _opt("other", "Bin for uncertain and failed items.", choices=BINS)
    retries: int = _opt(2, "Extra attempts after a camera or classifier error.", min=0, max=10)


@dataclass(frozen=True)
class HardwareSection:
    pin_factory: str = _opt("auto", "gpiozero pin factory: auto picks the Pi's (lgpio on "
                                    "Pi OS); mock is gpiozero's MockFactory.",
                            choices=("auto", "lgpio", "rpigpio", "pigpio", "native", "mock"))


@dataclass(frozen=True)
class SensorSection:
    type: str = _opt("beam", "Presence sensor: IR break-beam, ultrasonic distance or PIR motion.",
                     choices=("beam", "ultrasonic", "pir"))
    pin: int = _opt(17, "GPIO (BCM) of the break-beam receiver or PIR output.", min=0, max=27)
    beam_broken_level: str = _opt("low", "Level of the beam receiver when the beam is broken.",
                                  choices=("low", "high"))
    trigger_pin: int = _opt(23, "Ultrasonic TRIG GPIO.", min=0, max=27)
    echo_pin: int = _opt(24, "Ultrasonic ECHO GPIO (through a 5 V -> 3.3 V divider).", min=0,
                         max=27)
    threshold_m: float = _opt(0.2, "Ultrasonic: an item is present nearer than this.",
                              min=0.02, max=2.0)
    hysteresis_m: float = _opt(0.03, "Ultrasonic: present until farther than threshold + this.",
                               min=0.0, max=0.5)
    max_distance_m: float = _opt(0.5, "Ultrasonic: readings are clamped here.", min=0.1, max=4.0)
    settle_s: float = _opt(0.15, "An item counts as present only after this long.", min=0.0,
                           max=5.0)
    jam_s: float = _opt(4.0, "Still present this long after the flap moved: a jam; more "
                             "than flap.move_s + flap.hold_s.", min=0.1, max=120.0)


@dataclass(frozen=True)
class CameraSection:
    type: str = _opt("picamera2", "Camera on the bin (picamera2), or the simulator's.",
                     choices=("picamera2", "simulated"))
    width: int = _opt(304, "Capture width (a multiple of 16 suits the ISP); about 4:3.",
                      min=64, max=4056)
    height: int = _opt(224, "Capture height: the model's input height, so that the frame "
                            "needs one cheap resize pass (or none for a centre crop).",
                       min=64, max=3040)
    warmup_s: float = _opt(1.0, "Time for exposure and white balance to settle at start.",
                           min=0.0, max=10.0)
    led_pin: int = _opt(-1, "GPIO of an illumination LED lit during the shot; -1 for none.",
                        min=-1, max=27)
    led_settle_s: float = _opt(0.05, "Time between lighting the LED and the shot.", min=0.0,
                               max=2.0)
    exposure: str = _opt("auto", "auto: exposure and white balance follow the light; locked: "
                                 "they settle at start (LED lit, flap empty) and on "
                                 "cmd/recalibrate_camera, then stay fixed so every item is "
                                 "seen the same way.", choices=("auto", "locked"))
    crop: dict[str, float] = _opt(None, "Region of interest in frame pixels, the part that "
                                        "holds the flap, cut out before the model's resize: "
                                        "{ x = 40, y = 0, width = 224, height = 224 }; empty: "
                                        "the whole frame.", factory=dict)
    timeout_s: float = _opt(2.0, "A capture that gets no frame this long fails (CameraError, "
                                 "retried); 0: wait for ever (the systemd watchdog restarts a "
                                 "stuck camera).", min=0.0, max=60.0)


def _default_angles() -> dict[str, float]:
    return {"recyclable": -60.0, "kitchen": -20.0, "hazardous": 20.0, "other": 60.0}


@dataclass(frozen=True)
class FlapSection:
    pin: int = _opt(18, "Servo signal GPIO (hardware PWM pins 12, 13, 18, 19 jitter least).",
                    min=0, max=27)
    angles: dict[str, float] = _opt(None, "Flap angle per bin, degrees.",
                                    factory=_default_angles)
    rest_angle: float = _opt(0.0, "Angle that holds the item while it is photographed; "
                                  "within min_angle..max_angle.", min=-90, max=90)
    min_angle: float = _opt(-90.0, "Angle at min_pulse_s.", min=-180, max=0)
    max_angle: float = _opt(90.0, "Angle at max_pulse_s.", min=0, max=180)
    min_pulse_s: float = _opt(0.0005, "Servo pulse width at min_angle.", min=0.0001, max=0.003)
    max_pulse_s: float = _opt(0.0025, "Servo pulse width at max_angle.", min=0.0005, max=0.004)
    move_s: float = _opt(0.35, "Time the servo needs for a move.", min=0.0, max=5.0)
    hold_s: float = _opt(0.4, "Time held at the bin angle while the item slides off.", min=0.0,
                         max=5.0)


@dataclass(frozen=True)
class GateSection:
    enabled: bool = _opt(False, "A second servo that closes the chute during a cycle.")
    pin: int = _opt(13, "Gate servo GPIO.", min=0, max=27)
    open_angle: float = _opt(90.0, "Gate open.", min=-90, max=90)
    closed_angle: float = _opt(0.0, "Gate closed.", min=-90, max=90)
    move_s: float = _opt(0.3, "Time the gate servo needs for a move.", min=0.0, max=5.0)


@dataclass(frozen=True)
class LoopSection:
    cooldown_s: float = _opt(0.2, "Pause after each item before the next is accepted.",
                             min=0.0, max=10.0)
    tick_s: float = _opt(1.0, "Longest wait without checking health (watchdog pings).",
                         min=0.05, max=10.0)


@dataclass(frozen=True)
class StoreSection:
    synchronous: str = _opt("full", "SQLite durability: full survives a power cut; normal only "
                                    "a crash of the service.", choices=("full", "normal"))
    journal_keep: int = _opt(100_000, "Items kept in the journal (older ones are pruned).",
                             min=100, max=10_000_000)
    outbox_max: int = _opt(100_000, "Undelivered MQTT messages kept while the broker is away; "
                                    "when full the oldest event messages are dropped (counts "
                                    "stay exact).", min=100, max=10_000_000)


@dataclass(frozen=True)
class PhotosSection:
    keep: str = _opt("all", "Which items' photos are kept: all, uncertain (uncertain and "
                            "failed items only) or none (no photo is written; privacy).",
                     choices=("all", "uncertain", "none"))
    dir: str = _opt("", "Folder of the photo log; empty: <bin.state_dir>/photos.", path=True)
    max_mb: float = _opt(500.0, "Most the photos may take; past it the oldest confident, "
                                "unreviewed photos go first (photos waiting for a review and "
                                "reviewed ones are kept).", min=1.0, max=1_000_000.0)
    keep_days: float = _opt(30.0, "Confident, unreviewed photos older than this are deleted; "
                                  "photos waiting for a review and reviewed ones are kept.",
                            min=0.01, max=36500.0)
    min_free_mb: float = _opt(200.0, "Photos are deleted (and not written) to keep this much "
                                     "of the disk free for the counts.", min=0.0,
                              max=1_000_000.0)
    quality: int = _opt(85, "JPEG quality of a kept photo.", min=30, max=100)
    thumbnail_px: int = _opt(224, "Longer side of the per-item picture sent over MQTT.",
                             min=32, max=1024)


def _per_bin(values: tuple[float, ...]) -> Any:
    return lambda: dict(zip(BINS, values, strict=True))


@dataclass(frozen=True)
class FillSection:
    sensor: str = _opt("none", "Fill sensor in each compartment: none (an estimate from the "
                               "items sorted), ultrasonic (gpiozero DistanceSensor), vl53l0x "
                               "or vl53l1x (time of flight on I2C; pip extra 'tof').",
                       choices=("none", "ultrasonic", "vl53l0x", "vl53l1x"))
    capacity_l: dict[str, float] = _opt(None, "Volume of each compartment, litres.",
                                        factory=_per_bin((40.0, 20.0, 10.0, 40.0)))
    item_volume_l: dict[str, float] = _opt(None, "Typical volume of an item per bin, litres, "
                                                 "for labels whose bundle gives none.",
                                           factory=_per_bin((0.5, 0.3, 0.1, 0.4)))
    trigger_pins: dict[str, float] = _opt(None, "Ultrasonic: TRIG GPIO per compartment.",
                                          factory=_per_bin((5, 6, 16, 20)))
    echo_pins: dict[str, float] = _opt(None, "Ultrasonic: ECHO GPIO per compartment (through "
                                             "a 5 V -> 3.3 V divider).",
                                       factory=_per_bin((22, 25, 26, 27)))
    i2c_addresses: dict[str, float] = _opt(None, "Time of flight: I2C address per compartment "
                                                 "(0x08 to 0x77; TOML takes 0x30).",
                                           factory=_per_bin((0x30, 0x31, 0x32, 0x33)))
    xshut_pins: dict[str, float] = _opt(None, "Time of flight: XSHUT GPIO per compartment, so "
                                              "that each sensor gets its address at start.",
                                        factory=_per_bin((5, 6, 16, 20)))
    empty_m: float = _opt(0.6, "Distance from a sensor to the floor of its empty compartment.",
                          min=0.05, max=4.0)
    full_m: float = _opt(0.1, "Distance from a sensor to the contents of a full compartment "
                              "(100 %); less than empty_m.", min=0.02, max=4.0)
    interval_s: float = _opt(5.0, "Seconds between sensor readings.", min=0.05, max=3600.0)
    smoothing: int = _opt(5, "Readings in the median that smooths a sensor.", min=1, max=50)
    warn_pct: float = _opt(80.0, "Fill level that warns.", min=1.0, max=100.0)
    full_pct: float = _opt(95.0, "Fill level at which a compartment is full: nothing is "
                                 "sorted onto it.", min=1.0, max=100.0)
    hysteresis_pct: float = _opt(5.0, "A state (warn, full) ends this far below its level.",
                                 min=0.0, max=50.0)
    when_full: str = _opt("fallback_bin", "An item for a full compartment: fallback_bin (goes "
                                          "to model.fallback_bin, else waits as hold), pause "
                                          "(the bin pauses with a fault until resumed), hold "
                                          "(it waits on the flap until emptied).",
                          choices=("fallback_bin", "pause", "hold"))
    estimate_margin_pct: float = _opt(30.0, "Until a sensor reading says how much room they "
                                            "really took, items count this much larger than "
                                            "their typical volume: the estimate errs on the "
                                            "full side (with no sensor, full comes early "
                                            "rather than late).", min=0.0, max=200.0)
    fault_gap_pct: float = _opt(40.0, "A reading this far above the estimate (the last good "
                                      "reading plus the items sorted since) is a sensor fault "
                                      "(a sheet over the sensor), not a full compartment.",
                                min=5.0, max=100.0)
    emptied_drop_pct: float = _opt(30.0, "A smoothed level that falls this much means the "
                                         "compartment was emptied.", min=5.0, max=100.0)


@dataclass(frozen=True)
class MqttSection:
    enabled: bool = _opt(False, "Publish over MQTT (smartbin run/simulate --mqtt also sets it).")
    host: str = _opt("localhost", "Broker host (not empty when enabled).")
    port: int = _opt(1883, "Broker port (8883 is usual for TLS).", min=1, max=65535)
    prefix: str = _opt("smartbin", "Topic prefix; topics are <prefix>/<bin id>/...")
    keepalive_s: int = _opt(30, "MQTT keepalive.", min=5, max=3600)
    username: str = _opt("", "Username (empty: none).")
    password_file: str = _opt("", "File holding the password; else the systemd credential "
                                  "mqtt_password when present.", path=True)
    tls: bool = _opt(False, "Connect with TLS.")
    ca_file: str = _opt("", "CA certificate (PEM) for TLS; empty: the system's.", path=True)
    cert_file: str = _opt("", "Client certificate (PEM) for TLS client authentication.",
                          path=True)
    key_file: str = _opt("", "Client key (PEM).", path=True)
    discovery: bool = _opt(True, "Publish Home Assistant MQTT discovery.")
    discovery_prefix: str = _opt("homeassistant", "Home Assistant discovery prefix.")
    stats_interval_s: float = _opt(60.0, "Seconds between stats messages.", min=1.0,
                                   max=3600.0)
    dashboard_url: str = _opt("", "Web address of the bin's dashboard (http:// or https://), "
                                  "shown as the device's configuration URL in Home Assistant; "
                                  "empty: none.")


@dataclass(frozen=True)
class SimulatorSection:
    """Only read when camera.type = "simulated": the physical world behind the mock pins."""

    fast: bool = _opt(False, "Simulator: items fall, slide and the servo turns in no time.")
    fall_s: float = _opt(0.25, "Simulator: time an item takes from the chute to the flap.",
                         min=0.0, max=10.0)
    slide_s: float = _opt(0.15, "Simulator: time an item takes off the flap into a "
                                "compartment.", min=0.0, max=10.0)
    servo_deg_per_s: float = _opt(450.0, "Simulator: servo speed (an MG90S turns about 60 "
                                         "degrees in 0.13 s).", min=1.0, max=100000.0)
    tip_deg: float = _opt(12.0, "Simulator: flap angle from rest at which an item slides off "
                                "(every flap.angles value must reach it).", min=1.0, max=90.0)
    world_dir: str = _opt("", "Simulator: folder where the world (what lies on the flap, what "
                              "landed) is kept across restarts; empty: in memory.", path=True)
    drop_interval_s: float = _opt(0.0, "Simulator: a person drops a generated item this often "
                                       "while the service runs; 0: nobody does.",
                                  min=0.0, max=3600.0)
    drop_items: int = _opt(0, "Simulator: the person stops after this many items; 0: never.",
                           min=0, max=10_000_000)
    seed: int = _opt(0, "Simulator: seed of the generated items.", min=0, max=2**31 - 1)
    images: str = _opt("", "Simulator: a folder of class folders of photos (e.g. TrashNet) the "
                           "person drops instead of generated items; empty: generated items.",
                       path=True)
    images_bin_map: str = _opt("", "Simulator: bin map (name or JSON file) of the `images` "
                                   "folders; empty: the bin from `<bin>_<item>` folder names.",
                               path=True)
    hang_camera_at: int = _opt(0, "Simulator: this capture never returns (to see the "
                                  "watchdog act); 0: none.", min=0, max=10_000_000)


# Overrides for a simulation without mechanical delays: the controller's waits and the
# simulated world's physics both take no time.
FAST_MECHANICS: dict[str, dict[str, Any]] = {
    "simulator": {"fast": True}, "sensor": {"settle_s": 0.0},
    "flap": {"move_s": 0.0, "hold_s": 0.0}, "gate": {"move_s": 0.0},
    "loop": {"cooldown_s": 0.0}, "camera": {"warmup_s": 0.0}}


@dataclass(frozen=True)
class Config:
    bin: BinSection = field(default_factory=BinSection)
    model: ModelSection = field(default_factory=ModelSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    sensor: SensorSection = field(default_factory=SensorSection)
    camera: CameraSection = field(default_factory=CameraSection)
    flap: FlapSection = field(default_factory=FlapSection)
    gate: GateSection = field(default_factory=GateSection)
    loop: LoopSection = field(default_factory=LoopSection)
    store: StoreSection = field(default_factory=StoreSection)
    photos: PhotosSection = field(default_factory=PhotosSection)
    fill: FillSection = field(default_factory=FillSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    simulator: SimulatorSection = field(default_factory=SimulatorSection)

    def to_dict(self) -> dict[str, Any]:
        """The raw table this config would be read from (every value explicit)."""
        return asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new config: this one's values with `overrides` merged in, validated again as
        a whole (the original is frozen and stays as it was)."""
        return config_from_dict(self.to_dict(), overrides)


# --------------------------------------------------------------------------- validation


def _show(value: Any) -> str:
    """The bad value as an error line quotes it: its repr, shortened; also for an int too
    long to print and a value nested too deep to repr."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        bits = value.bit_length() if isinstance(value, int) else 0
        return f"<an integer of {bits} bits>"
    except RecursionError:
        return "<a value nested too deep>"
    if len(text) > SHOWN_VALUE_CHARS:
        text = text[:SHOWN_VALUE_CHARS - 3] + "..."
    return text


def _clip(name: str) -> str:
    """A key as an error line names it: shortened like a value, unquoted unless it holds
    characters that would break the line (a newline, a control character): then quoted."""
    if not name.isprintable():
        return _show(name)
    return name if len(name) <= SHOWN_VALUE_CHARS else name[:SHOWN_VALUE_CHARS - 3] + "..."


def path_problem(text: str) -> str | None:
    """Why `text` cannot name a file here (as the end of "... must ..."), or None."""
    if "\0" in text:
        return "must not contain a NUL character"
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        return "must be valid text"
    if len(raw) > PATH_MAX_BYTES:
        return f"must be at most {PATH_MAX_BYTES} bytes long"
    if any(len(name) > NAME_MAX_BYTES for name in raw.split(b"/")):
        return f"must not have a file or folder name longer than {NAME_MAX_BYTES} bytes"
    return None


def _text_problem(text: str) -> str | None:
    if "\0" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid text"
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is dict:
        return "a table of numbers"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp))


def _has_type(value: Any, tp: Any) -> bool:
    if isinstance(value, bool):
        return tp is bool
    return ((tp is int and isinstance(value, int))
            or (tp is float and isinstance(value, int | float))
            or (tp is str and isinstance(value, str)))


def _range_text(meta: Mapping[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    return f"between {lo} and {hi}" if lo is not None or hi is not None else ""


def _number(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """An int in 64 bits, or a finite float: NaN compares false with every bound and would
    pass the range check, infinity overflows timers and servo maths."""
    between = _range_text(meta)
    if tp is int:
        if abs(value) > MAX_INT:
            raise ConfigError(f"{path} = {_show(value)}: must be "
                              f"{between or f'an integer of at most {MAX_INT}'}")
        return value
    try:
        number = float(value)
    except OverflowError as exc:  # an int beyond float range, from code rather than TOML
        raise ConfigError(f"{path} = {_show(value)}: must be "
                          f"{between or 'a finite number'}") from exc
    if not math.isfinite(number):
        raise ConfigError(f"{path} = {number!r}: must be a finite number"
                          + (f" {between}" if between else ""))
    return number


def _check_value(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    if get_origin(tp) is dict:
        return _check_table(path, value, get_args(tp)[1])
    if not _has_type(value, tp):
        raise ConfigError(f"{path} = {_show(value)}: must be {_type_name(tp)}")
    if tp is int or tp is float:
        value = _number(path, value, tp, meta)
    if tp is str:
        problem = path_problem(value) if meta.get("path") else _text_problem(value)
        if problem:
            raise ConfigError(f"{path} = {_show(value)}: {problem}")
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{path} = {_show(value)}: must be one of {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{path} = {_show(value)}: must be {_range_text(meta)}")
    return value


def _check_table(path: str, value: Any, value_type: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path} = {_show(value)}: must be a table, e.g. {{ other = 60 }}")
    return {k: _check_value(f"{path}.{_clip(str(k))}", v, value_type, {})
            for k, v in value.items()}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            where = f"[{prefix}]" if prefix else "the top level"
            allowed = ", ".join(known)
            raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{_clip(str(key))} "
                              f"in {where}; allowed: {allowed}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            if not isinstance(data[name], dict):
                raise ConfigError(f"{path} must be a table: [{path}]")
            kwargs[name] = _build(tp, data[name], path)
        else:
            kwargs[name] = _check_value(path, data[name], tp, dict(f.metadata))
    return cls(**kwargs)


def _check_flap(flap: FlapSection) -> None:
    angles = flap.angles
    missing = [b for b in BINS if b not in angles]
    unknown = [b for b in angles if b not in BINS]
    if unknown:
        raise ConfigError(f"flap.angles.{_clip(unknown[0])}: unknown bin; bins are "
                          f"{', '.join(BINS)}")
    if missing:
        raise ConfigError(f"flap.angles: no angle for {', '.join(missing)}; every bin needs one")
    if flap.min_angle >= flap.max_angle:
        raise ConfigError(f"flap.min_angle = {flap.min_angle!r}: must be smaller than "
                          f"flap.max_angle ({flap.max_angle!r})")
    for b, a in angles.items():
        if not flap.min_angle <= a <= flap.max_angle:
            raise ConfigError(f"flap.angles.{b} = {a}: outside min_angle..max_angle "
                              f"({flap.min_angle}..{flap.max_angle})")
    # gpiozero refuses an initial angle outside the servo's range, at start, with a
    # traceback: say it here instead.
    if not flap.min_angle <= flap.rest_angle <= flap.max_angle:
        raise ConfigError(f"flap.rest_angle = {flap.rest_angle!r}: outside min_angle..max_angle "
                          f"({flap.min_angle}..{flap.max_angle})")
    if flap.min_pulse_s >= flap.max_pulse_s:
        raise ConfigError(f"flap.min_pulse_s = {flap.min_pulse_s!r}: must be smaller than "
                          f"flap.max_pulse_s ({flap.max_pulse_s!r})")


def _check_timing(cfg: Config) -> None:
    # The jam timer must not run out before a slow item has had the flap's whole tip to
    # slide off: a shorter one declares every such item a jam.
    flap, jam_s = cfg.flap, cfg.sensor.jam_s
    if jam_s <= flap.move_s + flap.hold_s:
        raise ConfigError(f"sensor.jam_s = {jam_s!r}: must be more than flap.move_s + "
                          f"flap.hold_s ({flap.move_s:g} + {flap.hold_s:g} = "
                          f"{flap.move_s + flap.hold_s:g} s, the time an item has to slide "
                          "off); raise jam_s or shorten the flap times")
    if cfg.gate.enabled and cfg.gate.open_angle == cfg.gate.closed_angle:
        raise ConfigError(f"gate.closed_angle = {cfg.gate.closed_angle!r}: must differ from "
                          f"gate.open_angle ({cfg.gate.open_angle!r}), or the gate never "
                          "closes")


def _check_sensor(sensor: SensorSection) -> None:
    if sensor.type == "ultrasonic" and \
            sensor.threshold_m + sensor.hysteresis_m >= sensor.max_distance_m:
        raise ConfigError("sensor.threshold_m + sensor.hysteresis_m must be below "
                          "sensor.max_distance_m")


def _check_bin_id(bin_id: str) -> None:
    # The id is one level of every topic (<prefix>/<id>/...) and part of the client id.
    bad = (not bin_id or len(bin_id) > BIN_ID_MAX_CHARS
           or any(ch in "/+#" or ch.isspace() or not ch.isprintable() for ch in bin_id))
    if bad:
        raise ConfigError(f"bin.id = {_show(bin_id)}: must be a single MQTT topic level: 1 to "
                          f"{BIN_ID_MAX_CHARS} characters, no '/', '+', '#', spaces or "
                          "control characters")


def _check_mqtt(mqtt: MqttSection) -> None:
    host = mqtt.host
    if mqtt.enabled and not host:
        raise ConfigError("mqtt.host = '': must name the broker when mqtt.enabled is true, "
                          "e.g. \"localhost\"")
    if any(ch in "/" or ch.isspace() or not ch.isprintable() for ch in host):
        raise ConfigError(f"mqtt.host = {_show(host)}: must be a host name or IP address "
                          "(no scheme such as mqtt://, no path, no spaces)")
    for name in ("prefix", "discovery_prefix"):
        value = getattr(mqtt, name)
        if not value or any(ch in value for ch in "#+") or value.startswith("/") \
                or value.endswith("/"):
            raise ConfigError(f"mqtt.{name} = {_show(value)}: must be a topic path without "
                              "wildcards or leading/trailing '/'")
    if mqtt.tls and bool(mqtt.cert_file) != bool(mqtt.key_file):
        raise ConfigError("mqtt.cert_file and mqtt.key_file go together")
    _check_dashboard_url(mqtt.dashboard_url)


def _check_dashboard_url(url: str) -> None:
    # Home Assistant refuses a whole discovery config whose configuration_url is not a URL.
    if not url:
        return
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a port that is not a number raises
    except ValueError:
        host = None
    if (not host or parts.scheme not in ("http", "https")
            or any(ch.isspace() or not ch.isprintable() for ch in url)):
        raise ConfigError(f"mqtt.dashboard_url = {_show(url)}: must be an http:// or https:// "
                          "address with a host, e.g. \"http://bin.local:8080/\", or empty")


def _check_pins(cfg: Config) -> None:
    pins = {"sensor.pin": cfg.sensor.pin} if cfg.sensor.type != "ultrasonic" else {
        "sensor.trigger_pin": cfg.sensor.trigger_pin, "sensor.echo_pin": cfg.sensor.echo_pin}
    pins["flap.pin"] = cfg.flap.pin
    if cfg.gate.enabled:
        pins["gate.pin"] = cfg.gate.pin
    if cfg.camera.led_pin >= 0:
        pins["camera.led_pin"] = cfg.camera.led_pin
    pins.update(_fill_pins(cfg.fill))
    seen: dict[int, str] = {}
    for name, pin in pins.items():
        if pin in seen:
            raise ConfigError(f"{name} = {pin}: GPIO {pin} is already used by {seen[pin]}")
        seen[pin] = name
    _check_crop(cfg.camera)


I2C_PINS = {2: "I2C SDA", 3: "I2C SCL"}
I2C_ADDRESSES = (0x08, 0x77)  # 7-bit addresses outside the reserved ranges


def _fill_pins(fill: FillSection) -> dict[str, int]:
    """The GPIOs the fill sensors use, named by their key."""
    if fill.sensor == "ultrasonic":
        tables = {"trigger_pins": fill.trigger_pins, "echo_pins": fill.echo_pins}
    elif fill.sensor in ("vl53l0x", "vl53l1x"):
        tables = {"xshut_pins": fill.xshut_pins}
    else:
        return {}
    pins = {}
    for key, table in tables.items():
        for b in BINS:  # complete: see _complete_fill_tables
            pin = table[b]
            if pin != int(pin) or not 0 <= pin <= 27:
                raise ConfigError(f"fill.{key}.{b} = {pin:g}: must be a GPIO from 0 to 27")
            if fill.sensor != "ultrasonic" and int(pin) in I2C_PINS:
                raise ConfigError(f"fill.{key}.{b} = {pin:g}: GPIO {pin:g} is the "
                                  f"{I2C_PINS[int(pin)]} line the sensors use")
            pins[f"fill.{key}.{b}"] = int(pin)
    return pins


FILL_TABLES = ("capacity_l", "item_volume_l", "trigger_pins", "echo_pins", "i2c_addresses",
               "xshut_pins")


def _complete_fill_tables(cfg: Config) -> Config:
    """A [fill] table that names some compartments keeps the defaults for the others, so
    `capacity_l = { kitchen = 20 }` sets the kitchen's alone."""
    defaults = FillSection()
    given: dict[str, Any] = {key: {**getattr(defaults, key), **getattr(cfg.fill, key)}
                             for key in FILL_TABLES}
    return replace(cfg, fill=replace(cfg.fill, **given))


def _check_fill(cfg: Config) -> None:
    fill = cfg.fill
    for key in FILL_TABLES:
        unknown = [b for b in getattr(fill, key) if b not in BINS]
        if unknown:
            raise ConfigError(f"fill.{key}.{_clip(unknown[0])}: unknown bin; bins are "
                              f"{', '.join(BINS)}")
    for b in BINS:
        if fill.capacity_l.get(b, 0) <= 0:
            raise ConfigError(f"fill.capacity_l.{b} must be a volume above 0 litres")
        if fill.item_volume_l.get(b, 0) <= 0:
            raise ConfigError(f"fill.item_volume_l.{b} must be a volume above 0 litres")
    if fill.full_m >= fill.empty_m:
        raise ConfigError(f"fill.full_m = {fill.full_m:g}: must be less than fill.empty_m "
                          f"({fill.empty_m:g}): the contents come nearer the sensor as it fills")
    if fill.warn_pct > fill.full_pct:
        raise ConfigError(f"fill.warn_pct = {fill.warn_pct:g}: must not be above fill.full_pct "
                          f"({fill.full_pct:g})")
    if fill.sensor in ("vl53l0x", "vl53l1x"):
        lo, hi = I2C_ADDRESSES
        seen: dict[int, str] = {}
        for b in BINS:
            address = fill.i2c_addresses[b]
            if address != int(address) or not lo <= address <= hi:
                raise ConfigError(f"fill.i2c_addresses.{b} = {address:g} (0x{int(address):x}): "
                                  f"out of range; 7-bit I2C addresses run from 0x{lo:02x} to "
                                  f"0x{hi:02x}")
            if int(address) in seen:
                raise ConfigError(f"fill.i2c_addresses.{b} = 0x{int(address):x}: already the "
                                  f"address of {seen[int(address)]}")
            seen[int(address)] = b


CROP_KEYS = ("x", "y", "width", "height")
MIN_CROP_PX = 16  # smaller regions hold too little of an item for any model input


def _check_crop(camera: CameraSection) -> None:
    crop = camera.crop
    if not crop:
        return
    example = "e.g. { x = 40, y = 0, width = 224, height = 224 }"
    if sorted(crop) != sorted(CROP_KEYS):
        raise ConfigError(f"camera.crop needs exactly the keys {', '.join(CROP_KEYS)} (frame "
                          f"pixels), {example}; got {', '.join(crop) or 'none'}")
    for key in CROP_KEYS:
        if crop[key] != int(crop[key]) or crop[key] < 0:
            raise ConfigError(f"camera.crop.{key} = {crop[key]:g}: must be a whole number of "
                              "pixels, 0 or more")
    for size, offset, limit in (("width", "x", camera.width), ("height", "y", camera.height)):
        if crop[size] < MIN_CROP_PX:
            raise ConfigError(f"camera.crop.{size} = {crop[size]:g}: must be at least "
                              f"{MIN_CROP_PX} pixels")
        if crop[offset] + crop[size] > limit:
            raise ConfigError(f"camera.crop: {offset} + {size} = {crop[offset] + crop[size]:g} "
                              f"lies outside the {camera.width}x{camera.height} frame "
                              f"(camera.{size} = {limit}); make the region smaller or move it")


def _check_simulated(cfg: Config) -> None:
    if cfg.camera.type != "simulated":
        return
    if cfg.hardware.pin_factory != "mock":
        raise ConfigError(f"camera.type = 'simulated' needs hardware.pin_factory = 'mock' (the "
                          f"simulated bin drives gpiozero's mock pins), not "
                          f"{cfg.hardware.pin_factory!r}")
    # An angle short of the simulated tip never lets the item slide: every item would jam.
    rest, tip = cfg.flap.rest_angle, cfg.simulator.tip_deg
    for b, a in cfg.flap.angles.items():
        if abs(a - rest) < tip:
            raise ConfigError(f"flap.angles.{b} = {a:g}: only {abs(a - rest):g} degrees from "
                              f"flap.rest_angle ({rest:g}); the simulated item slides off at "
                              f"simulator.tip_deg = {tip:g}: lower tip_deg or widen the angle")


def _cross_checks(cfg: Config) -> None:
    _check_flap(cfg.flap)
    _check_timing(cfg)
    _check_sensor(cfg.sensor)
    _check_bin_id(cfg.bin.id)
    _check_mqtt(cfg.mqtt)
    _check_pins(cfg)
    _check_fill(cfg)
    _check_simulated(cfg)


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, table by table (neither is changed)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


def config_from_dict(data: Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None) -> Config:
    """Validate a raw table (with command-line or simulator overrides laid over it first,
    so every check sees the final values) into a frozen Config."""
    cfg: Config = _build(Config, merge(dict(data), overrides or {}), "")
    cfg = _complete_fill_tables(cfg)
    _cross_checks(cfg)
    if not cfg.model.dir:
        models = os.environ.get("SMARTBIN_MODELS") or str(Path(cfg.bin.state_dir) / "models")
        cfg = replace(cfg, model=replace(cfg.model, dir=models))
    return cfg


def _show_path(p: Path) -> str:
    text = str(p)
    return text if text.isprintable() and len(text) <= PATH_MAX_BYTES else _show(text)


def _read_toml(p: Path, name: str) -> dict[str, Any]:
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{name}: no such configuration file") from exc
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(f"{name}: cannot read: {exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_CONFIG_BYTES:,} bytes; not a "
                          "configuration file")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: cannot read: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from exc
    except ValueError as exc:
        if "integer string conversion" not in str(exc):
            raise ConfigError(f"{name}: not valid TOML: {exc}") from exc
        # tomllib's int() of a number past Python's digit limit
        raise ConfigError(f"{name}: not valid TOML: a number has more than "
                          f"{sys.get_int_max_str_digits()} digits") from exc
    except RecursionError as exc:
        raise ConfigError(f"{name}: not valid TOML: arrays or tables nested too deep") from exc


def load_config(path: str | Path | None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The configuration in `path` (the defaults when None), with `overrides` merged in
    before validation."""
    if path is None:
        return config_from_dict({}, overrides)
    p = Path(path)
    name = _show_path(p)
    data = _read_toml(p, name)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def reference() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, description) for every option, for the docs."""
    rows = []
    defaults = Config()
    for section in fields(Config):
        cls = get_type_hints(Config)[section.name]
        hints = get_type_hints(cls)
        sec_default = getattr(defaults, section.name)
        for f in fields(cls):
            meta = f.metadata
            doc = meta.get("doc", "")
            if meta.get("choices"):
                doc += " One of: " + ", ".join(map(str, meta["choices"])) + "."
            elif meta.get("min") is not None:
                doc += f" Range {meta['min']} to {meta['max']}."
            default = getattr(sec_default, f.name)
            if f.name in ("id", "state_dir", "dir"):
                default = "(see description)"
            rows.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), default, doc))
    return rows


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (kept in the README)."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, kind, default, doc in reference():
        if isinstance(default, dict):
            default = ", ".join(f"{k} = {v:g}" for k, v in default.items())
        elif isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, str) and default != "(see description)":
            default = f'"{default}"'
        lines.append(f"| `{key}` | {kind} | {default} | {doc} |")
    return "\n".join(lines) + "\n"


def example_toml() -> str:
    """A commented config.toml with every option at its default (systemd/config.example.toml)."""
    lines = ["# smartbin configuration. Every option is shown at its default, commented out;",
             "# uncomment and change what your bin needs. Reference: README.md, or",
             "# `smartbin config-doc`. Check a file with `smartbin check --config FILE`.", ""]
    section = None
    for key, _kind, default, doc in reference():
        sec, name = key.split(".", 1)
        if sec != section:
            if section is not None:
                lines.append("")
            lines.append(f"[{sec}]")
            section = sec
        lines.append(f"# {doc}")
        if default == "(see description)":
            lines.append(f"# {name} = ...")
            continue
        if isinstance(default, dict):
            value = "{ " + ", ".join(f"{k} = {v:g}" for k, v in default.items()) + " }"
        elif isinstance(default, bool):
            value = str(default).lower()
        elif isinstance(default, str):
            value = f'"{default}"'
        else:
            value = repr(default)
        lines.append(f"# {name} = {value}")
    return "\n".join(lines) + "\n"
