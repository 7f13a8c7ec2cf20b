"""Model version commands over MQTT: `rollback` goes back to the version installed before.

    rollback  {bundle?} -> {bundle, from, to, model, version, previous}

`bundle` defaults to the running model's name. The models folder switches first (see
`model_updates`), then the bin reloads through `reload_model`'s own handler, so the
earlier version is loaded and checked completely before it replaces the running one; if
that load fails the reply is the error, the folder already points at the earlier version,
and the running model stays until the next reload. The handler joins the others in
commands.make_handlers' dict.
"""

from __future__ import annotations

from collections.abc import Callable

from bin_controller.errors import CommandError
from bin_controller.model_updates import ModelsFolder
from bin_controller.mqtt.commands import Handler, bundle_name, check_fields
from bin_controller.payloads import JsonObject


def make_model_handlers(models: ModelsFolder, running: Callable[[], str],
                        reload_model: Handler) -> dict[str, Handler]:
    """Command name -> handler. `running` names the bundle the loop runs now;
    `reload_model` is the bin's reload handler."""

    def rollback(args: JsonObject) -> JsonObject:
        check_fields(args, "bundle")
        name = bundle_name(args["bundle"]) if "bundle" in args else running()
        before, after = models.rollback(name)
        reply: JsonObject = {"bundle": name, "from": before, "to": after}
        if name != running():
            return reply  # another bundle's history: nothing running to replace
        try:
            reply.update(reload_model({"bundle": name}))
        except CommandError as exc:
            raise CommandError(f"rolled {name} back to {after or 'the shipped bundle'} in "
                               f"the models folder, but reloading it failed: {exc}") from exc
        return reply

    return {"rollback": rollback}
