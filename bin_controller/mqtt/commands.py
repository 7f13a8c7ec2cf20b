"""Commands a dashboard sends on cmd/<name>: parsed, validated, carried out by the loop,
answered on reply/<name>.

A command's payload is a JSON object (empty means `{}`); its optional `id` is echoed in the
reply. Handlers validate everything before acting and raise `CommandError` (`BusyError`
when the bin cannot take the command right now), so a rejected command changes nothing.

Every command gets exactly one reply, whatever its payload: the payload is parsed within
the limits of `payloads.parse_json`, commands wait in a bounded queue (a full queue refuses
the new command at once), `pause` and `resume` have a lane and a thread of their own so a
burst of slow commands never delays them, and each command runs within a time limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bin_controller.bins import BINS
from bin_controller.config import Config
from bin_controller.errors import BusyError, CommandError, SmartbinError
from bin_controller.payloads import MAX_JSON_BYTES, JsonObject, JsonValue, parse_json
from bin_controller.vision.bundle import MANIFEST, SHIPPED_MODELS

if TYPE_CHECKING:
    from bin_controller.parts import ImageClassifier

log = logging.getLogger(__name__)

RESET_CONFIRMATION = "reset_counts"

# Commands waiting per lane. A dashboard sends one at a time; a hundred waiting means a
# flood, and refusing the newest at once tells its sender, where a silent drop would not.
MAX_QUEUED = 100
# Instant flag changes on the loop: their own lane and thread, ahead of slow work.
PRIORITY = frozenset({"pause", "resume"})
# How long a command may run before its reply says busy. `calibrate` waits 10 s for the
# loop itself; `reload_model` loads a bundle and then waits up to 120 s for the loop to
# swap it in between items.
TIME_LIMIT_S = 15.0
TIME_LIMITS_S: Mapping[str, float] = {"reload_model": 180.0, "rollback": 180.0,
                                       "capture": 60.0}
# A bundle name is one folder name: well under every file system's 255-byte limit.
MAX_BUNDLE_NAME = 100

Handler = Callable[[JsonObject], JsonObject]
ReplySink = Callable[[str, JsonObject], None]


class LoopControl(Protocol):
    """What commands may ask of the sorting loop."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def sort_next(self, bin_name: str) -> None: ...

    def calibrate(self, *, bin_name: str | None = None, angle: float | None = None) -> float: ...

    def replace_classifier(self, classifier: ImageClassifier) -> ImageClassifier: ...

    def recalibrate_camera(self) -> dict[str, Any]: ...


class CountsReset(Protocol):
    def reset_counts(self) -> dict[str, int]: ...


# ---------------------------------------------------------------------- parsing


def parse_args(payload: bytes) -> JsonObject:
    """The command's arguments; an empty payload is an empty object."""
    if len(payload) <= MAX_JSON_BYTES and not payload.strip():
        return {}
    try:
        args = parse_json(payload)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if not isinstance(args, dict):
        raise CommandError("payload must be a JSON object")
    return args


def request_id(payload: bytes) -> JsonValue:
    """The `id` a reply echoes, or None when the payload has none (or cannot be read)."""
    try:
        return parse_args(payload).get("id")
    except CommandError:
        return None


def check_fields(args: JsonObject, *allowed: str, required: tuple[str, ...] = ()) -> None:
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


def bundle_name(value: JsonValue) -> str:
    """A bundle's name as reload_model accepts it: one plain folder name, never a path, so
    a command can load only what the models folder or the shipped bundles hold."""
    if not isinstance(value, str) or not value:
        raise CommandError("bundle must be a bundle name (a folder in the models folder or "
                           "a shipped bundle)")
    if len(value) > MAX_BUNDLE_NAME:
        raise CommandError(f"bundle name is {len(value)} characters; the limit is "
                           f"{MAX_BUNDLE_NAME}")
    if (any(ch in value for ch in "/\\\0") or ".." in value or value.startswith(".")
            or not value.isprintable()):
        raise CommandError(f"bundle {value!r} is not a bundle name: give the name of a "
                           "folder in the models folder or of a shipped bundle, not a path")
    return value


