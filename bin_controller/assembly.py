"""The composition root: the one place that turns a validated config into a running bin.

Service, simulator, benchmarks and tests all build the bin here. Parts are opened in the
order of the cycle (pins, camera, sensor, classifier, flap, gate, store, telemetry) and
closed in reverse; hardware comes from the registry by configuration. Callers may hand in
a classifier or a recorder of their own (a simulation that keeps counts in memory, a test's
broken classifier); everything else follows from the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gpiozero import Factory

from bin_controller.config import Config, ModelSection
from bin_controller.fill import FillTracker
from bin_controller.hardware import registry
from bin_controller.hardware.fill_sensors import make_fill_sensors
from bin_controller.hardware.flap import ServoFlap, ServoGate
from bin_controller.hardware.sensors import make_sensor
from bin_controller.mqtt.telemetry import Telemetry
from bin_controller.parts import (
    Background,
    Camera,
    Flap,
    Gate,
    ImageClassifier,
    PresenceSensor,
    Recorder,
)
from bin_controller.payloads import event_message
from bin_controller.photolog import PhotoLog, photos_dir
from bin_controller.sitelog import SiteLog
from bin_controller.sorter import SortingLoop
from bin_controller.store import Store
from bin_controller.teaching import TeachJob
from bin_controller.vision.classifier import Classifier

if TYPE_CHECKING:
    from bin_controller.mqtt.commands import Handler
    from bin_controller.review import Reviews

log = logging.getLogger(__name__)


def make_classifier(model: ModelSection, *, bundle: str | None = None,
                    threads: int | None = None) -> Classifier:
    """The classifier `model` describes (or another bundle with the same settings), loaded
    and checked completely: a broken bundle raises before anything uses it."""
    return Classifier(bundle or model.bundle, backend=model.backend,
                      num_threads=threads or model.threads, backbone=model.backbone or None,
                      models_dir=model.dir)


def open_store(cfg: Config, *, on_fault: Callable[[str, str], None] | None = None) -> Store:
    return Store(cfg.bin.state_dir, synchronous=cfg.store.synchronous.upper(),
                 journal_keep=cfg.store.journal_keep, outbox_max=cfg.store.outbox_max,
                 message=event_message, on_fault=on_fault)


def open_photos(cfg: Config, store: Store) -> PhotoLog:
    """The photo log and its site log, beside the store; the store frees photo space first
    when the disk fills."""
    sitelog = SiteLog(cfg.bin.state_dir, last_seq=store.last_seq())
    try:
        photos = PhotoLog(cfg.photos, photos_dir(cfg), sitelog)
    except BaseException:
        sitelog.close()
        raise
    store.spare = photos.spare
    return photos


@dataclass
class Bin:
    """Every part of one bin, wired; `start()` brings it to life, `close()` ends it."""

    config: Config
    pin_factory: Factory
    camera: Camera
    sensor: PresenceSensor
    classifier: ImageClassifier
    flap: Flap
    gate: Gate | None
    recorder: Recorder
    loop: SortingLoop
    store: Store | None = None
    photos: PhotoLog | None = None
    fill: FillTracker | None = None
    telemetry: Telemetry | None = None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def start(self) -> None:
        """Start the parts' own work, settle an item cut short by a crash, connect MQTT."""
        for part in (self.camera, self.sensor, self.flap, self.gate):
            if isinstance(part, Background):
                part.start()
        if self.store is not None:
            decided = bool(self.store.pending())
            for event in self.store.recover(item_still_present=self.sensor.present):
                log.info("recovered item #%d (%s)", event.seq, event.bin)
            # An item decided but not counted is the one on the flap; otherwise an item on
            # the flap while the last counted one was never seen to leave is that one.
            if self.store.uncleared() and not (decided and self.sensor.present):
                if self.sensor.present:
                    log.warning("the last item counted before the restart still lies on the "
                                "flap: waiting for it to be cleared, not sorting it again")
                    self.loop.hold_until_clear()
                else:
                    self.store.cleared()
        if self.photos is not None:
            self.photos.start()
        if self.fill is not None:
            self.fill.start()
        if self.telemetry is not None:
            self.telemetry.start()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Bin:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def build_bin(cfg: Config, *, classifier: ImageClassifier | None = None,
              recorder: Recorder | None = None) -> Bin:
    """The bin `cfg` describes. With no recorder, counts go to the SQLite store in
    bin.state_dir (and MQTT, when enabled, publishes from it)."""
    with ExitStack() as stack:
        pin_factory = registry.make_pin_factory(cfg.hardware.pin_factory)
        stack.callback(pin_factory.close)
        camera = registry.make_camera(cfg, pin_factory)
        stack.callback(camera.close)
        sensor = make_sensor(cfg.sensor, pin_factory)
        stack.callback(sensor.close)
        if classifier is None:
            classifier = make_classifier(cfg.model)
        flap = ServoFlap(cfg.flap, pin_factory)
        stack.callback(flap.close)
        gate = None
        if cfg.gate.enabled:
            gate = ServoGate(cfg.gate, pin_factory)
            stack.callback(gate.close)
        store = None
        opening: list[tuple[str, str]] = []  # store faults from before the loop exists
        if recorder is None:
            store = recorder = open_store(
                cfg, on_fault=lambda kind, detail: opening.append((kind, detail)))
            stack.callback(store.close)
        photos = fill = None
        if store is not None:
            photos = open_photos(cfg, store)
            stack.callback(photos.sitelog.close)
            stack.callback(photos.close)
            fill = FillTracker(cfg.fill, cfg.bin.state_dir,
                               sensors=make_fill_sensors(cfg.fill, pin_factory))
            stack.callback(fill.close)
        loop = SortingLoop(config=cfg, sensor=sensor, camera=camera, classifier=classifier,
                           flap=flap, recorder=recorder, gate=gate, photos=photos, fill=fill)
        if isinstance(recorder, Store) and (recorder is store or recorder.on_fault is None):
            _route_store_faults(recorder, loop, opening)
        if photos is not None:
            photos.on_fault = loop.report_fault
        if fill is not None:
            _wire_fill(fill, loop)
        telemetry = None
        if cfg.mqtt.enabled and store is not None:
            telemetry = _telemetry(cfg, loop, store, photos, fill)
            stack.callback(telemetry.stop)
        return Bin(config=cfg, pin_factory=pin_factory, camera=camera, sensor=sensor,
                   classifier=classifier, flap=flap, gate=gate, recorder=recorder, loop=loop,
                   store=store, photos=photos, fill=fill, telemetry=telemetry,
                   _stack=stack.pop_all())
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack never swallows


