"""The bin's mechanics on gpiozero's MockFactory: chute, gate, flap, compartments.

The controller drives real gpiozero devices on mock pins. This module plays the physical
world behind those pins: a dropped item falls down the chute (waiting above the gate
while it is closed), lands on the flap and breaks the beam (or shortens the ultrasonic
echo, or fires the PIR); when the servo tips the flap past `tip_deg` the item slides off,
and when it lands the observer reads the servo's pulse width to decide which compartment
it fell into. Timing is realistic by default and zero in fast mode.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gpiozero.pins.mock import MockFactory, MockPWMPin, MockTriggerPin

from bin_controller.config import Config, SimulatorSection
from hardware_sim.compartments import Compartments
from hardware_sim.items import FRAME, item_volume

SPEED_OF_SOUND = 343.0
# State changes a mock pin remembers. gpiozero's keep every one (for its tests'
# assert_states): five per item, without end, in a simulator that runs for days.
PIN_HISTORY = 100


@dataclass
class Timing:
    fall_s: float = 0.25  # chute to flap
    slide_s: float = 0.15  # off the flap into the compartment
    servo_deg_per_s: float = 450.0  # an MG90S-class servo: about 0.13 s per 60 degrees
    tip_deg: float = 12.0  # the flap angle from rest at which an item starts to slide

    @classmethod
    def fast(cls) -> Timing:
        return cls(fall_s=0.0, slide_s=0.0, servo_deg_per_s=float("inf"))

    @classmethod
    def from_config(cls, sim: SimulatorSection) -> Timing:
        if sim.fast:
            return cls(fall_s=0.0, slide_s=0.0, servo_deg_per_s=float("inf"), tip_deg=sim.tip_deg)
        return cls(sim.fall_s, sim.slide_s, sim.servo_deg_per_s, sim.tip_deg)


@dataclass(eq=False)  # a physical object: equal only to itself
class SimItem:
    id: int
    true_class: str
    true_bin: str
    image: np.ndarray
    label_en: str = ""
    jam: bool = False  # stuck on the flap until the operator clears it
    compartment: str | None = None  # where it landed; "removed" when cleared by hand
    passed_unsorted: bool = False
    events: list[Any] = field(default_factory=list)
    uid: str = ""  # unique across runs (the world file outlives a controller)
    volume_l: float | None = None  # litres it takes in a compartment; drawn when dropped

    def __post_init__(self) -> None:
        if not self.uid:
            self.uid = f"{os.getpid()}-{time.time_ns()}-{self.id}"


class _ObservedPWMPin(MockPWMPin):
    """A mock PWM pin that tells the mechanics about every new duty cycle, and remembers
    only its last PIN_HISTORY states."""

    observer: Callable[[Any, float], None] | None = None

    def _change_state(self, value):
        changed = super()._change_state(value)
        if len(self.states) > 2 * PIN_HISTORY:
            del self.states[:-PIN_HISTORY]
        if changed and self.observer is not None:
            self.observer(self, float(value))
        return changed


class _TriggerPin(MockTriggerPin, _ObservedPWMPin):
    """MockFactory wants every pin to share the PWM-ness of its pin class."""


class _Servo:
    """The physical angle of a servo horn, lagging its command at the servo's speed."""

    def __init__(self, cfg_min_angle: float, cfg_max_angle: float, min_pulse: float,
                 max_pulse: float, speed: float, start: float) -> None:
        self.min_angle, self.max_angle = cfg_min_angle, cfg_max_angle
        self.min_pulse, self.max_pulse = min_pulse, max_pulse
        self.speed = speed
        self._from, self._to, self._t0 = start, start, time.monotonic()

    def angle_for_pulse(self, pulse: float) -> float:
        span = (pulse - self.min_pulse) / (self.max_pulse - self.min_pulse)
        return self.min_angle + span * (self.max_angle - self.min_angle)

    def angle(self, t: float | None = None) -> float:
        t = time.monotonic() if t is None else t
        if self.speed == float("inf"):
            return self._to
        travel = self.speed * max(0.0, t - self._t0)
        delta = self._to - self._from
        return self._to if abs(delta) <= travel else self._from + np.sign(delta) * travel

    def command(self, duty: float, frequency: float | None) -> None:
        now = time.monotonic()
        current = self.angle(now)
        if duty <= 0 or not frequency:
            self._from = self._to = current  # released: the horn stays where it is
        else:
            self._from, self._to = current, self.angle_for_pulse(duty / frequency)
        self._t0 = now

    def time_to_reach(self, angle: float) -> float | None:
        """Seconds until the horn passes `angle` on its current move, None if it will not."""
        lo, hi = sorted((self._from, self._to))
        if not lo <= angle <= hi:
            return None
        if self.speed == float("inf"):
            return 0.0
        return max(0.0, self._t0 + abs(angle - self._from) / self.speed - time.monotonic())


