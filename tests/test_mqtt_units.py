"""The MQTT parts without a broker: payload bytes, the outbox publisher against a fake
client, Home Assistant discovery, and command parsing and dispatch against a fake loop."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from bin_controller import __version__
from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.errors import BundleError, BusyError, CommandError
from bin_controller.mqtt.commands import Commands, make_handlers, parse_args
from bin_controller.mqtt.connection import Connection
from bin_controller.mqtt.discovery import discovery_payloads, node_id, status_topic
from bin_controller.mqtt.outbox import OutboxPublisher
from bin_controller.payloads import (
    bin_count_payloads,
    counts_payload,
    event_message,
    fault_payload,
    last_payload,
    state_payload,
    to_json,
)
from bin_controller.store import Store

# ---------------------------------------------------------------------- payloads
# The strings below were captured from the single-class Telemetry before the split:
# dashboards parse these bytes, so they must not change by accident.


SAMPLE = SortEvent(time=1700000000.25, bin="kitchen", label="苹果", label_en="apple",
                   confidence=0.875, uncertain=False, failed=False, forced=True,
                   cycle_ms=123.5, decision_ms=45.25, model="demo", model_version="1",
                   error=None, bin_confidence=0.9, seq=1)


def sample_event(**over: object) -> SortEvent:
    return dataclasses.replace(SAMPLE, **over)


def test_event_message_bytes():
    m = event_message(sample_event())
    assert (m.topic, m.qos) == ("event", 1)
    assert m.payload == (
        '{"time": 1700000000.25, "bin": "kitchen", "label": "苹果", "label_en": "apple", '
        '"confidence": 0.875, "uncertain": false, "failed": false, "forced": true, '
        '"cycle_ms": 123.5, "decision_ms": 45.25, "model": "demo", "model_version": "1", '
        '"error": null, "bin_confidence": 0.9, "seq": 1, "frame_time": null, '
        '"exposure_us": null, "analogue_gain": null}')


def test_retained_payload_bytes():
    assert last_payload(sample_event()) == (
        '{"seq": 1, "time": 1700000000.25, "label": "苹果", "label_en": "apple", '
        '"bin": "kitchen", "confidence": 0.875, "uncertain": false, "failed": false}')
    snapshot = {"recyclable": 0, "kitchen": 1, "hazardous": 0, "other": 0, "total": 1}
    assert counts_payload(snapshot) == (
        '{"recyclable": 0, "kitchen": 1, "hazardous": 0, "other": 0, "total": 1}')
    assert bin_count_payloads(snapshot) == {
        "counts/recyclable": "0", "counts/kitchen": "1", "counts/hazardous": "0",
        "counts/other": "0"}
    assert state_payload(State.IDLE, "", {}) == '{"state": "idle", "detail": ""}'
    status = {"paused": False, "model": "demo", "model_version": "1", "backend": "litert",
              "faults": {"jam": 2}, "last_fault": None}
    assert state_payload(State.SORTING, "to kitchen", status) == (
        '{"state": "sorting", "detail": "to kitchen", "paused": false, "model": "demo", '
        '"model_version": "1", "backend": "litert", "faults": {"jam": 2}, '
        '"last_fault": null}')
    assert fault_payload(Fault("jam", "chute blocked 2.0 s", 1700000001.5)) == (
        '{"kind": "jam", "detail": "chute blocked 2.0 s", "time": 1700000001.5}')


def test_store_queues_what_it_is_given_and_nothing_otherwise(tmp_path):
    with_message = Store(tmp_path / "a", message=event_message)
    e = with_message.record(sample_event(seq=0))
    (_id, topic, payload, qos), = with_message.outbox_batch()
    assert (topic, payload, qos) == ("event", event_message(e).payload, 1)
    with_message.close()
    without = Store(tmp_path / "b")
    without.record(sample_event(seq=0))
    assert without.outbox_size() == 0 and without.counts()["kitchen"] == 1
    without.close()


# ---------------------------------------------------------------------- outbox


@dataclass
class Info:
    rc: int
    mid: int


class FakeClient:
    """Records publishes and numbers them like paho; can fail or call back mid-publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str, str, int]] = []
        self.rc = mqtt.MQTT_ERR_SUCCESS
        self.during_publish: Callable[[int], None] | None = None
        self._mid = 0

    def publish(self, topic: str, payload: str, qos: int = 0, retain: bool = False) -> Info:
        self._mid += 1
        self.sent.append((self._mid, topic, payload, qos))
        if self.during_publish is not None:
            self.during_publish(self._mid)
        return Info(self.rc, self._mid)

    def seqs(self) -> list[int]:
        return [json.loads(p)["seq"] for _, _, p, _ in self.sent]

    def mids(self) -> list[int]:
        return [mid for mid, _, _, _ in self.sent]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path, message=event_message)
    yield s
    s.close()