def _wire_fill(fill: FillTracker, loop: SortingLoop) -> None:
    """Item volumes from the running model's labels; a compartment becoming full and a
    sensor that reads nonsense are the loop's faults (counted, logged, published)."""
    def volume_of(label: str | None) -> float | None:
        for known in loop.classifier.bundle.labels:
            if known.name == label:
                return known.volume_l
        return None

    fill.volume_of = volume_of
    fill.on_full.append(lambda bin_name, pct: loop.report_fault(
        "full", f"{bin_name} is {pct:.0f} % full: nothing more is sorted into it until it is "
                "emptied"))
    fill.on_sensor_fault.append(lambda bin_name, detail: loop.report_fault("fill_sensor",
                                                                            detail))


def _route_store_faults(store: Store, loop: SortingLoop,
                        opening: list[tuple[str, str]]) -> None:
    """The store's faults (a full disk, a database rebuilt at open) become the loop's:
    counted, logged once, and published on MQTT `fault` like a jam."""
    store.on_fault = loop.report_fault
    for kind, detail in opening:
        loop.report_fault(kind, detail)


def _teach_job(cfg: Config, loop: SortingLoop, reviews: Reviews, reload_model: Handler,
               on_change: Callable[[], None]) -> TeachJob:
    """`cmd/teach`: the running bundle taught from the reviewed photos in a child process,
    the accepted bundle installed in the models folder and swapped in by `reload_model`."""
    from bin_controller.model_updates import ModelsFolder

    def install(bundle_dir: Path) -> dict[str, Any]:
        installed = ModelsFolder(cfg.model.dir).install(bundle_dir)
        reloaded = reload_model({"bundle": installed.name})
        return {"installed": installed.version, **reloaded}

    def base() -> tuple[Path, str]:
        bundle = loop.classifier.bundle
        return bundle.path, bundle.name

    return TeachJob(state_dir=Path(cfg.bin.state_dir), export=reviews.export, base=base,
                    install=install, on_change=on_change,
                    backbone=cfg.model.backbone or None)


