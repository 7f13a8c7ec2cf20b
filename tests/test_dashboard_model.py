"""The dashboard's view of the fleet (any message, however wrong, never breaks it) and its
history database (each item once, kept across a restart, the charts' sums)."""

from __future__ import annotations

import asyncio
import io
import json

from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bin_controller.dashboard.fleet import MAX_BINS, Fleet
from bin_controller.dashboard.history import SAMPLE_EVERY_S, History
from bin_controller.dashboard.web import Client, Hub

P = "smartbin"


def event(seq: int, *, t: float = 1_700_000_000.0, label: str = "drink can",
          bin_name: str = "recyclable", uncertain: bool = False) -> bytes:
    return json.dumps({"seq": seq, "time": t, "label": label, "label_en": label,
                       "bin": bin_name, "confidence": 0.9, "uncertain": uncertain,
                       "failed": False, "forced": False, "photo": True}).encode()


COUNTS = {"recyclable": 3, "kitchen": 2, "hazardous": 0, "other": 1, "total": 6,
          "contamination": {"recyclable": {"reviewed": 2, "wrong": 1, "rate": 0.5},
                            "total": {"reviewed": 2, "wrong": 1, "rate": 0.5},
                            "reviewed_fraction": 0.33, "items": 6}}


def jpeg(comment: bytes | None) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, "JPEG", comment=comment or b"")
    return out.getvalue()


# ---------------------------------------------------------------------- the fleet


def test_messages_of_a_bin_build_its_view():
    fleet = Fleet(P)
    fleet.take(f"{P}/b1/availability", b"online")
    fleet.take(f"{P}/b1/counts", json.dumps(COUNTS).encode())
    fleet.take(f"{P}/b1/state", json.dumps({
        "state": "paused", "detail": "", "paused": True, "model": "demo",
        "model_version": "1.0.0", "backend": "litert", "faults": {"jam": 2},
        "last_fault": "flap stuck"}).encode())
    updates = fleet.take(f"{P}/b1/event", event(7))
    assert [kind for kind, _ in updates] == ["bin", "item"]
    assert updates[1][1]["bin"] == "b1" and updates[1][1]["seq"] == 7
    assert updates[1][1]["item"]["bin"] == "recyclable"
    fleet.take(f"{P}/b1/fault", b'{"kind": "jam", "detail": "flap stuck", "time": 5}')
    fleet.take(f"{P}/b1/image", jpeg(b"smartbin seq=7"))
    view = fleet.snapshot()[0]
    assert view["id"] == "b1" and view["online"] == "online"
    assert view["counts"] == {"recyclable": 3, "kitchen": 2, "hazardous": 0, "other": 1,
                              "total": 6}
    assert view["contamination"]["rate"] == 0.5
    assert view["contamination"]["bins"]["recyclable"] == {"rate": 0.5, "wrong": 1}
    assert view["state"]["state"] == "paused" and view["state"]["faults"] == {"jam": 2}
    assert view["last"]["seq"] == 7 and view["image_seq"] == 7
    assert view["faults"] == [{"kind": "jam", "detail": "flap stuck", "time": 5.0}]
    # An older event (a resent outbox) does not replace the last item.
    fleet.take(f"{P}/b1/event", event(3))
    assert fleet.snapshot()[0]["last"]["seq"] == 7


BAD_PAYLOADS = [
    b"", b"\xff\xfe\x00", b"null", b"[]", b"42", b'"text"', b"{", b"[" * 100_000,
    b'{"a": ' * 40 + b"1" + b"}" * 40, b"1" * 5000, b'{"seq": 1e999}', b'{"x": NaN}',
    b" " * 70_000,
    json.dumps({"recyclable": [1], "kitchen": "2", "hazardous": -1, "other": True,
                "total": 10**30, "contamination": [1, 2]}).encode(),
    json.dumps({"state": ["idle"], "faults": {"jam": "many"}, "paused": "yes",
                "model": {"x": 1}}).encode(),
    json.dumps({"seq": "7", "time": "now", "bin": "<script>", "confidence": 7}).encode(),
    json.dumps({"seq": True, "label": None}).encode(),
    json.dumps({"recyclable": {"pct": "full", "state": 3}, "other": []}).encode(),
    json.dumps({"kind": 5, "detail": ["x"]}).encode(),
    json.dumps({"uptime_s": "long", "items_per_hour": float("1e300")}).encode(),
]
SUFFIXES = ["availability", "counts", "state", "event", "last", "stats", "fill", "fault",
            "image", "image/meta", "counts/recyclable", "owner", "reply/pause", "cmd/x"]