class SimBin:
    """The physical bin behind the mock pins."""

    def __init__(self, cfg: Config, timing: Timing | None = None,
                 world: Path | None = None, pin_factory: MockFactory | None = None) -> None:
        self.cfg = cfg
        self.timing = timing or Timing.from_config(cfg.simulator)
        self.world = world
        # The bin's own mock pin factory when it is given one: the controller's devices and
        # this world must share pins.
        self._own_factory = pin_factory is None
        self.pin_factory = pin_factory or MockFactory(pin_class=MockPWMPin)
        self._lock = threading.RLock()
        self.platform: list[SimItem] = []
        self.at_gate: list[SimItem] = []
        self.landed: list[SimItem] = []
        self.sorting: list[SimItem] = []  # the items on the flap when it last tipped
        self.on_tip: list[Callable[[], None]] = []
        self.on_land: list[Callable[[SimItem], None]] = []
        self._timers: list[threading.Timer] = []
        self._leave_timer: threading.Timer | None = None
        self._passing = 0
        self._sliding: list[SimItem] = []
        f = cfg.flap
        self.flap = _Servo(f.min_angle, f.max_angle, f.min_pulse_s, f.max_pulse_s,
                           self.timing.servo_deg_per_s, f.rest_angle)
        self.gate_open = True
        self._setup_sensor_pins()
        self.compartments = Compartments(cfg, self.pin_factory)
        # The running model's typical volume per label (Simulation fills it in).
        self.label_volumes: dict[str, float] = {}
        flap_pin = self.pin_factory.pin(f.pin, pin_class=_ObservedPWMPin)
        flap_pin.observer = self._flap_changed
        if cfg.gate.enabled:
            gate_pin = self.pin_factory.pin(cfg.gate.pin, pin_class=_ObservedPWMPin)
            gate_pin.observer = self._gate_changed
        self.landed_before: list[dict] = []
        if world is not None:
            self._load_world()

    # ------------------------------------------------------------------ persistence
    # The physical world outlives the controller: with a world folder, what lies on the
    # flap and what has landed are saved atomically on every change, so a controller that
    # is killed and restarted finds the bin as it was.

    def _load_world(self) -> None:
        state = self.world / "world.json"
        if not state.is_file():
            return
        data = json.loads(state.read_text())
        self.landed_before = data["landed"]
        for entry in data["platform"]:
            image = np.load(self.world / "items" / f"{entry['uid']}.npy")
            item = SimItem(entry["id"], entry["true_class"], entry["true_bin"], image,
                           label_en=entry["label_en"], uid=entry["uid"],
                           jam=entry.get("jam", False), volume_l=entry.get("volume_l"))
            self.platform.append(item)
        if "compartments" in data:
            self.compartments.restore(data["compartments"])
        self._update_sensor()

    def remember(self, item: SimItem) -> None:
        """Keep a dropped item's photo so that a restarted controller can still see it."""
        if self.world is not None:
            (self.world / "items").mkdir(parents=True, exist_ok=True)
            np.save(self.world / "items" / f"{item.uid}.npy", item.image)

    def _save_world(self) -> None:
        if self.world is None:
            return
        data = {
            "platform": [{"id": i.id, "uid": i.uid, "true_class": i.true_class,
                          "true_bin": i.true_bin, "label_en": i.label_en, "jam": i.jam,
                          "volume_l": i.volume_l}
                         for i in self.platform],
            "compartments": self.compartments.to_dict(),
            "landed": self.landed_before + [_landed_entry(i) for i in self.landed],
        }
        tmp = self.world / "world.json.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.world / "world.json")

    def hand_over_landed(self, keep: Callable[[list[dict]], None]) -> int:
        """Pass the record of landed items to `keep` (a long run's append-only log) and
        forget it here, with their photos, so that saving the world on every change stays
        small however many items a run sorts. `keep` runs first: a process killed in
        between leaves an entry in both places, never in neither (uids tell them apart)."""
        with self._lock:
            entries = self.landed_before + [_landed_entry(i) for i in self.landed]
            if not entries:
                return 0
            keep(entries)
            self.landed_before, self.landed = [], []
            self._save_world()
        if self.world is not None:
            for entry in entries:
                (self.world / "items" / f"{entry['uid']}.npy").unlink(missing_ok=True)
        return len(entries)

    # ------------------------------------------------------------------ sensor side

    def _setup_sensor_pins(self) -> None:
        s = self.cfg.sensor
        if s.type == "ultrasonic":
            self.echo_pin = self.pin_factory.pin(s.echo_pin, pin_class=_ObservedPWMPin)
            self.trigger_pin = self.pin_factory.pin(
                s.trigger_pin, pin_class=_TriggerPin, echo_pin=self.echo_pin,
                echo_time=self._echo_time(False))
        else:
            self.sensor_pin = self.pin_factory.pin(s.pin, pin_class=_ObservedPWMPin)
            self._drive(False)

    def _echo_time(self, present: bool) -> float:
        s = self.cfg.sensor
        # Empty flap: the far wall of the chute; an item: well inside the threshold.
        distance = s.threshold_m * 0.4 if present else min(s.max_distance_m * 0.9,
                                                           s.threshold_m + s.hysteresis_m + 0.1)
        return 2 * distance / SPEED_OF_SOUND

    def _drive(self, present: bool) -> None:
        s = self.cfg.sensor
        if s.type == "ultrasonic":
            self.trigger_pin.echo_time = self._echo_time(present)
            return
        high = present if (s.type == "pir" or s.beam_broken_level == "high") else not present
        if self.sensor_pin.function == "input":
            # The receiver drives the line; the pin's pull resistor is overridden.
            (self.sensor_pin.drive_high if high else self.sensor_pin.drive_low)()
        else:  # pragma: no cover - the controller never makes a sensor pin an output
            raise RuntimeError("sensor pin is not an input")

    def _update_sensor(self) -> None:
        self._drive(bool(self.platform) or self._passing > 0)

    def sync_sensor(self) -> None:
        """Drive the sensor line again once the controller has opened its device (opening
        it sets the pin's pull resistor, which would hide an item already on the flap)."""
        with self._lock:
            self._update_sensor()

    # ------------------------------------------------------------------ timing helpers

    def _after(self, seconds: float, fn: Callable[[], None]) -> threading.Timer | None:
        if seconds <= 0:
            fn()
            return None
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer

    # ------------------------------------------------------------------ the world

    def drop(self, item: SimItem) -> None:
        """Let an item go at the top of the chute."""
        self._size(item)
        self._after(self.timing.fall_s, lambda: self._reach_gate(item))

    def _reach_gate(self, item: SimItem) -> None:
        with self._lock:
            if self.cfg.gate.enabled and not self.gate_open:
                self.at_gate.append(item)
                return
        self._arrive(item)

    def _flap_tipped(self, angle: float | None = None) -> bool:
        a = self.flap.angle() if angle is None else angle
        return abs(a - self.cfg.flap.rest_angle) >= self.timing.tip_deg

    def _arrive(self, item: SimItem) -> None:
        with self._lock:
            if self._flap_tipped():
                # The flap is tipped: the item slides straight through, unsorted.
                item.passed_unsorted = True
                self._passing += 1
                self._update_sensor()
                self._after(self.timing.slide_s, lambda: self._pass_done(item))
                return
            self.platform.append(item)
            self._save_world()
            self._update_sensor()

    def _pass_done(self, item: SimItem) -> None:
        with self._lock:
            self._passing -= 1
            self._update_sensor()
        self._land(item)

    def _flap_changed(self, pin: Any, duty: float) -> None:
        with self._lock:
            self.flap.command(duty, pin.frequency)
            if self._leave_timer:
                self._leave_timer.cancel()
                self._leave_timer = None
            rest, tip = self.cfg.flap.rest_angle, self.timing.tip_deg
            target = self.flap._to
            if not self.platform or abs(target - rest) < tip:
                return
            edge = rest + tip if target > rest else rest - tip
            wait = self.flap.time_to_reach(edge)
            if wait is None:  # already beyond the tipping angle
                wait = 0.0
            self.sorting = list(self.platform)
        self._leave_timer = self._after(wait, self._slide_off)
        for cb in self.on_tip:
            cb()

    def _slide_off(self) -> None:
        with self._lock:
            leaving = [i for i in self.platform if not i.jam]
            self.platform = [i for i in self.platform if i.jam]
            self._sliding = list(leaving)  # a copy: _land removes from it while we iterate
            self._update_sensor()
        for item in leaving:
            self._after(self.timing.slide_s, lambda item=item: self._land(item))

    def _land(self, item: SimItem) -> None:
        """The observer: the flap's angle when the item lands picks the compartment."""
        angle = self.flap.angle()
        angles = self.cfg.flap.angles
        item.compartment = min(angles, key=lambda b: abs(angles[b] - angle))
        item.image = np.empty((0, 0, 3), np.uint8)  # out of view for good: free the photo
        with self._lock:
            self.compartments.land(item.compartment, self._size(item))
            self.landed.append(item)
            if item in self._sliding:
                self._sliding.remove(item)
            self._save_world()
        for cb in self.on_land:
            cb(item)

    def _gate_changed(self, pin: Any, duty: float) -> None:
        if duty <= 0 or not pin.frequency:
            return  # released: stays where it was
        g = self.cfg.gate
        angle = -90 + (duty / pin.frequency - 0.001) / 0.001 * 180
        is_open = abs(angle - g.open_angle) < abs(angle - g.closed_angle)
        with self._lock:
            self.gate_open = is_open
            waiting, self.at_gate = (self.at_gate, []) if is_open else ([], self.at_gate)
        for item in waiting:
            self._after(self.timing.fall_s, lambda item=item: self._arrive(item))

    def _size(self, item: SimItem) -> float:
        """The item's volume, drawn once from the seed and the item's number."""
        if item.volume_l is None:
            rng = np.random.default_rng([self.cfg.simulator.seed, item.id])
            item.volume_l = item_volume(item.true_class, item.true_bin, self.label_volumes,
                                        self.cfg.fill.item_volume_l, rng)
        return item.volume_l

    # ------------------------------------------------------------------ the operator's hands

    def empty(self, bin_name: str) -> float:
        """Take the bag out of a compartment: its fill drops to 0 (litres removed)."""
        with self._lock:
            removed = self.compartments.empty(bin_name)
            self._save_world()
        return removed

    def cover_sensor(self, bin_name: str) -> None:
        """A sheet of paper lands on the fill sensor above `bin_name`."""
        with self._lock:
            self.compartments.cover(bin_name)
            self._save_world()

    def uncover_sensor(self, bin_name: str) -> None:
        with self._lock:
            self.compartments.uncover(bin_name)
            self._save_world()

    def clear_jam(self) -> list[SimItem]:
        """The operator reaches in and removes whatever is stuck on the flap."""
        with self._lock:
            stuck, self.platform = [i for i in self.platform if i.jam], \
                [i for i in self.platform if not i.jam]
            for item in stuck:
                item.compartment = "removed"
                self.landed.append(item)
            self._save_world()
            self._update_sensor()
        return stuck

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        if self._own_factory:
            self.pin_factory.close()


