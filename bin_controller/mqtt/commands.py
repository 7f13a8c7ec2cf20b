"""Commands a dashboard sends on cmd/<name>: parsed, validated, carried out by the loop,
answered on reply/<name>.

A command's payload is a JSON object (empty means `{}`); its optional `id` is echoed in the
reply. Handlers validate everything before acting and raise `CommandError` (`BusyError`
when the bin cannot take the command right now), so a rejected command changes nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from bin_controller.bins import BINS
from bin_controller.config import Config
from bin_controller.errors import BusyError, CommandError, SmartbinError
from bin_controller.payloads import JsonObject, JsonValue

if TYPE_CHECKING:
    from bin_controller.parts import ImageClassifier

log = logging.getLogger(__name__)

RESET_CONFIRMATION = "reset_counts"

Handler = Callable[[JsonObject], JsonObject]
ReplySink = Callable[[str, JsonObject], None]


class LoopControl(Protocol):
    """What commands may ask of the sorting loop."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def sort_next(self, bin_name: str) -> None: ...

    def calibrate(self, *, bin_name: str | None = None, angle: float | None = None) -> float: ...

    def replace_classifier(self, classifier: ImageClassifier) -> ImageClassifier: ...


class CountsReset(Protocol):
    def reset_counts(self) -> dict[str, int]: ...


# ---------------------------------------------------------------------- parsing


def parse_args(payload: bytes) -> JsonObject:
    """The command's arguments; an empty payload is an empty object."""
    try:
        text = payload.decode("utf-8").strip() if payload else ""
        args = json.loads(text) if text else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"payload is not JSON: {exc}") from exc
    if not isinstance(args, dict):
        raise CommandError("payload must be a JSON object")
    return args


def _fields(args: JsonObject, *allowed: str, required: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise CommandError(f"unexpected field(s) {', '.join(unknown)}; allowed: "
                           f"{', '.join(allowed) or 'none'}")
    missing = [f for f in required if f not in args]
    if missing:
        raise CommandError(f"missing field(s) {', '.join(missing)}")


def _bin(value: JsonValue) -> str:
    if not isinstance(value, str) or value not in BINS:
        raise CommandError(f"bin must be one of {', '.join(BINS)}")
    return value


# ---------------------------------------------------------------------- handlers


def make_handlers(cfg: Config, loop: LoopControl, store: CountsReset,
                  on_counts_changed: Callable[[], None] = lambda: None, *,
                  load_classifier: Callable[[str], ImageClassifier]) -> dict[str, Handler]:
    """Command name -> handler, bound to one bin. `load_classifier` builds and checks a
    bundle's classifier (the composition root's, so a reload is built like the first)."""

    def pause(args: JsonObject) -> JsonObject:
        _fields(args)
        loop.pause()
        return {"paused": True}

    def resume(args: JsonObject) -> JsonObject:
        _fields(args)
        loop.resume()
        return {"paused": False}

    def reset_counts(args: JsonObject) -> JsonObject:
        _fields(args, "confirm", required=("confirm",))
        if args["confirm"] != RESET_CONFIRMATION:
            raise CommandError(f'confirm must be "{RESET_CONFIRMATION}"')
        before = store.reset_counts()
        on_counts_changed()
        return {"before": before}

    def sort_next(args: JsonObject) -> JsonObject:
        _fields(args, "bin", required=("bin",))
        bin_name = _bin(args["bin"])
        loop.sort_next(bin_name)
        return {"bin": bin_name}

    def calibrate(args: JsonObject) -> JsonObject:
        _fields(args, "bin", "angle")
        if ("bin" in args) == ("angle" in args):
            raise CommandError("give exactly one of bin or angle")
        try:
            if "angle" in args:
                return {"angle": loop.calibrate(angle=_angle(cfg, args["angle"]))}
            return {"angle": loop.calibrate(bin_name=_bin(args["bin"]))}
        except RuntimeError as exc:  # the loop is mid-item, or did not answer in time
            raise BusyError(str(exc)) from exc

    def reload_model(args: JsonObject) -> JsonObject:
        _fields(args, "bundle")
        ref = args.get("bundle", cfg.model.bundle)
        if not isinstance(ref, str) or not ref:
            raise CommandError("bundle must be a bundle name or folder")
        # Built and checked completely before the swap: a broken bundle changes nothing.
        new = load_classifier(ref)
        try:
            old = loop.replace_classifier(new)
        except RuntimeError as exc:  # the loop did not take it between items in time
            raise BusyError(str(exc)) from exc
        return {"model": new.bundle.name, "version": new.bundle.version,
                "previous": f"{old.bundle.name} {old.bundle.version}"}

    return {"pause": pause, "resume": resume, "reset_counts": reset_counts,
            "sort_next": sort_next, "calibrate": calibrate, "reload_model": reload_model}


def _angle(cfg: Config, value: JsonValue) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError("angle must be a number")
    if not cfg.flap.min_angle <= value <= cfg.flap.max_angle:
        raise CommandError(f"angle must be within {cfg.flap.min_angle}..{cfg.flap.max_angle}")
    return float(value)


# ---------------------------------------------------------------------- dispatch


class Commands:
    """Runs commands on its own thread: `submit` is called from paho's network thread and
    must never wait for a handler (moving the flap takes a second, a model load longer)."""

    def __init__(self, handlers: Mapping[str, Handler] | None,
                 reply: ReplySink | None = None) -> None:
        self.handlers = handlers
        self.reply = reply
        self._queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, name: str, payload: bytes) -> JsonObject:
        """Carry out one command and return its reply; never raises."""
        try:
            args = parse_args(payload)
        except CommandError as exc:
            # Nothing to run and no id to echo; this reply has always listed command first.
            return {"ok": False, "command": name, "error": str(exc)}
        request_id = args.pop("id", None)
        reply = self._run(name, args)
        reply["command"] = name
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def _run(self, name: str, args: JsonObject) -> JsonObject:
        try:
            return {"ok": True, **self._handler(name)(args)}
        except SmartbinError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            # A bug, not the sender's mistake: log it whole, answer, keep serving commands.
            log.exception("command %r failed unexpectedly", name)
            return {"ok": False, "error": f"internal error ({type(exc).__name__}: {exc}); "
                                          "see the bin's log"}

    def _handler(self, name: str) -> Handler:
        if self.handlers is None:
            raise CommandError("commands are not available")
        handler = self.handlers.get(name)
        if handler is None:
            raise CommandError(f"unknown command {name!r}; commands: "
                               f"{', '.join(self.handlers)}")
        return handler

    # ------------------------------------------------------------------ thread

    def submit(self, name: str, payload: bytes) -> None:
        self._queue.put((name, payload))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None and not self._stopping.is_set():
            name, payload = item
            reply = self.handle(name, payload)
            if self.reply is not None:
                self.reply(name, reply)

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="mqtt-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """End the thread after the command it is running; queued ones are dropped (the
        loop they would act on is stopping too)."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
