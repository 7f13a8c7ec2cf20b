"""A teach in the background of the running bin (MQTT `cmd/teach`).

The teach itself runs as a child process (`python -m bin_controller teach --progress-json`,
niced): its numpy and TFLite work never holds the service's GIL, a crash or an out-of-memory
kill of it never touches the sorting loop, and killing it (`cmd/teach_cancel`, a service
stop, SIGKILL by anyone) is safe because it writes only into a scratch folder of its own.
The service keeps the two steps that change the bin: installing the accepted bundle in the
models folder (every change a rename, see model_updates) and reloading the running model
through `reload_model`'s own path.

Progress, as the retained `state`'s `teach` object:

    {"phase": exporting|features|fitting|checking|installing|done|rejected|failed|cancelled,
     "done": n, "total": n, "started": unix time, "finished": unix time | null,
     "finished_at": "2026-11-28T13:05:12Z" | null, "margin": points,
     "result": {...} | null, "error": one line | null}

`result` holds, when done, the new model and version and the evaluation; when rejected,
the evaluation with the numbers that refused it. The last teach's object is kept in the
state folder (teach_record) and shown again after a restart; a teach the service died
during comes back `failed`, its error saying so.

The site's teach data are the reviewed photos (`review.Reviews.export`) and the captured
ones (`captures`: `smartbin teach --capture`, `cmd/capture`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bin_controller import teach_record
from bin_controller.captures import CAPTURES, add_captures
from bin_controller.errors import BusyError, CommandError, SmartbinError
from bin_controller.payloads import TEACH_FINISHED, TEACH_PHASES

log = logging.getLogger(__name__)

SCRATCH = "teach"  # under the state folder: the running teach's export and bundle
PHASES = TEACH_PHASES
FINISHED = frozenset(TEACH_FINISHED)
# A dashboard redraws on every retained state: at most this often while a phase moves
# (a change of phase is published at once).
MIN_INTERVAL_S = 0.5
NICE = 10  # the teach yields the CPU to the sorting loop
# One backbone thread: the other cores stay the loop's (a Pi 4 has four; measured on two
# cores, two teach threads lift the cycle's p95 by half, see README).
THREADS = 1
STDERR_LINES = 20  # the child's last lines kept for the log and the error line


@dataclass
class TeachSettings:
    """What a `cmd/teach` may set."""

    margin: float = 2.0


@dataclass
class _Progress:
    phase: str
    started: float
    margin: float
    done: int = 0
    total: int = 0
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"phase": self.phase, "done": self.done, "total": self.total,
                "started": round(self.started, 3),
                "finished": None if self.finished is None else round(self.finished, 3),
                "finished_at": None if self.finished is None
                else teach_record.iso_time(self.finished),
                "margin": self.margin, "result": self.result, "error": self.error}

    @classmethod
    def restored(cls, record: dict[str, Any] | None) -> _Progress | None:
        """The last teach as teach_record kept it (always a finished one)."""
        if record is None:
            return None
        margin = record["margin"]
        return cls(record["phase"], float(record["started"]),
                   TeachSettings.margin if margin is None else float(margin),
                   done=int(record["done"]), total=int(record["total"]),
                   finished=record["finished"], result=record["result"],
                   error=record["error"])


class TeachJob:
    """At most one background teach at a time, and what the last one did."""

    def __init__(self, *, state_dir: Path, export: Callable[[Path], dict[str, Any]],
                 base: Callable[[], tuple[Path, str]], install: Callable[[Path], dict[str, Any]],
                 on_change: Callable[[], None] = lambda: None,
                 backbone: str | None = None, nice: int = NICE, threads: int = THREADS,
                 python: str = sys.executable,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        """`export(dest)` writes the reviewed photos as class folders; `base()` is the
        running bundle's folder (what the teach extends); `install(bundle_dir)` puts the
        accepted bundle in the models folder and reloads the running model, returning
        what changed; `on_change` republishes the state."""
        self.state_dir = Path(state_dir).expanduser()
        self.export = export
        self.base = base
        self.install = install
        self.on_change = on_change
        self.backbone = backbone
        self.nice = nice
        self.threads = threads
        self.python = python
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._saving = threading.Lock()  # the record's writes, in order, off self._lock
        # No teach runs in a service that is starting: a scratch folder is a dead one's.
        shutil.rmtree(self.state_dir / SCRATCH, ignore_errors=True)
        self._progress: _Progress | None = _Progress.restored(
            teach_record.load(self.state_dir))
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._cancelled = False
        self._stopping = False
        self._published = 0.0
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES)

    # ------------------------------------------------------------------ commands

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._progress is None else self._progress.payload()

    def running(self) -> bool:
        with self._lock:
            return self._progress is not None and self._progress.phase not in FINISHED

    def start(self, settings: TeachSettings) -> dict[str, Any]:
        """Start a teach and return at once; BusyError while one runs."""
        with self._lock:
            if self._progress is not None and self._progress.phase not in FINISHED:
                raise BusyError(f"a teach is running (phase {self._progress.phase}, started "
                                f"{time.time() - self._progress.started:.0f} s ago); wait "
                                "for it or send teach_cancel")
            started = time.time()
            self._progress = _Progress("exporting", started, settings.margin)
            self._cancelled = False
            self._stderr.clear()
            self._thread = threading.Thread(target=self._run, args=(settings,),
                                            name="teach", daemon=True)
            self._thread.start()
        self._record()
        self._publish(force=True)
        return {"started": True, "time": round(started, 3), "margin": settings.margin}

    def cancel(self) -> dict[str, Any]:
        """Stop the running teach (the child is killed; nothing has changed yet unless it
        is installing, which is not interrupted)."""
        with self._lock:
            progress = self._progress
            if progress is None or progress.phase in FINISHED:
                raise CommandError("no teach is running")
            if progress.phase == "installing":
                raise BusyError("the teach is installing its bundle; that is not "
                                "interrupted (roll back afterwards with cmd/rollback)")
            self._cancelled = True
            proc = self._proc
        if proc is not None:
            _kill(proc)
        return {"cancelled": True, "phase": progress.phase}

    def wait(self, timeout: float | None = None) -> bool:
        """Until the job's thread ends (tests, shutdown)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """The service stops: a running teach is killed and its scratch folder removed."""
        with self._lock:
            if self._progress is not None and self._progress.phase not in FINISHED:
                self._cancelled = self._stopping = True
            proc = self._proc
        if proc is not None:
            _kill(proc)
        self.wait(timeout)

    # ------------------------------------------------------------------ the job

    def _run(self, settings: TeachSettings) -> None:
        scratch_root = self.state_dir / SCRATCH
        try:
            # A service killed mid-teach left its scratch folder: nothing in it is used.
            shutil.rmtree(scratch_root, ignore_errors=True)
            scratch_root.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="job-", dir=scratch_root))
        except OSError as exc:
            self._finish("failed", error=f"{scratch_root}: cannot make the teach's scratch "
                                         f"folder ({exc.strerror}); check the disk")
            return
        try:
            self._teach(settings, scratch)
        except SmartbinError as exc:
            self._finish("failed", error=str(exc))
        except Exception as exc:  # a bug: logged whole; the service goes on
            log.exception("teach failed unexpectedly")
            self._finish("failed", error=f"internal error ({type(exc).__name__}: {exc}); "
                                         "see the bin's log")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _teach(self, settings: TeachSettings, scratch: Path) -> None:
        data = scratch / "site"
        exported = self.export(data)
        captured = add_captures(self.state_dir / CAPTURES, data)
        if not exported.get("photos") and not captured:
            raise CommandError("no reviewed photos with a label to teach from; review some "
                               "items first (cmd/label or smartbin review label)")
        if self._cancelled:
            self._finish("cancelled")
            return
        out = scratch / "bundle" / "taught"
        base, name = self.base()
        cmd = [self.python, "-m", "bin_controller", "teach", "--data", str(data),
               "--base", str(base), "--out", str(out), "--name", name,
               "--margin", f"{settings.margin:g}", "--progress-json", "--nice", str(self.nice),
               "--threads", str(self.threads)]
        if self.backbone:
            cmd += ["--backbone", self.backbone]
        try:
            final = self._child(cmd)
        except CommandError:
            if not self._cancelled:
                raise
            final = None  # killed by teach_cancel: that is how it ends
        if self._cancelled:
            self._finish("cancelled")
            return
        if final is None:
            raise CommandError(self._child_error())
        if final.get("phase") == "rejected":
            self._finish("rejected", result={"evaluation": final.get("evaluation")},
                         error=final.get("error"))
            return
        if final.get("phase") != "written":
            raise CommandError(final.get("error") or self._child_error())
        with self._lock:  # from here on a cancel is refused: the install is not interrupted
            cancelled = self._cancelled
            if not cancelled and self._progress is not None:
                self._progress.phase, self._progress.done, self._progress.total = \
                    "installing", 0, 1
        if cancelled:
            self._finish("cancelled")
            return
        self._record()
        self._publish(force=True)
        installed = self.install(Path(final["out"]))
        self._finish("done", result={**installed, "evaluation": final.get("evaluation"),
                                     "photos": final.get("photos"),
                                     "seconds": final.get("seconds")})

    def _child(self, cmd: list[str]) -> dict[str, Any] | None:
        """Run the teach child, following its progress lines; its final object."""
        log.info("teach: %s", " ".join(cmd))
        with self._lock:
            if self._cancelled:
                return None
            proc = self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL)
        errors = threading.Thread(target=self._read_stderr, args=(proc,), name="teach-stderr",
                                  daemon=True)
        errors.start()
        final: dict[str, Any] | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.info("teach: %s", line.rstrip())
                continue
            if not isinstance(message, dict):
                continue
            phase = message.get("phase")
            if phase in ("written", "rejected", "failed"):
                final = message
            elif phase in PHASES:
                self._update(str(phase), int(message.get("done", 0)),
                             int(message.get("total", 0)))
        code = proc.wait()
        errors.join(5)
        with self._lock:
            self._proc = None
        if code < 0:
            raise CommandError(f"the teach process was killed (signal {-code}) before it "
                               "finished; nothing was changed")
        if code != 0 and (final is None or final.get("phase") == "written"):
            return None  # crashed, or an error before a final line
        return final

    def _read_stderr(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            if line:
                self._stderr.append(line)
                log.info("teach: %s", line)

    def _child_error(self) -> str:
        lines = list(self._stderr)
        for line in reversed(lines):
            if line.startswith("smartbin: error: "):
                return line[len("smartbin: error: "):]
        proc_note = "the teach process ended without a result"
        return f"{proc_note}: {lines[-1]}" if lines else f"{proc_note} (killed?)"

    # ------------------------------------------------------------------ progress

    def _update(self, phase: str, done: int, total: int) -> None:
        with self._lock:
            progress = self._progress
            if progress is None or progress.phase in FINISHED:
                return
            changed = phase != progress.phase
            progress.phase, progress.done, progress.total = phase, done, total
        if changed:
            self._record()
        self._publish(force=changed)

    def _finish(self, phase: str, *, result: dict[str, Any] | None = None,
                error: str | None = None) -> None:
        with self._lock:
            progress = self._progress
            if progress is None:
                return
            if phase == "cancelled":
                error = (teach_record.interrupted_error(progress.phase) if self._stopping
                         else "cancelled by teach_cancel")
            progress.phase, progress.finished = phase, time.time()
            progress.result, progress.error = result, error
        self._record()
        level = logging.INFO if phase == "done" else logging.WARNING
        log.log(level, "teach %s%s", phase, f": {error}" if error else "")
        self._publish(force=True)

    def _record(self) -> None:
        """The teach as it is now, kept in the state folder for after a restart."""
        with self._saving:
            teach = self.snapshot()
            if teach is not None:
                teach_record.save(self.state_dir, teach)

    def _publish(self, *, force: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._published < self.min_interval_s:
                return
            self._published = now
        try:
            self.on_change()
        except Exception:
            log.exception("publishing the teach's progress failed")


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL: the child writes only into its scratch folder, so nothing is half done."""
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning("cannot stop the teach process %d: %s", proc.pid, exc)


def nice_self(n: int) -> None:
    """Lower this process's priority by n (the teach child calls it first)."""
    if n > 0 and hasattr(os, "nice"):
        try:
            os.nice(n)
        except OSError as exc:
            log.warning("cannot lower the teach's priority: %s", exc)
