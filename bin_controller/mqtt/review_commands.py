"""The review commands over MQTT: `review_list`, `review_photo`, `label`, `accept`.

The same checks and the same all-or-nothing as `smartbin review` (both go through
review.Reviews); here only the JSON arguments are read. Their handlers join the others in
commands.make_handlers' dict, so the dispatcher (queue, time limit, `id`, one reply each)
is the same for every command.

    review_list   {uncertain, failed, unreviewed: bool, label, bin, before: seq, limit: 1..100}
                  -> {items, total, next_before}; the next page passes next_before as before
    review_photo  {seq} -> the item's JPEG on reply/review_photo/<seq> (not retained), then
                  the reply {seq, topic, bytes}
    label         {seq | seqs, label, bin?} -> the items were `label`; a label neither the
                  model nor an earlier review knows needs its bin
    accept        {seq | seqs} -> the items went where they belong
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from bin_controller.errors import CommandError
from bin_controller.mqtt.commands import Handler, check_fields
from bin_controller.payloads import JsonObject, JsonValue, review_photo_topic
from bin_controller.review import MAX_PAGE, Reviews, check_seqs

SOURCE = "mqtt"  # who reviewed, as the site log records it
DEFAULT_PAGE = 20

PhotoSink = Callable[[str, bytes], str]  # (topic suffix, bytes) -> the full topic


class PhotoReader(Protocol):
    def read(self, seq: int) -> bytes: ...


def _flag(args: JsonObject, name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise CommandError(f"{name} must be true or false")
    return value


def _whole(value: JsonValue, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"from {low}"
        raise CommandError(f"{name} must be a whole number {span}")
    return value


def _text(value: JsonValue, name: str) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{name} must be text")
    return value


def _seq(args: JsonObject) -> int:
    value = args["seq"]
    if isinstance(value, list):
        raise CommandError("seq must be one item number; give several as seqs")
    return check_seqs(value)[0]


def _targets(args: JsonObject) -> list[int]:
    """The items a verdict is about: `seq` (one) or `seqs` (a list), not both."""
    if ("seq" in args) == ("seqs" in args):
        raise CommandError("give exactly one of seq (one item) or seqs (a list of items)")
    if "seq" in args:
        return [_seq(args)]
    if not isinstance(args["seqs"], list):
        raise CommandError("seqs must be a list of item numbers")
    return check_seqs(args["seqs"])


def make_review_handlers(reviews: Reviews, photos: PhotoReader, publish: PhotoSink,
                         on_counts_changed: Callable[[], None]) -> dict[str, Handler]:
    """Command name -> handler. `publish` sends a photo on a topic under the bin's base and
    returns that topic; `on_counts_changed` republishes the counts with the contamination
    a verdict changed."""

    def review_list(args: JsonObject) -> JsonObject:
        check_fields(args, "uncertain", "failed", "unreviewed", "label", "bin", "before", "limit")
        label = args.get("label")
        bin_name = args.get("bin")
        before = args.get("before")
        return reviews.list(
            uncertain=_flag(args, "uncertain"), failed=_flag(args, "failed"),
            unreviewed=_flag(args, "unreviewed"),
            label=None if label is None else _text(label, "label"),
            bin_name=None if bin_name is None else _text(bin_name, "bin"),
            before=None if before is None else _whole(before, "before", 1),
            limit=_whole(args.get("limit", DEFAULT_PAGE), "limit", 1, MAX_PAGE))

    def review_photo(args: JsonObject) -> JsonObject:
        check_fields(args, "seq", required=("seq",))
        seq = _seq(args)
        data = photos.read(seq)
        # Sent before the reply: a client that waits for the reply has the photo too.
        topic = publish(review_photo_topic(seq), data)
        return {"seq": seq, "topic": topic, "bytes": len(data)}

    def label(args: JsonObject) -> JsonObject:
        check_fields(args, "seq", "seqs", "label", "bin", required=("label",))
        done = reviews.label(_targets(args), args["label"], args.get("bin"), source=SOURCE)
        on_counts_changed()
        return done

    def accept(args: JsonObject) -> JsonObject:
        check_fields(args, "seq", "seqs")
        done = reviews.accept(_targets(args), source=SOURCE)
        on_counts_changed()
        return done

    return {"review_list": review_list, "review_photo": review_photo, "label": label,
            "accept": accept}