def test_no_message_of_the_wrong_shape_breaks_the_view():
    fleet = Fleet(P)
    fleet.take(f"{P}/b1/counts", json.dumps(COUNTS).encode())
    for suffix in SUFFIXES:
        for payload in BAD_PAYLOADS:
            fleet.take(f"{P}/b1/{suffix}", payload)
    view = fleet.snapshot()[0]
    json.dumps(view)  # what the pages get is always JSON
    counts = view["counts"]
    # The wrong counts message was read field by field: nothing in it was a count.
    assert counts == {"recyclable": None, "kitchen": None, "hazardous": None, "other": None,
                      "total": None}
    assert view["state"]["state"] is None and view["state"]["faults"] == {}
    assert view["last"] is None  # no event had a seq
    assert all(f["pct"] is None and f["state"] is None for f in view["fill"].values())
    assert view["image_seq"] is None


def test_a_background_teach_is_shown_from_the_state_field_by_field():
    fleet = Fleet(P)
    fleet.take(f"{P}/b1/state", json.dumps({"state": "idle", "teach": {
        "phase": "features", "done": 12, "total": 40, "started": 5.0}}).encode())
    assert fleet.snapshot()[0]["state"]["teach"] == {
        "phase": "features", "done": 12, "total": 40, "error": None, "version": None,
        "finished": None}
    fleet.take(f"{P}/b1/state", json.dumps({"state": "idle", "teach": {
        "phase": "done", "finished": 1764327600.5,
        "result": {"version": "1.0+teach.20261128T1100Z"}}}).encode())
    done = fleet.snapshot()[0]["state"]["teach"]
    assert done["version"] == "1.0+teach.20261128T1100Z" and done["finished"] == 1764327600.5
    # A phase the dashboard does not know, counts that are not counts, a result that is not
    # an object: shown as unknown, never passed through.
    fleet.take(f"{P}/b1/state", json.dumps({"state": "idle", "teach": {
        "phase": "<b>x</b>", "done": -1, "total": "40", "result": [1]}}).encode())
    assert fleet.snapshot()[0]["state"]["teach"] == {
        "phase": None, "done": None, "total": None, "error": None, "version": None,
        "finished": None}
    fleet.take(f"{P}/b1/state", json.dumps({"state": "idle", "teach": None}).encode())
    assert fleet.snapshot()[0]["state"]["teach"] is None


def test_topics_that_are_not_a_bins_are_ignored():
    fleet = Fleet(P)
    for topic in (f"{P}/counts", "other/b1/counts", f"{P}//counts", f"{P}/{'x' * 300}/counts",
                  f"{P}/b\x001/counts"):
        assert fleet.take(topic, json.dumps(COUNTS).encode()) == []
    assert fleet.snapshot() == []


def test_random_topics_cannot_grow_the_view_without_end():
    fleet = Fleet(P)
    for i in range(MAX_BINS + 50):
        fleet.take(f"{P}/bin{i}/availability", b"online")
    assert len(fleet.bins) == MAX_BINS


@given(suffix=st.sampled_from(SUFFIXES), payload=st.binary(max_size=300))
def test_any_bytes_on_any_topic_never_raise(suffix, payload):
    fleet = Fleet(P)
    fleet.take(f"{P}/b/{suffix}", payload)
    json.dumps(fleet.snapshot())


@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                          lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=20),
       suffix=st.sampled_from(["counts", "state", "event", "stats", "fill", "fault"]))
def test_any_json_on_a_bins_topics_never_raises(value, suffix):
    fleet = Fleet(P)
    fleet.take(f"{P}/b/{suffix}", json.dumps(value).encode())
    if isinstance(value, dict):
        fleet.take(f"{P}/b/{suffix}", json.dumps({"state": value, "seq": 1, "total": value,
                                                  "contamination": value, "recyclable": value,
                                                  "kind": "x"}).encode())
    json.dumps(fleet.snapshot())


# ---------------------------------------------------------------------- history


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def item(seq: int, t: float, bin_name: str = "recyclable", label: str = "drink can",
         uncertain: bool = False) -> dict:
    return {"seq": seq, "time": t, "label": label, "label_en": label, "bin": bin_name,
            "uncertain": uncertain, "failed": False, "confidence": 0.9}


def test_each_item_is_kept_once_per_bin_and_seq(tmp_path):
    history = History(tmp_path / "h.db")
    assert history.add_event("b1", item(1, 100.0))
    assert not history.add_event("b1", item(1, 100.0))  # resent after an outage
    assert history.add_event("b2", item(1, 100.0))  # another bin's seq 1
    assert not history.add_event("b1", {"seq": None})
    assert history.event_count("b1") == 1 and history.event_count("b2") == 1
    assert history.add_fault("b1", {"kind": "jam", "detail": "x", "time": 5.0})
    assert not history.add_fault("b1", {"kind": "jam", "detail": "x", "time": 5.0})