def empty_flap(size: int = FRAME, seed: int = 0) -> np.ndarray:
    """The flap with nothing on it, as the simulated camera sees it: the dark floor of the
    chute that the items are drawn on (hardware_sim.items.render), lit a little unevenly."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-12, 12, size)[None, :, None]
    floor = 80 + ramp + rng.normal(0, 6, (size, size, 3))
    return np.clip(floor, 0, 255).astype(np.uint8)


def _landed_entry(item: SimItem) -> dict:
    return {"uid": item.uid, "compartment": item.compartment, "true_bin": item.true_bin}


class SimCamera:
    """Photographs whatever lies on the flap (the empty flap when nothing does); can be told
    to fail."""

    def __init__(self, sim: SimBin, *, fail_next: int = 0, hang_s: float = 0.0) -> None:
        self.sim = sim
        self.fail_next = fail_next
        self.hang_s = hang_s
        self.captures = 0  # photos of an item
        self._empty = empty_flap()

    def capture(self) -> np.ndarray:
        from bin_controller.errors import CameraError

        if self.hang_s:
            time.sleep(self.hang_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise CameraError("simulated camera failure")
        with self.sim._lock:
            if not self.sim.platform:
                # The loop only captures when an item is present; aiming and checking tools
                # photograph the empty flap.
                return self._empty.copy()
            item = self.sim.platform[0]
        self.captures += 1
        return item.image

    def close(self) -> None:
        pass
