"""The background teach over MQTT: `teach` and `teach_cancel`.

    teach         {margin?: 0..100 points} -> {started: true, time, margin} at once; the
                  teach runs in a child process while the bin sorts, its progress in the
                  retained `state`'s `teach` (see bin_controller.teaching)
    teach_cancel  {} -> {cancelled: true, phase}

A second `teach` while one runs is refused ("a teach is running"). Their handlers join the
others in commands.make_handlers' dict.
"""

from __future__ import annotations

from bin_controller.errors import CommandError
from bin_controller.mqtt.commands import Handler, check_fields
from bin_controller.payloads import JsonObject
from bin_controller.teaching import TeachJob, TeachSettings

MAX_MARGIN = 100.0


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