def test_history_survives_a_restart(tmp_path):
    clock = Clock(1_700_000_000.0)
    history = History(tmp_path / "h.db", clock=clock)
    for seq in range(1, 6):
        history.add_event("b1", item(seq, clock.t - 60 * seq))
    history.add_fault("b1", {"kind": "jam", "detail": "stuck", "time": clock.t - 10})
    history.add_sample("b1", {"rate": 0.25, "reviewed_fraction": 0.1})
    before = history.charts("b1", hours=24)
    history.close()
    again = History(tmp_path / "h.db", clock=clock)
    assert again.charts("b1", hours=24) == before
    assert again.event_count("b1") == 5
    assert not again.add_event("b1", item(3, 0.0))  # still known after the restart
    assert before["faults"][0]["kind"] == "jam"


def test_the_charts_sum_what_arrived(tmp_path):
    hour = 3600.0
    now = 1_700_000_000.0 // hour * hour + 1800  # half past an hour
    clock = Clock(now)
    history = History(tmp_path / "h.db", clock=clock)
    history.add_event("b1", item(1, now - 10, "recyclable", "drink can"))
    history.add_event("b1", item(2, now - 20, "kitchen", "banana peel", uncertain=True))
    history.add_event("b1", item(3, now - hour, "recyclable", "drink can"))
    history.add_event("b1", item(4, now - hour - 5, "hazardous", "battery"))
    history.add_event("b1", item(5, now - 30 * hour, "other", "old"))  # outside 24 h
    history.add_event("b2", item(1, now - 10, "other", "cup"))  # another bin
    charts = history.charts("b1", hours=24)
    assert len(charts["hours"]) == 24 and charts["hours"][-1] == now - 1800
    assert charts["per_hour"]["recyclable"][-2:] == [1, 1]
    assert charts["per_hour"]["kitchen"][-1] == 1
    assert charts["per_hour"]["hazardous"][-2:] == [1, 0]
    assert sum(charts["per_hour"]["other"]) == 0
    assert charts["uncertain_rate"][-2:] == [0.0, 0.5]
    assert charts["uncertain_rate"][0] is None  # no items: no rate
    assert charts["composition"][0] == {"label": "drink can", "bin": "recyclable", "count": 2}
    assert {c["label"] for c in charts["composition"]} == {"drink can", "banana peel",
                                                          "battery"}


def test_contamination_is_sampled_at_most_once_a_minute_keeping_the_newest(tmp_path):
    clock = Clock(1_700_000_000.0)
    history = History(tmp_path / "h.db", clock=clock)
    assert history.add_sample("b1", {"rate": None, "reviewed_fraction": 0.0})
    assert not history.add_sample("b1", {"rate": None, "reviewed_fraction": 0.0})
    clock.t += 5
    assert history.add_sample("b1", {"rate": 0.5, "reviewed_fraction": 0.1})  # same minute
    clock.t += SAMPLE_EVERY_S
    assert history.add_sample("b1", {"rate": 0.25, "reviewed_fraction": 0.2})
    samples = history.charts("b1", hours=1)["contamination"]
    assert samples["rate"] == [0.5, 0.25]


def test_hub_sends_each_item_once_and_writes_the_history(tmp_path):
    async def scenario() -> list[bytes]:
        hub = Hub(Fleet(P), History(tmp_path / "h.db"))
        client = Client(None)
        other = Client("b2")  # a page of another bin
        hub.clients |= {client, other}
        hub.on_message(f"{P}/b1/event", event(4))
        hub.on_message(f"{P}/b1/event", event(4))  # a duplicate from the outbox
        hub.on_message(f"{P}/b1/counts", json.dumps(COUNTS).encode())
        await asyncio.sleep(0.5)  # bin snapshots are coalesced
        assert other.queue.empty()
        out = []
        while not client.queue.empty():
            message = client.queue.get_nowait()
            assert message is not None
            out.append(message)
        assert hub.history.event_count("b1") == 1
        return out

    messages = asyncio.run(scenario())
    kinds = [m.split(b"\n")[0] for m in messages]
    assert kinds == [b"event: item", b"event: bin"]
    data = json.loads(messages[0].split(b"data: ", 1)[1])
    assert (data["bin"], data["seq"]) == ("b1", 4)


def test_pages_hear_when_the_broker_goes_and_comes_back(tmp_path):
    async def scenario() -> list[bytes]:
        hub = Hub(Fleet(P), History(tmp_path / "h.db"))
        client = Client(None, token="t1")
        hub.clients.add(client)
        hub.broker_state(True)
        hub.broker_state(False)
        hub.end_session("t1")  # a logout ends that session's streams
        out = []
        while not client.queue.empty():
            out.append(client.queue.get_nowait())
        assert client.behind
        return out

    messages = asyncio.run(scenario())
    assert messages[:2] == [b'event: broker\ndata: {"connected": true}\n\n',
                            b'event: broker\ndata: {"connected": false}\n\n']
    assert messages[2] is None