def fill(store: Store, n: int) -> None:
    for _ in range(n):
        store.record(sample_event(seq=0))


def outbox_seqs(store: Store) -> list[int]:
    return [json.loads(p)["seq"] for _, _, p, _ in store.outbox_batch(limit=1000)]


def test_outbox_is_published_in_order_once_connected(store):
    fill(store, 5)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "smartbin/t1")
    assert pub.publish_pending() == 0 and client.sent == []  # not connected yet
    pub.on_connect()
    assert pub.publish_pending() == 5
    assert client.seqs() == [1, 2, 3, 4, 5]
    assert {(t, q) for _, t, _, q in client.sent} == {("smartbin/t1/event", 1)}
    assert pub.publish_pending() == 0  # nothing new: nothing sent twice
    assert store.outbox_size() == 5  # nothing acknowledged yet


def test_an_ack_removes_exactly_its_row(store):
    fill(store, 3)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b")
    pub.on_connect()
    pub.publish_pending()
    pub.on_publish(client.mids()[1])
    assert outbox_seqs(store) == [1, 3]
    pub.on_publish(999)  # not ours (a QoS 0 state message): removes nothing
    assert outbox_seqs(store) == [1, 3]
    pub.on_publish(client.mids()[0])
    pub.on_publish(client.mids()[2])
    assert store.outbox_size() == 0


def test_an_ack_that_beats_publish_returning_is_not_lost(store):
    fill(store, 3)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b", window=3)
    client.during_publish = pub.on_publish  # paho's thread acks before publish() returns
    pub.on_connect()
    assert pub.publish_pending() == 3
    assert store.outbox_size() == 0
    fill(store, 3)  # the window was freed by those early acks
    assert pub.publish_pending() == 3 and client.seqs() == [1, 2, 3, 4, 5, 6]


def test_a_reconnect_resends_everything_unacknowledged(store):
    fill(store, 3)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b")
    pub.on_connect()
    pub.publish_pending()
    pub.on_publish(client.mids()[0])
    pub.on_disconnect()
    fill(store, 1)
    assert pub.publish_pending() == 0  # offline: waits
    pub.on_connect()
    assert pub.publish_pending() == 3
    assert client.seqs() == [1, 2, 3, 2, 3, 4]
    for mid in client.mids()[3:]:
        pub.on_publish(mid)
    assert store.outbox_size() == 0


def test_a_reconnect_during_a_batch_restarts_from_the_outbox(store):
    fill(store, 4)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b")
    pub.on_connect()

    def reconnect_on_second(mid: int) -> None:
        if mid == 2:
            pub.on_connect()

    client.during_publish = reconnect_on_second
    assert pub.publish_pending() == 1  # the batch of the old connection is abandoned
    client.during_publish = None
    assert pub.publish_pending() == 4
    assert client.seqs() == [1, 2, 1, 2, 3, 4]


def test_a_refused_publish_is_tried_again(store):
    fill(store, 2)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b")
    pub.on_connect()
    client.rc = mqtt.MQTT_ERR_NO_CONN
    assert pub.publish_pending() == 0
    client.rc = mqtt.MQTT_ERR_SUCCESS
    assert pub.publish_pending() == 2
    assert client.seqs() == [1, 1, 2]


def test_the_inflight_window_is_respected(store):
    fill(store, 10)
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b", window=3)
    pub.on_connect()
    assert pub.publish_pending() == 3
    assert pub.publish_pending() == 0  # three unacknowledged: no room
    pub.on_publish(client.mids()[0])
    assert pub.publish_pending() == 1
    assert client.seqs() == [1, 2, 3, 4]


def test_drain_is_true_only_when_the_outbox_is_empty(store):
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b")
    assert pub.drain(0.05)
    fill(store, 2)
    pub.on_connect()
    pub.publish_pending()
    assert not pub.drain(0.15)
    pub.on_publish(client.mids()[0])
    assert not pub.drain(0.1)
    pub.on_publish(client.mids()[1])
    assert pub.drain(0.1)