def named_bundle(models_dir: str, name: str) -> Path:
    """The folder of the bundle called `name`: in the models folder, else shipped."""
    places = [Path(models_dir).expanduser(), SHIPPED_MODELS]
    for folder in places:
        if (folder / name / MANIFEST).is_file():
            return folder / name
    raise CommandError(f"no bundle named {name!r} in the models folder {places[0]} nor among "
                       f"the shipped bundles ({', '.join(_names(SHIPPED_MODELS))})")


def _names(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if (d / MANIFEST).is_file())


# ---------------------------------------------------------------------- handlers


def make_handlers(cfg: Config, loop: LoopControl, store: CountsReset,
                  on_counts_changed: Callable[[], None] = lambda: None, *,
                  load_classifier: Callable[[str], ImageClassifier],
                  on_model_changed: Callable[[], None] = lambda: None) -> dict[str, Handler]:
    """Command name -> handler, bound to one bin. `load_classifier` builds and checks a
    bundle's classifier (the composition root's, so a reload is built like the first);
    `on_model_changed` is called after a reload swapped the model in (the retained state
    names the model)."""

    def pause(args: JsonObject) -> JsonObject:
        check_fields(args)
        loop.pause()
        return {"paused": True}

    def resume(args: JsonObject) -> JsonObject:
        check_fields(args)
        loop.resume()
        return {"paused": False}

    def reset_counts(args: JsonObject) -> JsonObject:
        check_fields(args, "confirm", required=("confirm",))
        if args["confirm"] != RESET_CONFIRMATION:
            raise CommandError(f'confirm must be "{RESET_CONFIRMATION}"')
        before = store.reset_counts()
        on_counts_changed()
        return {"before": before}

    def sort_next(args: JsonObject) -> JsonObject:
        check_fields(args, "bin", required=("bin",))
        bin_name = _bin(args["bin"])
        loop.sort_next(bin_name)
        return {"bin": bin_name}

    def calibrate(args: JsonObject) -> JsonObject:
        check_fields(args, "bin", "angle")
        if ("bin" in args) == ("angle" in args):
            raise CommandError("give exactly one of bin or angle")
        try:
            if "angle" in args:
                return {"angle": loop.calibrate(angle=_angle(cfg, args["angle"]))}
            return {"angle": loop.calibrate(bin_name=_bin(args["bin"]))}
        except RuntimeError as exc:  # the loop is mid-item, or did not answer in time
            raise BusyError(str(exc)) from exc

    def reload_model(args: JsonObject) -> JsonObject:
        check_fields(args, "bundle")
        # The configured bundle may be a path (the config is the owner's); a command's is
        # a name, looked up in the two bundle folders only (never the working directory).
        ref = (str(named_bundle(cfg.model.dir, bundle_name(args["bundle"])))
               if "bundle" in args else cfg.model.bundle)
        # Built and checked completely before the swap: a broken bundle changes nothing.
        new = load_classifier(ref)
        try:
            old = loop.replace_classifier(new)
        except RuntimeError as exc:  # the loop did not take it between items in time
            raise BusyError(str(exc)) from exc
        try:  # the model is in: its reply must say so, whatever telling others costs
            on_model_changed()
        except Exception:
            log.exception("after reload_model: publishing the new model failed")
        return {"model": new.bundle.name, "version": new.bundle.version,
                "previous": f"{old.bundle.name} {old.bundle.version}"}

    def recalibrate_camera(args: JsonObject) -> JsonObject:
        check_fields(args)
        # CommandError (no exposure to fix), BusyError (an item on the flap) and
        # HardwareError (exposure = 'auto', a camera failure) are answered as errors.
        settled = loop.recalibrate_camera()
        return {"exposure_us": settled.get("exposure_us"),
                "analogue_gain": settled.get("analogue_gain"),
                "colour_gains": settled.get("colour_gains")}

    return {"pause": pause, "resume": resume, "reset_counts": reset_counts,
            "sort_next": sort_next, "calibrate": calibrate, "reload_model": reload_model,
            "recalibrate_camera": recalibrate_camera}


