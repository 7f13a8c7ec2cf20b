"""The fill command over MQTT: `emptied {bin}` says a compartment was emptied.

For compartments without a sensor, or a sensor that missed it (emptied a little at a time);
the Home Assistant button "Emptied <bin>" sends it. The estimate starts again from zero,
the counts stay; the fill tracker's listeners publish the new `fill` and queue the
`emptied` event. Its handler joins the others in commands.make_handlers' dict.

    emptied  {bin} -> {bin, pct_before, items}: the level and the items it was emptied at
"""

from __future__ import annotations

from typing import Protocol

from bin_controller.bins import BINS
from bin_controller.errors import CommandError
from bin_controller.fill import Emptied
from bin_controller.mqtt.commands import Handler, check_fields
from bin_controller.payloads import JsonObject, JsonValue

SOURCE = "command"  # how the `emptied` event says it was learnt
MAX_SHOWN = 40


class Emptying(Protocol):
    def emptied(self, bin_name: str, *, source: str = ...) -> Emptied: ...


def compartment(value: JsonValue) -> str:
    if not isinstance(value, str):
        raise CommandError(f"bin must be the name of a compartment ({', '.join(BINS)})")
    if value not in BINS:
        # Cut short: the reply must not echo a 64 KiB name back.
        raise CommandError(f"bin {value[:MAX_SHOWN]!r} is not a compartment of this bin; bin "
                           f"must be one of {', '.join(BINS)}")
    return value


def make_fill_handlers(fill: Emptying) -> dict[str, Handler]:
    """Command name -> handler, for a bin that tracks its fill levels."""

    def emptied(args: JsonObject) -> JsonObject:
        check_fields(args, "bin", required=("bin",))
        done = fill.emptied(compartment(args["bin"]), source=SOURCE)
        return {"bin": done.bin, "pct_before": done.pct_before, "items": done.items}

    return {"emptied": emptied}