def _with_teach(loop: SortingLoop, job: TeachJob) -> Callable[[], dict[str, Any]]:
    """The retained state's status with the background teach's progress (null before the
    first teach)."""
    def status() -> dict[str, Any]:
        return {**loop.status(), "teach": job.snapshot()}

    return status


def _telemetry(cfg: Config, loop: SortingLoop, store: Store, photos: PhotoLog | None,
               fill: FillTracker | None) -> Telemetry:
    from bin_controller.model_updates import ModelsFolder
    from bin_controller.mqtt.commands import make_handlers
    from bin_controller.mqtt.fill_commands import make_fill_handlers
    from bin_controller.mqtt.model_commands import make_model_handlers
    from bin_controller.mqtt.review_commands import make_review_handlers
    from bin_controller.mqtt.teach_commands import make_capture_handler, make_teach_handlers
    from bin_controller.review import Reviews

    telemetry: Telemetry | None = None

    def counts_changed() -> None:
        if telemetry is not None and telemetry.connected.is_set():
            telemetry.publish_counts()

    def publish_reply(suffix: str, payload: bytes) -> str:
        assert telemetry is not None  # commands run only once telemetry has started
        return telemetry.publish_reply(suffix, payload)

    def model_changed() -> None:
        if telemetry is not None:
            telemetry.publish_state()

    handlers = make_handlers(
        cfg, loop, store, counts_changed,
        load_classifier=lambda ref: make_classifier(cfg.model, bundle=ref),
        on_model_changed=model_changed)
    handlers.update(make_model_handlers(ModelsFolder(cfg.model.dir),
                                        lambda: loop.classifier.bundle.name,
                                        handlers["reload_model"]))
    status = loop.status
    teach_job = None
    if photos is not None:
        # The labels of the model running now: a reload_model changes what a review knows.
        reviews = Reviews(photos.sitelog, photos.folder,
                          lambda: loop.classifier.bundle.labels)
        handlers.update(make_review_handlers(reviews, photos, publish_reply, counts_changed))
        teach_job = _teach_job(cfg, loop, reviews, handlers["reload_model"], model_changed)
        handlers.update(make_teach_handlers(teach_job))
        handlers.update(make_capture_handler(loop, cfg.bin.state_dir,
                                             lambda: loop.classifier.bundle.labels))
        status = _with_teach(loop, teach_job)
    if fill is not None:
        handlers.update(make_fill_handlers(fill))
    telemetry = Telemetry(cfg.mqtt, bin_id=cfg.bin.id, store=store, commands=handlers,
                          status=status, photos=photos, fill=fill)
    if teach_job is not None:
        telemetry.on_stop.append(teach_job.stop)
    loop.on_event.append(telemetry.on_event)
    loop.on_state.append(telemetry.on_state)
    loop.on_fault.append(telemetry.on_fault)
    if photos is not None:
        photos.on_photo.append(telemetry.on_photo)
    if fill is not None:
        fill.on_change.append(telemetry.on_fill)
        fill.on_emptied.append(telemetry.on_emptied)
    return telemetry