def _angle(cfg: Config, value: JsonValue) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError("angle must be a number")
    if not cfg.flap.min_angle <= value <= cfg.flap.max_angle:
        raise CommandError(f"angle must be within {cfg.flap.min_angle}..{cfg.flap.max_angle}")
    return float(value)


# ---------------------------------------------------------------------- dispatch


class Commands:
    """Runs commands on threads of their own: `submit` is called from paho's network thread
    and must never wait for a handler (moving the flap takes a second, a model load longer).

    Two lanes, each a bounded queue and a thread: `pause`/`resume`, and everything else.
    Each command runs on a short-lived thread of its own, so a handler that overruns its
    time limit gets a busy reply and the lane moves on; until it finishes, the lane answers
    busy at once (two handlers of a lane never run together).
    """

    def __init__(self, handlers: Mapping[str, Handler] | None,
                 reply: ReplySink | None = None, *, max_queued: int = MAX_QUEUED,
                 time_limit_s: float = TIME_LIMIT_S,
                 time_limits_s: Mapping[str, float] = TIME_LIMITS_S) -> None:
        self.handlers = handlers
        self.reply = reply
        self.time_limit_s = time_limit_s
        self.time_limits_s = time_limits_s
        self._priority = _Lane("mqtt-commands-priority", max_queued, self._work)
        self._normal = _Lane("mqtt-commands", max_queued, self._work)

    def handle(self, name: str, payload: bytes) -> JsonObject:
        """Carry out one command now, on the caller's thread, and return its reply; never
        raises (short of BaseExceptions such as KeyboardInterrupt) and has no time limit."""
        try:
            args = parse_args(payload)
        except CommandError as exc:
            # Nothing to run and no id to echo; this reply has always listed command first.
            return {"ok": False, "command": name, "error": str(exc)}
        request = args.pop("id", None)
        reply = self._run(name, args)
        reply["command"] = name
        if request is not None:
            reply["id"] = request
        return reply

    def _run(self, name: str, args: JsonObject) -> JsonObject:
        try:
            return {"ok": True, **self._handler(name)(args)}
        except SmartbinError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            # A bug, not the sender's mistake: log it whole, answer, keep serving commands.
            log.exception("command %r failed unexpectedly", name)
            return _internal_error(exc)

    def _handler(self, name: str) -> Handler:
        if self.handlers is None:
            raise CommandError("commands are not available")
        handler = self.handlers.get(name)
        if handler is None:
            raise CommandError(f"unknown command {name!r}; commands: "
                               f"{', '.join(self.handlers)}")
        return handler

    def time_limit(self, name: str) -> float:
        return self.time_limits_s.get(name, self.time_limit_s)

    # ------------------------------------------------------------------ threads

    def submit(self, name: str, payload: bytes) -> None:
        """Queue a command (from paho's thread: never blocks); refused at once when full."""
        lane = self._priority if name in PRIORITY else self._normal
        if lane.offer(name, payload):
            return
        error = CommandError(f"queue full: {lane.capacity} commands are waiting; try again "
                             "later")
        self._send(name, _refusal(name, payload, error))

    def _work(self, lane: _Lane, name: str, payload: bytes) -> None:
        """Run one queued command and send its reply; whatever happens, the lane goes on."""
        try:
            reply = self._execute(lane, name, payload)
        except BaseException as exc:  # even SystemExit must not end the lane
            log.exception("command %r failed unexpectedly", name)
            reply = {**_internal_error(exc), "command": name}
        self._send(name, reply)

    def _execute(self, lane: _Lane, name: str, payload: bytes) -> JsonObject:
        busy = lane.still_running()
        if busy is not None:
            return _refusal(name, payload, BusyError(
                f"busy: {busy.name} has been running for {busy.age():.0f} s; try again "
                "later"))
        run = _Run(name, lambda: self.handle(name, payload))
        limit = self.time_limit(name)
        if run.wait(limit) or not run.abandon():
            return run.outcome()
        lane.overrun = run
        log.warning("command %s did not finish within %g s; it carries on in the "
                    "background and other commands get a busy reply until it ends",
                    name, limit)
        return _refusal(name, payload, BusyError(
            f"{name} did not finish within {limit:g} s; it may still complete (see the "
            "bin's log)"))

    def _send(self, name: str, reply: JsonObject) -> None:
        if self.reply is None:
            return
        try:
            self.reply(name, reply)
        except Exception:
            log.exception("cannot send the reply to command %r", name)

    def start(self) -> None:
        self._priority.start()
        self._normal.start()

    def stop(self, timeout: float = 3.0) -> None:
        """End the threads after the commands they are running; queued ones are dropped
        (the loop they would act on is stopping too)."""
        self._priority.stop(timeout)
        self._normal.stop(timeout)