def test_the_publisher_thread_delivers_what_is_queued_later(store):
    client = FakeClient()
    pub = OutboxPublisher(client, store, "b", window=2)
    client.during_publish = pub.on_publish  # a broker that acknowledges at once
    pub.start()
    try:
        pub.on_connect()
        fill(store, 5)
        pub.wake()
        assert pub.drain(5)
        assert client.seqs() == [1, 2, 3, 4, 5]
    finally:
        pub.stop()


# ---------------------------------------------------------------------- discovery


def test_discovery_topics_ids_and_state_topics():
    cfg = config_from_dict({"mqtt": {"discovery_prefix": "ha"}}).mqtt
    out = discovery_payloads(cfg, "bin-7", "smartbin/bin-7")
    node = node_id("bin-7")
    assert node == "smartbin_bin_7"
    keys = [f"count_{b}" for b in BINS] + ["count_total", "last_item", "last_bin", "state"]
    assert set(out) == {f"ha/sensor/{node}/{k}/config" for k in keys} | {
        f"ha/binary_sensor/{node}/online/config"}
    ids = [c["unique_id"] for c in out.values()]
    assert len(set(ids)) == len(ids) == 9
    assert all(c["object_id"] == c["unique_id"] for c in out.values())
    for topic, conf in out.items():
        key = topic.split("/")[-2]
        assert conf["unique_id"] == f"{node}_{key}"
        assert conf["device"] == out[f"ha/binary_sensor/{node}/online/config"]["device"]
        assert str(conf["state_topic"]).startswith("smartbin/bin-7/")
        if "/sensor/" in topic:
            assert conf["availability_topic"] == "smartbin/bin-7/availability"
    for b in BINS:
        conf = out[f"ha/sensor/{node}/count_{b}/config"]
        assert conf["state_topic"] == f"smartbin/bin-7/counts/{b}"
        assert conf["state_class"] == "total_increasing"
    assert out[f"ha/sensor/{node}/count_total/config"]["state_topic"] == "smartbin/bin-7/counts"
    assert status_topic(cfg) == "ha/status"


def test_discovery_payload_bytes():
    cfg = config_from_dict({}).mqtt
    out = discovery_payloads(cfg, "g-1", "smartbin/g-1")
    dev = ('"device": {"identifiers": ["smartbin_g_1"], "name": "Smart bin g-1", '
           '"manufacturer": "smartbin", "model": "four-compartment sorting bin", '
           f'"sw_version": "{__version__}"}}')
    assert to_json(out["homeassistant/sensor/smartbin_g_1/last_item/config"]) == (
        '{"name": "Last item", "state_topic": "smartbin/g-1/last", "value_template": '
        '"{{ value_json.label_en or value_json.label or \'unknown\' }}", '
        '"json_attributes_topic": "smartbin/g-1/last", "icon": "mdi:recycle", '
        '"unique_id": "smartbin_g_1_last_item", "object_id": "smartbin_g_1_last_item", '
        f'{dev}, "availability_topic": "smartbin/g-1/availability", '
        '"payload_available": "online", "payload_not_available": "offline"}')
    assert to_json(out["homeassistant/binary_sensor/smartbin_g_1/online/config"]) == (
        '{"name": "Online", "state_topic": "smartbin/g-1/availability", "payload_on": '
        '"online", "payload_off": "offline", "device_class": "connectivity", "unique_id": '
        f'"smartbin_g_1_online", "object_id": "smartbin_g_1_online", {dev}}}')


# ---------------------------------------------------------------------- commands


class FakeLoop:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.busy = False
        self.classifier = SimpleNamespace(bundle=SimpleNamespace(name="demo", version="1"))

    def pause(self) -> None:
        self.calls.append(("pause", None))

    def resume(self) -> None:
        self.calls.append(("resume", None))

    def sort_next(self, bin_name: str) -> None:
        self.calls.append(("sort_next", bin_name))

    def calibrate(self, *, bin_name: str | None = None, angle: float | None = None) -> float:
        if self.busy:
            raise RuntimeError("the bin is busy (sorting); try again")
        self.calls.append(("calibrate", bin_name or angle))
        return 60.0 if bin_name else float(angle or 0)

    def replace_classifier(self, classifier):
        if self.busy:
            raise RuntimeError("the bin is busy (sorting); try again")
        self.calls.append(("replace_classifier", classifier))
        old, self.classifier = self.classifier, classifier
        return old


class FakeCounts:
    def __init__(self) -> None:
        self.resets = 0

    def reset_counts(self) -> dict[str, int]:
        self.resets += 1
        return {"other": 3}


