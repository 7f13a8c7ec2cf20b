"""The background teach's state kept on disk (`<state_dir>/teach.json`), so that the owner
still sees how the last teach ended after the service restarts.

The file holds the retained `state`'s `teach` object as it was last written: when a teach
starts, at every change of phase and when it ends (not at every progress step: a few fsynced
writes a teach). It is a small JSON file replaced whole, like the models folder's
`current.json` and the fill levels' `fill.json`, not a table in the store: the store's
database is about items and is rebuilt from its journal when damaged, and the teach's
record must not depend on it.

A record that is not finished when the service starts again belonged to a teach that was
running when the service died (SIGKILL, a power cut): nothing of it was installed unless it
had reached `installing`, whose every step is a rename (see model_updates). It is turned
into a `failed` one saying so, and written back so that a second restart says the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from bin_controller.model_updates import TMP_PREFIX, write_atomic
from bin_controller.payloads import TEACH_FINISHED, TEACH_RUNNING

log = logging.getLogger(__name__)

RECORD = "teach.json"
RUNNING = TEACH_RUNNING
FINISHED = TEACH_FINISHED


def iso_time(t: float) -> str:
    """UTC, to the second, as the models folder's record writes its times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def interrupted_error(phase: str) -> str:
    """Why a teach found unfinished at start ended, in one line."""
    if phase == "installing":
        return ("the service stopped while the teach was installing its bundle; the models "
                "folder holds the old version or the new one whole (state's model_version "
                "and `smartbin models list` say which)")
    return (f"the service stopped during the teach (phase {phase}); nothing was installed: "
            "send teach again")


def save(state_dir: Path, teach: dict[str, Any]) -> None:
    """Replace the record (fsynced); a full disk is logged, never raised: the teach and
    the bin go on without it."""
    path = Path(state_dir) / RECORD
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(teach, ensure_ascii=False) + "\n").encode("utf-8"))
    except OSError as exc:
        log.warning("%s cannot be written (%s); the teach's outcome is not kept over a "
                    "restart", path, exc.strerror or exc)


def load(state_dir: Path, *, now: float | None = None) -> dict[str, Any] | None:
    """The last teach's record as `state.teach` shows it, or None (no teach yet, or a
    record that cannot be read: logged). An unfinished one comes back `failed`."""
    folder = Path(state_dir)
    for leftover in folder.glob(f"{TMP_PREFIX}{RECORD}.*"):  # a write cut short
        with contextlib.suppress(OSError):
            leftover.unlink()
    path = folder / RECORD
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s); the last teach's outcome is forgotten", path, exc)
        return None
    record = _checked(data)
    if record is None:
        log.warning("%s is not a teach record; the last teach's outcome is forgotten", path)
        return None
    if record["phase"] in RUNNING:
        finished = time.time() if now is None else now
        log.warning("the last teach was running (phase %s) when the service stopped",
                    record["phase"])
        record.update(error=interrupted_error(record["phase"]), phase="failed",
                      finished=round(finished, 3), finished_at=iso_time(finished),
                      result=None)
        save(folder, record)
    return record


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checked(data: Any) -> dict[str, Any] | None:
    """The fields `state.teach` needs, of the right kinds; None when it is not a record."""
    if not isinstance(data, dict) or data.get("phase") not in (*RUNNING, *FINISHED) \
            or not _number(data.get("started")):
        return None
    finished = data.get("finished")
    result = data.get("result")
    error = data.get("error")
    finished_at = data.get("finished_at")
    return {"phase": data["phase"],
            "done": data["done"] if _number(data.get("done")) else 0,
            "total": data["total"] if _number(data.get("total")) else 0,
            "started": data["started"],
            "finished": finished if _number(finished) else None,
            "finished_at": finished_at if isinstance(finished_at, str) else None,
            "margin": data["margin"] if _number(data.get("margin")) else None,
            "result": result if isinstance(result, dict) else None,
            "error": error if isinstance(error, str) else None}