def _internal_error(exc: BaseException) -> JsonObject:
    return {"ok": False, "error": f"internal error ({type(exc).__name__}: {exc}); "
                                  "see the bin's log"}


def _refusal(name: str, payload: bytes, error: CommandError) -> JsonObject:
    """The reply to a command that was not run, shaped like a handler's error."""
    reply: JsonObject = {"ok": False, "error": str(error), "command": name}
    request = request_id(payload)
    if request is not None:
        reply["id"] = request
    return reply


class _Run:
    """One command running on a daemon thread of its own (a stuck handler must not keep
    the process from exiting)."""

    def __init__(self, name: str, fn: Callable[[], JsonObject]) -> None:
        self.name = name
        self.started = time.monotonic()
        self._fn = fn
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._reply: JsonObject | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._target, name="mqtt-command", daemon=True).start()

    def _target(self) -> None:
        reply: JsonObject | None = None
        error: BaseException | None = None
        try:
            reply = self._fn()
        except BaseException as exc:  # handed to the lane, which logs it
            error = exc
        with self._lock:
            self._reply, self._error = reply, error
            self._done.set()
            late = self._abandoned
        if late:
            outcome = f"failed: {error!r}" if error is not None else _outcome_text(reply)
            log.warning("command %s finished %.0f s after it started, past its time limit: "
                        "%s", self.name, self.age(), outcome)

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def done(self) -> bool:
        return self._done.is_set()

    def abandon(self) -> bool:
        """Give up waiting; False when it finished meanwhile (then use its outcome)."""
        with self._lock:
            if self._done.is_set():
                return False
            self._abandoned = True
            return True

    def outcome(self) -> JsonObject:
        if self._error is not None:
            raise self._error
        assert self._reply is not None  # set together with _done
        return self._reply

    def age(self) -> float:
        return time.monotonic() - self.started


def _outcome_text(reply: JsonObject | None) -> str:
    if reply is None:
        return "no reply"
    return "ok" if reply.get("ok") else f"error: {reply.get('error')}"


class _Lane:
    """A bounded FIFO of commands and the thread that works through it."""

    def __init__(self, name: str, capacity: int,
                 work: Callable[[_Lane, str, bytes], None]) -> None:
        self.name = name
        self.capacity = capacity
        self.overrun: _Run | None = None  # a command past its time limit, maybe still running
        self._work = work
        self._items: deque[tuple[str, bytes]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._full_logged = False
        self._thread: threading.Thread | None = None

    def offer(self, name: str, payload: bytes) -> bool:
        with self._cond:
            if self._closed:
                return True  # stopping: dropped like the rest of the queue
            if len(self._items) >= self.capacity:
                if not self._full_logged:  # once per flood, not once per command
                    log.warning("%s: %d commands waiting; refusing new ones until it drains",
                                self.name, self.capacity)
                    self._full_logged = True
                return False
            self._items.append((name, payload))
            self._cond.notify()
            return True

    def still_running(self) -> _Run | None:
        if self.overrun is not None and self.overrun.done():
            self.overrun = None
        return self.overrun

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closed)
                if self._closed:
                    return
                name, payload = self._items.popleft()
                if not self._items:
                    self._full_logged = False  # the flood is over
            self._work(self, name, payload)

    def start(self) -> None:
        with self._cond:
            self._closed = False
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