@pytest.fixture
def bin_():
    loop, counts, changed = FakeLoop(), FakeCounts(), []
    cfg = config_from_dict({})
    asked = []

    def load_classifier(bundle):
        asked.append(bundle)
        if bundle == "broken":
            raise BundleError("model/broken/manifest.json: has no trained weights yet")
        return SimpleNamespace(bundle=SimpleNamespace(name=bundle, version="2"))

    handlers = make_handlers(cfg, loop, counts, lambda: changed.append(1),
                             load_classifier=load_classifier)
    return SimpleNamespace(loop=loop, counts=counts, changed=changed, cfg=cfg, asked=asked,
                           handlers=handlers, commands=Commands(handlers))


def test_well_formed_commands_reach_the_loop(bin_):
    c = bin_.commands
    assert c.handle("pause", b"") == {"ok": True, "paused": True, "command": "pause"}
    assert c.handle("resume", b" {} ") == {"ok": True, "paused": False, "command": "resume"}
    assert c.handle("sort_next", b'{"bin": "hazardous", "id": 7}') == {
        "ok": True, "bin": "hazardous", "command": "sort_next", "id": 7}
    assert c.handle("calibrate", b'{"angle": 30}')["angle"] == 30.0
    assert c.handle("calibrate", b'{"bin": "other", "id": "x"}') == {
        "ok": True, "angle": 60.0, "command": "calibrate", "id": "x"}
    assert bin_.loop.calls == [("pause", None), ("resume", None), ("sort_next", "hazardous"),
                               ("calibrate", 30.0), ("calibrate", "other")]


@pytest.mark.parametrize(("name", "payload", "message"), [
    ("explode", b"{}", "unknown command 'explode'; commands: pause, resume"),
    ("pause", b"{not json", "payload is not JSON"),
    ("pause", b"\xff\xfe", "payload is not JSON"),
    ("pause", b'["x"]', "payload must be a JSON object"),
    ("sort_next", b'"other"', "payload must be a JSON object"),
    ("pause", b"3", "payload must be a JSON object"),
    ("pause", b'{"now": true}', "unexpected field(s) now; allowed: none"),
    ("sort_next", b'{"bin": "other", "speed": 2}', "unexpected field(s) speed; allowed: bin"),
    ("sort_next", b"{}", "missing field(s) bin"),
    ("sort_next", b'{"bin": "glass"}', "bin must be one of recyclable, kitchen"),
    ("sort_next", b'{"bin": ["other"]}', "bin must be one of"),
    ("reset_counts", b"{}", "missing field(s) confirm"),
    ("reset_counts", b'{"confirm": "yes"}', 'confirm must be "reset_counts"'),
    ("calibrate", b"{}", "give exactly one of bin or angle"),
    ("calibrate", b'{"bin": "other", "angle": 3}', "give exactly one of bin or angle"),
    ("calibrate", b'{"angle": true}', "angle must be a number"),
    ("calibrate", b'{"angle": "30"}', "angle must be a number"),
    ("calibrate", b'{"angle": 500}', "angle must be within"),
    ("calibrate", b'{"angle": NaN}', "angle must be within"),
    ("reload_model", b'{"bundle": ""}', "bundle must be a bundle name or folder"),
    ("reload_model", b'{"bundle": 3}', "bundle must be a bundle name or folder"),
    ("reload_model", b'{"model": "demo"}', "unexpected field(s) model; allowed: bundle"),
])
def test_bad_commands_are_refused_and_change_nothing(bin_, name, payload, message):
    reply = bin_.commands.handle(name, payload)
    assert reply["ok"] is False and reply["command"] == name
    assert message in str(reply["error"]), reply
    assert bin_.loop.calls == [] and bin_.counts.resets == 0 and bin_.changed == []


def test_the_request_id_is_echoed_on_success_and_on_error(bin_):
    assert bin_.commands.handle("pause", b'{"id": "a1"}')["id"] == "a1"
    assert bin_.commands.handle("pause", b'{"id": {"n": 1}}')["id"] == {"n": 1}
    reply = bin_.commands.handle("sort_next", b'{"bin": "glass", "id": 9}')
    assert reply["ok"] is False and reply["id"] == 9
    assert "id" not in bin_.commands.handle("pause", b"{}")


def test_reply_bytes_keep_their_field_order(bin_):
    assert to_json(bin_.commands.handle("pause", b"[1]")) == (
        '{"ok": false, "command": "pause", "error": "payload must be a JSON object"}')
    assert to_json(bin_.commands.handle("sort_next", b'{"bin": "kitchen", "id": "a1"}')) == (
        '{"ok": true, "bin": "kitchen", "command": "sort_next", "id": "a1"}')
    assert to_json(bin_.commands.handle("sort_next", b'{"bin": "x", "id": 3}')) == (
        '{"ok": false, "error": "bin must be one of recyclable, kitchen, hazardous, other", '
        '"command": "sort_next", "id": 3}')


