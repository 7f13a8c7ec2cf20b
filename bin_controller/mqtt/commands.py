"""Commands a dashboard sends (over MQTT): validated, then carried out by the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bin_controller.bins import BINS
from bin_controller.config import Config
from bin_controller.sorter import SortingLoop
from bin_controller.store import Store
from bin_controller.vision.classifier import Classifier

RESET_CONFIRMATION = "reset_counts"


def _fields(args: dict[str, Any], *allowed: str, required: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"unexpected field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed) or 'none'}")
    missing = [f for f in required if f not in args]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")


def make_dispatcher(cfg: Config, loop: SortingLoop, store: Store,
                    on_counts_changed: Callable[[], None] = lambda: None
                    ) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    def pause(args: dict[str, Any]) -> dict[str, Any]:
        _fields(args)
        loop.pause()
        return {"paused": True}

    def resume(args: dict[str, Any]) -> dict[str, Any]:
        _fields(args)
        loop.resume()
        return {"paused": False}

    def reset_counts(args: dict[str, Any]) -> dict[str, Any]:
        _fields(args, "confirm", required=("confirm",))
        if args["confirm"] != RESET_CONFIRMATION:
            raise ValueError(f'confirm must be "{RESET_CONFIRMATION}"')
        before = store.reset_counts()
        on_counts_changed()
        return {"before": before}

    def sort_next(args: dict[str, Any]) -> dict[str, Any]:
        _fields(args, "bin", required=("bin",))
        if args["bin"] not in BINS:
            raise ValueError(f"bin must be one of {', '.join(BINS)}")
        loop.sort_next(args["bin"])
        return {"bin": args["bin"]}

    def calibrate(args: dict[str, Any]) -> dict[str, Any]:
        _fields(args, "bin", "angle")
        if ("bin" in args) == ("angle" in args):
            raise ValueError("give exactly one of bin or angle")
        if "angle" in args:
            angle = args["angle"]
            if isinstance(angle, bool) or not isinstance(angle, int | float):
                raise ValueError("angle must be a number")
            if not cfg.flap.min_angle <= angle <= cfg.flap.max_angle:
                raise ValueError(f"angle must be within {cfg.flap.min_angle}.."
                                 f"{cfg.flap.max_angle}")
            return {"angle": loop.calibrate(angle=float(angle))}
        if args["bin"] not in BINS:
            raise ValueError(f"bin must be one of {', '.join(BINS)}")
        return {"angle": loop.calibrate(bin_name=args["bin"])}

    def reload_model(args: dict[str, Any]) -> dict[str, Any]:
        _fields(args, "bundle")
        ref = args.get("bundle", cfg.model.bundle)
        if not isinstance(ref, str) or not ref:
            raise ValueError("bundle must be a bundle name or folder")
        # Built and checked completely before the swap: a broken bundle changes nothing.
        new = Classifier(ref, backend=cfg.model.backend, num_threads=cfg.model.threads,
                         backbone=cfg.model.backbone or None)
        old = loop.replace_classifier(new)
        return {"model": new.bundle.name, "version": new.bundle.version,
                "previous": f"{old.bundle.name} {old.bundle.version}"}

    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "pause": pause, "resume": resume, "reset_counts": reset_counts,
        "sort_next": sort_next, "calibrate": calibrate, "reload_model": reload_model,
    }

    def dispatch(name: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = handlers.get(name)
        if handler is None:
            raise ValueError(f"unknown command {name!r}; commands: {', '.join(handlers)}")
        return handler(args)

    return dispatch
