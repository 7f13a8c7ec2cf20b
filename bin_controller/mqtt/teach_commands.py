"""The background teach over MQTT: `teach` and `teach_cancel`.

    teach         {margin?: 0..100 points} -> {started: true, time, margin} at once; the
                  teach runs in a child process while the bin sorts, its progress in the
                  retained `state`'s `teach` (see bin_controller.teaching)
    teach_cancel  {} -> {cancelled: true, phase}
    capture       {label, bin?, shots?: 1..30 (10), interval_s?: 0..1 (0.3)}
                  -> {label, bin, new_label, folder, files, total}: the item lying on the
                  paused bin's flap photographed into the site's captured photos

A second `teach` while one runs is refused ("a teach is running"). `capture` needs the bin
paused with the item on the flap (the loop would sort it otherwise); take the item off
before resuming, or it is sorted and counted like any other. Their handlers join the
others in commands.make_handlers' dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from bin_controller.captures import capture_label, photos_in, save_shot, shot_stamp
from bin_controller.errors import CommandError
from bin_controller.mqtt.commands import Handler, check_fields
from bin_controller.payloads import JsonObject, JsonValue
from bin_controller.teaching import TeachJob, TeachSettings
from bin_controller.vision.bundle import Label

MAX_MARGIN = 100.0
# A capture holds the command lane: 30 shots 1 s apart stay within its time limit (60 s,
# commands.TIME_LIMITS_S).
MAX_SHOTS = 30
MAX_INTERVAL_S = 1.0
DEFAULT_SHOTS = 10
DEFAULT_INTERVAL_S = 0.3


class PausedCamera(Protocol):
    def photograph_paused(self) -> np.ndarray: ...


def _number(args: JsonObject, name: str, low: float, high: float, default: float,
            *, whole: bool = False) -> float:
    value: JsonValue = args.get(name, default)
    kind = int if whole else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "a whole number" if whole else "a number"
        raise CommandError(f"{name} must be {what} from {low:g} to {high:g}")
    return float(value)


def make_capture_handler(loop: PausedCamera, state_dir: str | Path,
                         labels: Callable[[], Sequence[Label]]) -> dict[str, Handler]:
    """`capture`: `labels` are the running model's (a label it knows keeps its bin)."""

    def capture(args: JsonObject) -> JsonObject:
        check_fields(args, "label", "bin", "shots", "interval_s", required=("label",))
        shots = int(_number(args, "shots", 1, MAX_SHOTS, DEFAULT_SHOTS, whole=True))
        interval = _number(args, "interval_s", 0, MAX_INTERVAL_S, DEFAULT_INTERVAL_S)
        bin_name = args.get("bin")
        if bin_name is not None and not isinstance(bin_name, str):
            raise CommandError("bin must be text")
        label = args["label"]
        if not isinstance(label, str):
            raise CommandError("label must be text")
        where = capture_label(state_dir, labels(), label, bin_name)
        stamp = shot_stamp()
        files = []
        for i in range(shots):
            if i:
                time.sleep(interval)
            # Paused and the item present are checked on the loop's thread for each shot:
            # a resume or an item taken off half way ends the capture with what it has.
            frame = loop.photograph_paused()
            files.append(save_shot(where.folder, frame, i + 1, stamp).name)
        return {"label": where.label, "bin": where.bin, "new_label": where.new,
                "folder": where.folder.name, "files": files,
                "total": photos_in(where.folder)}

    return {"capture": capture}


def make_teach_handlers(job: TeachJob) -> dict[str, Handler]:
    def teach(args: JsonObject) -> JsonObject:
        check_fields(args, "margin")
        settings = TeachSettings()
        if "margin" in args:
            margin = args["margin"]
            if isinstance(margin, bool) or not isinstance(margin, int | float) \
                    or not 0 <= margin <= MAX_MARGIN:
                raise CommandError(f"margin must be a number of points from 0 to "
                                   f"{MAX_MARGIN:g} (top-1 on the old labels the taught "
                                   "bundle may lose)")
            settings.margin = float(margin)
        return job.start(settings)

    def teach_cancel(args: JsonObject) -> JsonObject:
        check_fields(args)
        return job.cancel()

    return {"teach": teach, "teach_cancel": teach_cancel}