def test_reset_counts_needs_its_confirmation(bin_):
    reply = bin_.commands.handle("reset_counts", b'{"confirm": "reset_counts"}')
    assert reply == {"ok": True, "before": {"other": 3}, "command": "reset_counts"}
    assert bin_.counts.resets == 1 and bin_.changed == [1]


def test_a_busy_loop_is_a_busy_error(bin_):
    bin_.loop.busy = True
    with pytest.raises(BusyError, match="busy"):
        bin_.handlers["calibrate"]({"angle": 10})
    reply = bin_.commands.handle("calibrate", b'{"bin": "kitchen", "id": 1}')
    assert reply == {"ok": False, "error": "the bin is busy (sorting); try again",
                     "command": "calibrate", "id": 1}


def test_reload_model_swaps_only_a_model_that_loaded(bin_):
    reply = bin_.commands.handle("reload_model", b'{"bundle": "broken"}')
    assert reply["ok"] is False and "no trained weights" in reply["error"]
    assert bin_.loop.calls == [] and bin_.loop.classifier.bundle.name == "demo"
    reply = bin_.commands.handle("reload_model", b'{"bundle": "trashnet"}')
    assert reply == {"ok": True, "model": "trashnet", "version": "2", "previous": "demo 1",
                     "command": "reload_model"}
    assert bin_.commands.handle("reload_model", b"")["model"] == bin_.cfg.model.bundle
    assert bin_.asked == ["broken", "trashnet", bin_.cfg.model.bundle]


def boom(args):
    return {"half": 1 / 0}


def refuse(args):
    raise CommandError("the lid is open")


def test_handler_errors_become_error_replies(caplog):
    c = Commands({"refuse": refuse, "boom": boom})
    assert c.handle("refuse", b'{"id": 4}') == {"ok": False, "error": "the lid is open",
                                                 "command": "refuse", "id": 4}
    with caplog.at_level(logging.ERROR):
        reply = c.handle("boom", b"{}")
    assert reply["ok"] is False and "ZeroDivisionError" in reply["error"]
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_no_handlers_means_commands_are_not_available():
    reply = Commands(None).handle("pause", b"{}")
    assert reply == {"ok": False, "error": "commands are not available", "command": "pause"}


def test_the_command_thread_survives_a_failing_handler():
    replies: list[tuple[str, dict]] = []
    got = threading.Condition()

    def sink(name, reply):
        with got:
            replies.append((name, reply))
            got.notify_all()

    c = Commands({"boom": boom, "ok": lambda args: {"seen": args}}, reply=sink)
    c.start()
    try:
        c.submit("boom", b"{}")
        c.submit("ok", b'{"n": 1}')
        c.submit("ok", b"nope")
        with got:
            assert got.wait_for(lambda: len(replies) == 3, timeout=5), replies
    finally:
        c.stop()
    assert [(n, r["ok"]) for n, r in replies] == [("boom", False), ("ok", True), ("ok", False)]
    assert replies[1][1]["seen"] == {"n": 1}


def test_parse_args():
    assert parse_args(b"") == {} and parse_args(b"  \n") == {}
    assert parse_args('{"a": "é"}'.encode()) == {"a": "é"}
    for bad in (b"{", b"null", b"[]", b'"s"', b"\x80"):
        with pytest.raises(CommandError):
            parse_args(bad)


# ---------------------------------------------------------------------- connection


def test_messages_are_routed_by_topic_filter():
    cfg = config_from_dict({}).mqtt
    conn = Connection(cfg, client_id="unit")
    got: list[tuple[str, str, bytes]] = []
    conn.on_message("smartbin/t/cmd/+", lambda t, p: got.append(("cmd", t, p)))
    conn.on_message("homeassistant/status", lambda t, p: got.append(("ha", t, p)))
    for topic, payload in (("smartbin/t/cmd/pause", b"{}"), ("homeassistant/status", b"online"),
                           ("smartbin/t/cmd/a/b", b"x"), ("smartbin/u/cmd/pause", b"x")):
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = payload
        conn._on_message(conn.client, None, msg)
    assert got == [("cmd", "smartbin/t/cmd/pause", b"{}"),
                   ("ha", "homeassistant/status", b"online")]
