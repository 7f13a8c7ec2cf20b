"""Configuration: one TOML file, validated against a schema on load.

Unknown keys are rejected, types and ranges checked, and an error names the key path, the
bad value and what is allowed. With no file at all the defaults run the simulator. The
schema also generates the configuration reference in the README (`smartbin config-doc`).
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from bin_controller.bins import BINS
from bin_controller.errors import ConfigError

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "merge"]


def _opt(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None,
         min: float | None = None, max: float | None = None, factory: Any = None) -> Any:
    meta = {"doc": doc, "choices": choices, "min": min, "max": max}
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
    id: str = _opt(None, "Bin id used in MQTT topics and logs; defaults to the host name.",
                   factory=_hostname)
    state_dir: str = _opt(None, "Folder for the count database; defaults to $STATE_DIRECTORY "
                                "or ~/.local/state/smartbin.", factory=_default_state_dir)


@dataclass(frozen=True)
class ModelSection:
    bundle: str = _opt("demo", "Model bundle: a folder, or a name looked up in model.dir, "
                               "then among the bundles shipped with smartbin.")
    dir: str = _opt(None, "Folder of trained and taught bundles; defaults to $SMARTBIN_MODELS "
                          "or <bin.state_dir>/models.", factory=str)
    backend: str = _opt("auto", "TFLite runtime.",
                        choices=("auto", "litert", "tflite-runtime", "tensorflow"))
    threads: int = _opt(2, "Interpreter threads.", min=1, max=8)
    backbone: str = _opt("", "Local file or folder for a downloadable backbone (optional).")
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
    jam_s: float = _opt(4.0, "Still present this long after the flap moved: a jam.", min=0.1,
                        max=120.0)


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
    rest_angle: float = _opt(0.0, "Angle that holds the item while it is photographed.",
                             min=-90, max=90)
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
class MqttSection:
    enabled: bool = _opt(False, "Publish over MQTT (smartbin run/simulate --mqtt also sets it).")
    host: str = _opt("localhost", "Broker host.")
    port: int = _opt(1883, "Broker port (8883 is usual for TLS).", min=1, max=65535)
    prefix: str = _opt("smartbin", "Topic prefix; topics are <prefix>/<bin id>/...")
    keepalive_s: int = _opt(30, "MQTT keepalive.", min=5, max=3600)
    username: str = _opt("", "Username (empty: none).")
    password_file: str = _opt("", "File holding the password; else the systemd credential "
                                  "mqtt_password when present.")
    tls: bool = _opt(False, "Connect with TLS.")
    ca_file: str = _opt("", "CA certificate (PEM) for TLS; empty: the system's.")
    cert_file: str = _opt("", "Client certificate (PEM) for TLS client authentication.")
    key_file: str = _opt("", "Client key (PEM).")
    discovery: bool = _opt(True, "Publish Home Assistant MQTT discovery.")
    discovery_prefix: str = _opt("homeassistant", "Home Assistant discovery prefix.")
    stats_interval_s: float = _opt(60.0, "Seconds between stats messages.", min=1.0,
                                   max=3600.0)


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
    tip_deg: float = _opt(12.0, "Simulator: flap angle from rest at which an item slides off.",
                          min=1.0, max=90.0)
    world_dir: str = _opt("", "Simulator: folder where the world (what lies on the flap, what "
                              "landed) is kept across restarts; empty: in memory.")
    drop_interval_s: float = _opt(0.0, "Simulator: a person drops a generated item this often "
                                       "while the service runs; 0: nobody does.",
                                  min=0.0, max=3600.0)
    drop_items: int = _opt(0, "Simulator: the person stops after this many items; 0: never.",
                           min=0, max=10_000_000)
    seed: int = _opt(0, "Simulator: seed of the generated items.", min=0, max=2**31 - 1)
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


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is dict:
        return "a table of numbers"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp))


def _check_value(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    origin = get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r}: must be a table, e.g. {{ other = 60 }}")
        value_type = get_args(tp)[1]
        out = {}
        for k, v in value.items():
            out[k] = _check_value(f"{path}.{k}", v, value_type, {})
        return out
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{path} = {value!r}: must be {_type_name(tp)}")
    if tp is float:
        value = float(value)
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{path} = {value!r}: must be one of {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{path} = {value!r}: must be between {lo} and {hi}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            where = f"[{prefix}]" if prefix else "the top level"
            allowed = ", ".join(known)
            raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{key} in {where}; "
                              f"allowed: {allowed}")
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


def _cross_checks(cfg: Config) -> None:
    angles = cfg.flap.angles
    missing = [b for b in BINS if b not in angles]
    unknown = [b for b in angles if b not in BINS]
    if unknown:
        raise ConfigError(f"flap.angles.{unknown[0]}: unknown bin; bins are {', '.join(BINS)}")
    if missing:
        raise ConfigError(f"flap.angles: no angle for {', '.join(missing)}; every bin needs one")
    for b, a in angles.items():
        if not cfg.flap.min_angle <= a <= cfg.flap.max_angle:
            raise ConfigError(f"flap.angles.{b} = {a}: outside min_angle..max_angle "
                              f"({cfg.flap.min_angle}..{cfg.flap.max_angle})")
    if cfg.camera.type == "simulated" and cfg.hardware.pin_factory != "mock":
        raise ConfigError(f"camera.type = 'simulated' needs hardware.pin_factory = 'mock' (the "
                          f"simulated bin drives gpiozero's mock pins), not "
                          f"{cfg.hardware.pin_factory!r}")
    for name in ("prefix", "discovery_prefix"):
        value = getattr(cfg.mqtt, name)
        if not value or any(ch in value for ch in "#+") or value.startswith("/") \
                or value.endswith("/"):
            raise ConfigError(f"mqtt.{name} = {value!r}: must be a topic path without "
                              "wildcards or leading/trailing '/'")
    if cfg.mqtt.tls and bool(cfg.mqtt.cert_file) != bool(cfg.mqtt.key_file):
        raise ConfigError("mqtt.cert_file and mqtt.key_file go together")
    if cfg.flap.min_pulse_s >= cfg.flap.max_pulse_s:
        raise ConfigError("flap.min_pulse_s must be smaller than flap.max_pulse_s")
    if cfg.sensor.type == "ultrasonic" and \
            cfg.sensor.threshold_m + cfg.sensor.hysteresis_m >= cfg.sensor.max_distance_m:
        raise ConfigError("sensor.threshold_m + sensor.hysteresis_m must be below "
                          "sensor.max_distance_m")
    pins = {"sensor.pin": cfg.sensor.pin} if cfg.sensor.type != "ultrasonic" else {
        "sensor.trigger_pin": cfg.sensor.trigger_pin, "sensor.echo_pin": cfg.sensor.echo_pin}
    pins["flap.pin"] = cfg.flap.pin
    if cfg.gate.enabled:
        pins["gate.pin"] = cfg.gate.pin
    if cfg.camera.led_pin >= 0:
        pins["camera.led_pin"] = cfg.camera.led_pin
    seen: dict[int, str] = {}
    for name, pin in pins.items():
        if pin in seen:
            raise ConfigError(f"{name} = {pin}: GPIO {pin} is already used by {seen[pin]}")
        seen[pin] = name
    _check_crop(cfg.camera)


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
    _cross_checks(cfg)
    if not cfg.model.dir:
        models = os.environ.get("SMARTBIN_MODELS") or str(Path(cfg.bin.state_dir) / "models")
        cfg = replace(cfg, model=replace(cfg.model, dir=models))
    return cfg


def load_config(path: str | Path | None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The configuration in `path` (the defaults when None), with `overrides` merged in
    before validation."""
    if path is None:
        return config_from_dict({}, overrides)
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: no such configuration file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


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
