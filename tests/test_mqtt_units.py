"""The MQTT parts without a broker: payload bytes, the outbox publisher against a fake
client, Home Assistant discovery, and command parsing and dispatch against a fake loop."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from bin_controller import __version__
from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.domain import Fault, SortEvent, State
from bin_controller.errors import BundleError, BusyError, CommandError, ConfigError
from bin_controller.fill import Emptied, FillTracker
from bin_controller.mqtt.commands import Commands, make_handlers, parse_args
from bin_controller.mqtt.connection import Connection, parse_host
from bin_controller.mqtt.discovery import discovery_payloads, node_id, status_topic
from bin_controller.mqtt.outbox import OutboxPublisher
from bin_controller.mqtt.owner import OwnerClaim
from bin_controller.payloads import (
    FILL,
    FILL_FIELDS,
    IMAGE,
    IMAGE_META,
    bin_count_payloads,
    counts_payload,
    emptied_message,
    event_message,
    fault_payload,
    fill_payload,
    image_meta_payload,
    last_payload,
    review_photo_topic,
    state_payload,
    stats_report,
    to_json,
)
from bin_controller.photolog import PhotoLog, Thumbnail
from bin_controller.store import Store
from bin_controller.vision.bundle import Label

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
        '"exposure_us": null, "analogue_gain": null, "predicted_bin": null, "photo": false, '
        '"redirected_from": null}')
    m = event_message(sample_event(predicted_bin="other", photo=True))
    assert m.payload.endswith('"predicted_bin": "other", "photo": true, '
                              '"redirected_from": null}')
    m = event_message(sample_event(bin="other", predicted_bin="kitchen",
                                   redirected_from="kitchen"))
    assert m.payload.endswith('"predicted_bin": "kitchen", "photo": false, '
                              '"redirected_from": "kitchen"}')


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


CONTAMINATION = {
    "recyclable": {"reviewed": 2, "wrong": 1, "rate": 0.5},
    "kitchen": {"reviewed": 0, "wrong": 0, "rate": None},
    "hazardous": {"reviewed": 0, "wrong": 0, "rate": None},
    "other": {"reviewed": 1, "wrong": 0, "rate": 0.0},
    "total": {"reviewed": 3, "wrong": 1, "rate": 0.3333}, "reviewed_fraction": 0.75,
    "items": 4}


def test_photo_and_contamination_payload_bytes():
    snapshot = {"recyclable": 2, "kitchen": 1, "hazardous": 0, "other": 1, "total": 4}
    assert counts_payload(snapshot, CONTAMINATION) == (
        '{"recyclable": 2, "kitchen": 1, "hazardous": 0, "other": 1, "total": 4, '
        '"contamination": {"recyclable": {"reviewed": 2, "wrong": 1, "rate": 0.5}, '
        '"kitchen": {"reviewed": 0, "wrong": 0, "rate": null}, '
        '"hazardous": {"reviewed": 0, "wrong": 0, "rate": null}, '
        '"other": {"reviewed": 1, "wrong": 0, "rate": 0.0}, '
        '"total": {"reviewed": 3, "wrong": 1, "rate": 0.3333}, "reviewed_fraction": 0.75, '
        '"items": 4}}')
    thumbnail = Thumbnail(seq=12, time=1700000000.5, jpeg=b"\xff\xd8" + b"x" * 98, width=224,
                          height=168, label="易拉罐", bin="recyclable")
    assert image_meta_payload(thumbnail.meta()) == (
        '{"seq": 12, "time": 1700000000.5, "label": "易拉罐", "bin": "recyclable", '
        '"bytes": 100, "width": 224, "height": 168, "content_type": "image/jpeg"}')
    assert (IMAGE, IMAGE_META, review_photo_topic(12)) == (
        "image", "image/meta", "reply/review_photo/12")
    report = stats_report(uptime_s=1.0, cycle_ms_p50=None, cycle_ms_p95=None,
                          items_per_hour=0, outbox=0, version="1", status={},
                          cpu_temperature_c=None, contamination={"items": 0},
                          photos={"photos_mb": 0.5, "photos_dropped": 0, "photos_deleted": 2})
    assert to_json(report) == (
        '{"uptime_s": 1.0, "cycle_ms_p50": null, "cycle_ms_p95": null, "items_per_hour": 0, '
        '"outbox": 0, "version": "1", "photos_mb": 0.5, "photos_dropped": 0, '
        '"photos_deleted": 2, "contamination": {"items": 0}}')


def fill_entry(**over: object) -> dict:
    return {"pct": 0.0, "state": "ok", "source": "estimate", "sensor_fault": False,
            "sensor_pct": None, "items": 0, "capacity_l": 40.0, "full_in_s": None,
            "emptied_at": None, "full_events": 0, "emptied_events": 0, **over}


def test_fill_and_emptied_payload_bytes():
    snapshot = {"recyclable": fill_entry(),
                "kitchen": fill_entry(pct=72.5, state="warn", source="sensor", items=12,
                                      capacity_l=20.0, full_in_s=4800, sensor_pct=71.0,
                                      full_events=2),
                "hazardous": fill_entry(pct=96.0, state="full", sensor_fault=True, items=30,
                                        capacity_l=10.0),
                "other": fill_entry(capacity_l=40.0)}
    assert fill_payload(snapshot) == (
        '{"recyclable": {"pct": 0.0, "state": "ok", "source": "estimate", "sensor_fault": '
        'false, "items": 0, "capacity_l": 40.0, "full_in_s": null}, '
        '"kitchen": {"pct": 72.5, "state": "warn", "source": "sensor", "sensor_fault": '
        'false, "items": 12, "capacity_l": 20.0, "full_in_s": 4800}, '
        '"hazardous": {"pct": 96.0, "state": "full", "source": "estimate", "sensor_fault": '
        'true, "items": 30, "capacity_l": 10.0, "full_in_s": null}, '
        '"other": {"pct": 0.0, "state": "ok", "source": "estimate", "sensor_fault": false, '
        '"items": 0, "capacity_l": 40.0, "full_in_s": null}}')
    m = emptied_message(Emptied("kitchen", 1700000002.5, 97.5, 31, "command"))
    assert (m.topic, m.qos, FILL) == ("emptied", 1, "fill")
    assert m.payload == ('{"bin": "kitchen", "time": 1700000002.5, "pct_before": 97.5, '
                         '"items": 31, "source": "command"}')


def test_the_fill_payload_reads_the_trackers_snapshot(tmp_path):
    cfg = config_from_dict({"fill": {"capacity_l": {
        "recyclable": 40.0, "kitchen": 2.0, "hazardous": 10.0, "other": 40.0},
        "estimate_margin_pct": 0.0}}).fill
    fill = FillTracker(cfg, tmp_path)
    for _ in range(3):
        fill.added(sample_event(bin="kitchen"))  # 0.3 l each
    sent = json.loads(fill_payload(fill.snapshot()))
    assert list(sent) == list(BINS)
    assert all(list(entry) == list(FILL_FIELDS) for entry in sent.values())
    assert sent["kitchen"]["pct"] == 45.0 and sent["kitchen"]["items"] == 3
    assert sent["kitchen"]["capacity_l"] == 2.0 and sent["kitchen"]["state"] == "ok"
    assert sent["other"]["pct"] == 0.0


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


@pytest.mark.parametrize("photos", [False, True])
def test_discovery_topics_ids_and_state_topics(photos):
    cfg = config_from_dict({"mqtt": {"discovery_prefix": "ha"}}).mqtt
    out = discovery_payloads(cfg, "bin-7", "smartbin/bin-7", photos=photos)
    node = node_id("bin-7")
    assert node == "smartbin_bin_7"
    keys = [f"count_{b}" for b in BINS] + ["count_total", "last_item", "last_bin", "state"]
    keys += ["contamination", "teach", "teach_progress"] if photos else []
    keys += ["stats_uptime_s", "stats_cycle_ms_p95", "stats_items_per_hour", "stats_outbox",
             "stats_cpu_temperature_c"]
    expected = {f"ha/sensor/{node}/{k}/config" for k in keys} | {
        f"ha/binary_sensor/{node}/online/config"}
    expected |= {f"ha/image/{node}/last_image/config"} if photos else set()
    expected |= {f"ha/button/{node}/{k}/config"
                 for k in ["pause", "resume", *(f"sort_next_{b}" for b in BINS)]}
    expected |= {f"ha/select/{node}/sort_next/config"}
    assert set(out) == expected
    ids = [c["unique_id"] for c in out.values()]
    assert len(set(ids)) == len(ids) == (13 if photos else 9) + 5 + 2 + len(BINS) + 1
    assert all(c["object_id"] == c["unique_id"] for c in out.values())
    for topic, conf in out.items():
        key = topic.split("/")[-2]
        assert conf["unique_id"] == f"{node}_{key}"
        assert conf["device"] == out[f"ha/binary_sensor/{node}/online/config"]["device"]
        assert conf["origin"] == {"name": "smartbin", "sw": __version__}
        read = conf.get("state_topic", conf.get("image_topic", conf.get("command_topic")))
        assert str(read).startswith("smartbin/bin-7/")
        if "/binary_sensor/" not in topic:
            assert conf["availability_topic"] == "smartbin/bin-7/availability"
    for b in BINS:
        conf = out[f"ha/sensor/{node}/count_{b}/config"]
        assert conf["state_topic"] == f"smartbin/bin-7/counts/{b}"
        assert conf["state_class"] == "total_increasing"
    assert out[f"ha/sensor/{node}/count_total/config"]["state_topic"] == "smartbin/bin-7/counts"
    if photos:
        image = out[f"ha/image/{node}/last_image/config"]
        assert image["image_topic"] == "smartbin/bin-7/image"
        assert image["content_type"] == "image/jpeg"
        rate = out[f"ha/sensor/{node}/contamination/config"]
        assert (rate["state_topic"], rate["unit_of_measurement"]) == (
            "smartbin/bin-7/counts", "%")
    assert status_topic(cfg) == "ha/status"


def test_discovery_payload_bytes():
    cfg = config_from_dict({}).mqtt
    out = discovery_payloads(cfg, "g-1", "smartbin/g-1")
    dev = ('"device": {"identifiers": ["smartbin_g_1"], "name": "Smart bin g-1", '
           '"manufacturer": "smartbin", "model": "four-compartment sorting bin", '
           f'"sw_version": "{__version__}"}}')
    made_by = f'"origin": {{"name": "smartbin", "sw": "{__version__}"}}'
    # What every entity but the online sensor ends with.
    tail = (f'{dev}, "availability_topic": "smartbin/g-1/availability", '
            f'"payload_available": "online", "payload_not_available": "offline", {made_by}}}')
    assert to_json(out["homeassistant/sensor/smartbin_g_1/last_item/config"]) == (
        '{"name": "Last item", "state_topic": "smartbin/g-1/last", "value_template": '
        '"{{ value_json.label_en or value_json.label or \'unknown\' }}", '
        '"json_attributes_topic": "smartbin/g-1/last", "icon": "mdi:recycle", '
        '"unique_id": "smartbin_g_1_last_item", "object_id": "smartbin_g_1_last_item", '
        f'{tail}')
    assert to_json(out["homeassistant/binary_sensor/smartbin_g_1/online/config"]) == (
        '{"name": "Online", "state_topic": "smartbin/g-1/availability", "payload_on": '
        '"online", "payload_off": "offline", "device_class": "connectivity", "unique_id": '
        f'"smartbin_g_1_online", "object_id": "smartbin_g_1_online", {dev}, {made_by}}}')
    # The state and the last bin are enums: Home Assistant offers their values to automations.
    assert to_json(out["homeassistant/sensor/smartbin_g_1/state/config"]) == (
        '{"name": "State", "state_topic": "smartbin/g-1/state", "value_template": '
        '"{{ value_json.state }}", "json_attributes_topic": "smartbin/g-1/state", "icon": '
        '"mdi:state-machine", "device_class": "enum", "options": ["idle", "settling", '
        '"capturing", "classifying", "sorting", "clearing", "cooldown", "paused", "fault"], '
        '"unique_id": "smartbin_g_1_state", "object_id": "smartbin_g_1_state", '
        f'{tail}')
    assert to_json(out["homeassistant/sensor/smartbin_g_1/last_bin/config"]) == (
        '{"name": "Last bin", "state_topic": "smartbin/g-1/last", "value_template": '
        '"{{ value_json.bin }}", "icon": "mdi:tray-arrow-down", "device_class": "enum", '
        '"options": ["recyclable", "kitchen", "hazardous", "other"], "unique_id": '
        f'"smartbin_g_1_last_bin", "object_id": "smartbin_g_1_last_bin", {tail}')
    assert to_json(out["homeassistant/sensor/smartbin_g_1/stats_cycle_ms_p95/config"]) == (
        '{"name": "Cycle time p95", "state_topic": "smartbin/g-1/stats", "value_template": '
        '"{{ value_json.cycle_ms_p95 | default(none) }}", "state_class": "measurement", '
        '"unit_of_measurement": "ms", "entity_category": "diagnostic", "icon": '
        '"mdi:timer-sand", "device_class": "duration", "unique_id": '
        '"smartbin_g_1_stats_cycle_ms_p95", "object_id": "smartbin_g_1_stats_cycle_ms_p95", '
        f'{tail}')
    assert to_json(out["homeassistant/sensor/smartbin_g_1/stats_outbox/config"]) == (
        '{"name": "Outbox", "state_topic": "smartbin/g-1/stats", "value_template": '
        '"{{ value_json.outbox | default(none) }}", "state_class": "measurement", '
        '"unit_of_measurement": "messages", "entity_category": "diagnostic", "icon": '
        '"mdi:tray-full", "unique_id": "smartbin_g_1_stats_outbox", "object_id": '
        f'"smartbin_g_1_stats_outbox", {tail}')
    stats = {key: out[f"homeassistant/sensor/smartbin_g_1/stats_{key}/config"]
             for key in ("uptime_s", "cycle_ms_p95", "items_per_hour", "outbox",
                         "cpu_temperature_c")}
    assert {k: (c["unit_of_measurement"], c.get("device_class")) for k, c in stats.items()} == {
        "uptime_s": ("s", "duration"), "cycle_ms_p95": ("ms", "duration"),
        "items_per_hour": ("items/h", None), "outbox": ("messages", None),
        "cpu_temperature_c": ("°C", "temperature")}
    assert all(c["entity_category"] == "diagnostic" for c in stats.values())
    assert to_json(out["homeassistant/button/smartbin_g_1/pause/config"]) == (
        '{"name": "Pause", "command_topic": "smartbin/g-1/cmd/pause", "payload_press": "{}", '
        '"icon": "mdi:pause", "unique_id": "smartbin_g_1_pause", "object_id": '
        f'"smartbin_g_1_pause", {tail}')
    assert to_json(out["homeassistant/button/smartbin_g_1/resume/config"]) == (
        '{"name": "Resume", "command_topic": "smartbin/g-1/cmd/resume", "payload_press": '
        '"{}", "icon": "mdi:play", "unique_id": "smartbin_g_1_resume", "object_id": '
        f'"smartbin_g_1_resume", {tail}')
    assert to_json(out["homeassistant/button/smartbin_g_1/sort_next_hazardous/config"]) == (
        '{"name": "Sort next to hazardous", "command_topic": "smartbin/g-1/cmd/sort_next", '
        '"payload_press": "{\\"bin\\": \\"hazardous\\"}", "icon": "mdi:debug-step-over", '
        '"unique_id": "smartbin_g_1_sort_next_hazardous", "object_id": '
        f'"smartbin_g_1_sort_next_hazardous", {tail}')
    assert to_json(out["homeassistant/select/smartbin_g_1/sort_next/config"]) == (
        '{"name": "Sort next", "command_topic": "smartbin/g-1/cmd/sort_next", '
        '"command_template": "{\\"bin\\": \\"{{ value }}\\"}", "options": ["recyclable", '
        '"kitchen", "hazardous", "other"], "icon": "mdi:debug-step-over", "unique_id": '
        f'"smartbin_g_1_sort_next", "object_id": "smartbin_g_1_sort_next", {tail}')
    for b in BINS:
        button = out[f"homeassistant/button/smartbin_g_1/sort_next_{b}/config"]
        assert json.loads(str(button["payload_press"])) == {"bin": b}
    with_photos = discovery_payloads(cfg, "g-1", "smartbin/g-1", photos=True)
    assert to_json(with_photos["homeassistant/image/smartbin_g_1/last_image/config"]) == (
        '{"name": "Last item picture", "image_topic": "smartbin/g-1/image", "content_type": '
        '"image/jpeg", "unique_id": "smartbin_g_1_last_image", "object_id": '
        f'"smartbin_g_1_last_image", {tail}')
    assert to_json(with_photos["homeassistant/sensor/smartbin_g_1/contamination/config"]) == (
        '{"name": "Contamination", "state_topic": "smartbin/g-1/counts", "value_template": '
        '"{% set c = value_json.contamination | default(none) %}{{ (c.total.rate * 100) | '
        'round(1) if c and c.total.rate is not none else none }}", "state_class": '
        '"measurement", "unit_of_measurement": "%", "json_attributes_topic": '
        '"smartbin/g-1/counts", "json_attributes_template": "{{ (value_json.contamination | '
        'default({})) | tojson }}", "icon": "mdi:delete-alert", "unique_id": '
        '"smartbin_g_1_contamination", "object_id": "smartbin_g_1_contamination", '
        f'{tail}')
    # The entities of a bin without a photo log are the same bytes as before.
    assert {t: c for t, c in with_photos.items() if t in out} == out


def test_the_dashboard_is_the_devices_configuration_url():
    plain = discovery_payloads(config_from_dict({}).mqtt, "g-1", "smartbin/g-1")
    assert all("configuration_url" not in c["device"] for c in plain.values())
    cfg = config_from_dict({"mqtt": {"dashboard_url": "https://bins.example:8080/"}}).mqtt
    out = discovery_payloads(cfg, "g-1", "smartbin/g-1", photos=True, fill=True)
    assert {json.dumps(c["device"]) for c in out.values()} == {
        '{"identifiers": ["smartbin_g_1"], "name": "Smart bin g-1", "manufacturer": '
        '"smartbin", "model": "four-compartment sorting bin", "sw_version": '
        f'"{__version__}", "configuration_url": "https://bins.example:8080/"}}'}


# Bin ids as people write them: host names, dotted names, other scripts, and ids one
# character apart from another's safe form.
BIN_IDS = ["bin-1", "bin1", "lab.bin", "lab_bin", "lab-bin2", "küche", "k_che", "kuche",
           "küche2", "Küche", "lab.bin.2", "lab.bin_2", "垃圾桶", "ゴミ箱", "a.",
           "x@y", "x!", "x_", "smartbin", "Bin-7"]


def test_node_ids_are_what_home_assistant_accepts_and_never_shared():
    import re

    nodes = {bin_id: node_id(bin_id) for bin_id in BIN_IDS}
    for bin_id, node in nodes.items():
        assert re.fullmatch(r"[a-zA-Z0-9_]+", node), (bin_id, node)
        assert node == node_id(bin_id)  # stable
    assert len(set(nodes.values())) == len(nodes), nodes
    # Ids Home Assistant always accepted keep the node id (and so the unique ids) they had.
    assert node_id("bin-1") == "smartbin_bin_1" and node_id("Bin-7") == "smartbin_Bin_7"
    assert node_id("lab_bin") == "smartbin_lab_bin"
    # The others: what can be kept, and a hash of the real id.
    assert re.fullmatch(r"smartbin_lab_bin_[0-9a-f]{8}", nodes["lab.bin"])
    assert re.fullmatch(r"smartbin_k_che_[0-9a-f]{8}", nodes["küche"])
    assert nodes["küche"] != nodes["k_che"] == "smartbin_k_che"
    assert nodes["küche"] != nodes["Küche"]


@pytest.mark.parametrize("bin_id", ["lab.bin", "küche", "bin-1"])
def test_discovery_topics_are_legal_for_any_bin_id(bin_id):
    """Home Assistant's own pattern for a discovery topic; the state topics keep the id."""
    import re

    legal = re.compile(r"homeassistant/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                       r"(?P<object_id>[a-zA-Z0-9_-]+)/config")
    base = f"smartbin/{bin_id}"
    out = discovery_payloads(config_from_dict({}).mqtt, bin_id, base, photos=True, fill=True)
    node = node_id(bin_id)
    for topic, conf in out.items():
        match = legal.fullmatch(topic)
        assert match and match["node_id"] == node, topic
        assert str(conf["unique_id"]).startswith(node) and conf["object_id"] == conf["unique_id"]
        assert conf["device"] == {**conf["device"], "identifiers": [node],
                                  "name": f"Smart bin {bin_id}"}
        read = conf.get("state_topic", conf.get("image_topic", conf.get("command_topic")))
        assert str(read).startswith(f"{base}/")


def test_discovery_of_the_fill_levels():
    cfg = config_from_dict({}).mqtt
    plain = discovery_payloads(cfg, "g-1", "smartbin/g-1", photos=True)
    out = discovery_payloads(cfg, "g-1", "smartbin/g-1", photos=True, fill=True)
    assert {t: c for t, c in out.items() if t in plain} == plain  # the others unchanged
    node = "homeassistant/{}/smartbin_g_1/{}/config"
    assert set(out) - set(plain) == {node.format(platform, f"{key}_{b}") for b in BINS
                                     for platform, key in [("sensor", "fill"),
                                                           ("binary_sensor", "full"),
                                                           ("button", "emptied")]}
    dev = ('"device": {"identifiers": ["smartbin_g_1"], "name": "Smart bin g-1", '
           '"manufacturer": "smartbin", "model": "four-compartment sorting bin", '
           f'"sw_version": "{__version__}"}}, "availability_topic": '
           '"smartbin/g-1/availability", "payload_available": "online", '
           '"payload_not_available": "offline", "origin": {"name": "smartbin", "sw": '
           f'"{__version__}"}}}}')
    assert to_json(out[node.format("sensor", "fill_kitchen")]) == (
        '{"name": "Kitchen fill", "state_topic": "smartbin/g-1/fill", "value_template": '
        '"{{ value_json.kitchen.pct }}", "state_class": "measurement", '
        '"unit_of_measurement": "%", "json_attributes_topic": "smartbin/g-1/fill", '
        '"json_attributes_template": "{{ value_json.kitchen | tojson }}", "icon": '
        '"mdi:delete-empty", "unique_id": "smartbin_g_1_fill_kitchen", "object_id": '
        f'"smartbin_g_1_fill_kitchen", {dev}')
    assert to_json(out[node.format("binary_sensor", "full_kitchen")]) == (
        '{"name": "Kitchen full", "state_topic": "smartbin/g-1/fill", "value_template": '
        '"{{ \'ON\' if value_json.kitchen.state == \'full\' else \'OFF\' }}", '
        '"device_class": "problem", "unique_id": "smartbin_g_1_full_kitchen", "object_id": '
        f'"smartbin_g_1_full_kitchen", {dev}')
    assert to_json(out[node.format("button", "emptied_kitchen")]) == (
        '{"name": "Emptied kitchen", "command_topic": "smartbin/g-1/cmd/emptied", '
        '"payload_press": "{\\"bin\\": \\"kitchen\\"}", "icon": "mdi:delete-restore", '
        '"unique_id": "smartbin_g_1_emptied_kitchen", "object_id": '
        f'"smartbin_g_1_emptied_kitchen", {dev}')
    for b in BINS:
        button = out[node.format("button", f"emptied_{b}")]
        assert json.loads(str(button["payload_press"])) == {"bin": b}
        assert out[node.format("sensor", f"fill_{b}")]["value_template"] == \
            f"{{{{ value_json.{b}.pct }}}}"
    ids = [c["unique_id"] for c in out.values()]
    assert len(set(ids)) == len(ids) == 13 + 12 + 12


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

    def recalibrate_camera(self) -> dict:
        if self.busy:
            raise BusyError("an item is on the flap; recalibrate with the flap empty")
        self.calls.append(("recalibrate_camera", None))
        return {"exposure_us": 8000, "analogue_gain": 1.5, "colour_gains": [1.9, 1.4]}


class FakeCounts:
    def __init__(self) -> None:
        self.resets = 0

    def reset_counts(self) -> dict[str, int]:
        self.resets += 1
        return {"other": 3}


@pytest.fixture
def bin_(tmp_path):
    loop, counts, changed = FakeLoop(), FakeCounts(), []
    models = tmp_path / "models"
    for name in ("broken", "trashnet"):  # trashnet is shipped too: the models folder wins
        (models / name).mkdir(parents=True)
        (models / name / "manifest.json").write_text("{}")
    cfg = config_from_dict({"model": {"dir": str(models)}})
    asked = []

    def load_classifier(bundle):
        asked.append(bundle)
        if Path(bundle).name == "broken":
            raise BundleError("model/broken/manifest.json: has no trained weights yet")
        return SimpleNamespace(bundle=SimpleNamespace(name=Path(bundle).name, version="2"))

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
    ("pause", b"\xff\xfe", "payload is not UTF-8 text (byte 0"),
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
    ("calibrate", b'{"angle": NaN}', "payload has NaN, which is not a JSON number"),
    ("calibrate", b'{"angle": -Infinity}', "payload has -Infinity, which is not a JSON number"),
    ("calibrate", b'{"angle": 1e999}', "payload has the number 1e999, too large for a float"),
    ("calibrate", b'{"angle": ' + b"9" * 5000 + b"}",
     "payload has a number of 5000 characters; the limit is 100"),
    ("sort_next", b"[" * 100_000 + b"]" * 100_000, "payload is 200000 bytes; the limit is 65536"),
    ("sort_next", b"[" * 30_000 + b"]" * 30_000,
     "payload nests JSON more than 32 levels deep (the limit)"),
    ("sort_next", b'{"bin": "other", "id": ' + b"[" * 40 + b"]" * 40 + b"}",
     "payload nests JSON more than 32 levels deep"),
    ("pause", b" " * 70_000, "payload is 70000 bytes; the limit is 65536 bytes"),
    ("reload_model", b'{"bundle": ""}', "bundle must be a bundle name (a folder in the models"),
    ("reload_model", b'{"bundle": 3}', "bundle must be a bundle name"),
    ("reload_model", b'{"bundle": "../demo"}', "bundle '../demo' is not a bundle name: give"),
    ("reload_model", b'{"bundle": "/tmp/evil"}', "not a bundle name"),
    ("reload_model", b'{"bundle": "a\\\\b"}', "not a bundle name"),
    ("reload_model", b'{"bundle": "demo\\u0000"}', "not a bundle name"),
    ("reload_model", b'{"bundle": ".hidden"}', "not a bundle name"),
    ("reload_model", b'{"bundle": "a..b"}', "not a bundle name"),
    ("reload_model", b'{"bundle": "' + b"x" * 300 + b'"}',
     "bundle name is 300 characters; the limit is 100"),
    ("reload_model", b'{"model": "demo"}', "unexpected field(s) model; allowed: bundle"),
])
def test_bad_commands_are_refused_and_change_nothing(bin_, name, payload, message):
    reply = bin_.commands.handle(name, payload)
    assert reply["ok"] is False and reply["command"] == name
    assert message in str(reply["error"]), reply
    assert bin_.loop.calls == [] and bin_.counts.resets == 0 and bin_.changed == []
    assert bin_.asked == []  # no bundle was even looked up


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
    models = Path(bin_.cfg.model.dir)
    assert bin_.asked == [str(models / "broken"), str(models / "trashnet"),
                          bin_.cfg.model.bundle]


def test_reload_model_looks_in_the_models_folder_then_the_shipped_bundles_only(
        bin_, tmp_path, monkeypatch):
    from bin_controller.vision.bundle import SHIPPED_MODELS

    assert bin_.commands.handle("reload_model", b'{"bundle": "garbage120"}')["ok"]
    assert bin_.asked == [str(SHIPPED_MODELS / "garbage120")]
    # A bundle folder in the working directory is not a bundle name's business.
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "manifest.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    reply = bin_.commands.handle("reload_model", b'{"bundle": "stray"}')
    shipped = sorted(d.name for d in SHIPPED_MODELS.iterdir() if (d / "manifest.json").is_file())
    assert "demo" in shipped and "stray" not in shipped
    assert reply["error"] == (
        f"no bundle named 'stray' in the models folder {bin_.cfg.model.dir} nor among the "
        f"shipped bundles ({', '.join(shipped)})")
    assert len(bin_.asked) == 1


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


class Replies:
    """A reply sink that tests can wait on."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, reply: dict) -> None:
        with self.cond:
            self.got.append((name, reply))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.got), timeout=timeout)

    def named(self, name: str) -> list[dict]:
        with self.cond:
            return [r for n, r in self.got if n == name]


def blocking_handlers(gate: threading.Event, started: threading.Event | None = None):
    def slow(args):
        if started is not None:
            started.set()
        gate.wait(10)
        return {"done": True}

    return {"slow": slow, "pause": lambda args: {"paused": True},
            "resume": lambda args: {"paused": False}, "quick": lambda args: {"n": args.get("n")}}


def test_a_full_queue_refuses_the_newest_command_at_once():
    gate, started, replies = threading.Event(), threading.Event(), Replies()
    c = Commands(blocking_handlers(gate, started), reply=replies, max_queued=3)
    c.start()
    try:
        c.submit("slow", b"{}")
        assert started.wait(5)  # running, so no longer queued
        for n in range(5):
            c.submit("quick", f'{{"n": {n}, "id": {n}}}'.encode())
        refused = replies.named("quick")  # sent before anything waiting has run
        assert [r["id"] for r in refused] == [3, 4]
        assert refused[0] == {"ok": False, "error": "queue full: 3 commands are waiting; "
                              "try again later", "command": "quick", "id": 3}
        gate.set()
        assert replies.wait_for(lambda got: len(got) == 6)
        assert [r.get("n") for r in replies.named("quick")[2:]] == [0, 1, 2]  # in order
    finally:
        gate.set()
        c.stop()


def test_pause_and_resume_overtake_slow_commands():
    gate, started, replies = threading.Event(), threading.Event(), Replies()
    c = Commands(blocking_handlers(gate, started), reply=replies)
    c.start()
    try:
        c.submit("slow", b"{}")
        assert started.wait(5)
        for _ in range(50):
            c.submit("quick", b"{}")
        c.submit("pause", b'{"id": "p"}')
        c.submit("resume", b"{}")
        assert replies.wait_for(lambda got: len(got) == 2, timeout=5)
        # Answered while the slow command still holds its lane: in order among themselves.
        assert [n for n, _ in replies.got] == ["pause", "resume"]
        assert replies.got[0][1] == {"ok": True, "paused": True, "command": "pause", "id": "p"}
    finally:
        gate.set()
        c.stop()


def test_a_command_over_its_time_limit_gets_a_busy_reply_and_the_lane_goes_on(caplog):
    gate, replies = threading.Event(), Replies()
    c = Commands(blocking_handlers(gate), reply=replies, time_limit_s=0.2)
    c.start()
    try:
        with caplog.at_level(logging.WARNING):
            c.submit("slow", b'{"id": 1}')
            c.submit("quick", b'{"id": 2}')  # while "slow" still runs: busy, not stuck
            assert replies.wait_for(lambda got: len(got) == 2)
        slow, quick = (r for _, r in replies.got)
        assert slow == {"ok": False, "error": "slow did not finish within 0.2 s; it may still "
                        "complete (see the bin's log)", "command": "slow", "id": 1}
        assert quick["ok"] is False and quick["id"] == 2
        assert quick["error"].startswith("busy: slow has been running for ")
        gate.set()  # the overrunning handler ends: its outcome is logged, the lane is free
        assert _wait(lambda: any("finished" in r.getMessage() for r in caplog.records))
        c.submit("quick", b'{"n": 5}')
        assert replies.wait_for(lambda got: len(got) == 3)
        assert replies.got[2][1] == {"ok": True, "n": 5, "command": "quick"}
    finally:
        gate.set()
        c.stop()


def test_the_time_limit_is_per_command():
    c = Commands({}, time_limit_s=2.0, time_limits_s={"reload_model": 90.0})
    assert c.time_limit("reload_model") == 90.0 and c.time_limit("pause") == 2.0


def _wait(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_nothing_ends_the_command_threads(caplog):
    """Even a handler that raises SystemExit, or a reply sink that fails, is one log line
    with its traceback; the next command is still answered."""
    replies = Replies()
    failing_once = [True]

    def sink(name, reply):
        if name == "sink_fails" and failing_once:
            failing_once.clear()
            raise OSError("connection lost")
        replies(name, reply)

    def exits(args):
        raise SystemExit(3)

    def recurses(args):
        return recurses(args)

    c = Commands({"exits": exits, "recurses": recurses, "sink_fails": lambda a: {},
                  "ok": lambda a: {}, "pause": lambda a: {}}, reply=sink)
    c.start()
    try:
        with caplog.at_level(logging.ERROR):
            for name in ("exits", "recurses", "sink_fails", "ok", "pause"):
                c.submit(name, b"{}")
            assert replies.wait_for(lambda got: len(got) == 4), replies.got
    finally:
        c.stop()
    by_name = {n: r for n, r in replies.got}
    assert by_name["exits"]["ok"] is False and "SystemExit" in by_name["exits"]["error"]
    assert "RecursionError" in by_name["recurses"]["error"]
    assert by_name["ok"]["ok"] and by_name["pause"]["ok"]
    assert "sink_fails" not in by_name  # its reply could not be sent: logged instead
    logged = [r for r in caplog.records if r.exc_info]
    assert {r.exc_info[0] for r in logged} >= {SystemExit, RecursionError, OSError}


def test_error_texts_are_whole(bin_):
    """Quotes inside an error survive into the reply and its JSON (they were once cut)."""
    reply = bin_.commands.handle("reset_counts", b'{"confirm": "yes"}')
    assert reply["error"] == 'confirm must be "reset_counts"'
    assert json.loads(to_json(reply))["error"] == 'confirm must be "reset_counts"'
    reply = bin_.commands.handle("reload_model", b'{"bundle": "it\'s/\\"x\\""}')
    assert reply["error"] == ("bundle 'it\\'s/\"x\"' is not a bundle name: give the name of a "
                              "folder in the models folder or of a shipped bundle, not a path")


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


def test_a_failing_hook_never_reaches_paho(caplog):
    """paho ends its network thread when a callback raises: hooks are logged instead."""
    conn = Connection(config_from_dict({}).mqtt, client_id="unit")
    got = []

    def broken(topic, payload):
        raise ValueError("bad handler")

    conn.on_message("a/#", broken)
    conn.on_message("a/#", lambda t, p: got.append(t))
    conn.on_publish(lambda mid: 1 / 0)
    msg = mqtt.MQTTMessage(topic=b"a/b")
    with caplog.at_level(logging.ERROR):
        conn._on_message(conn.client, None, msg)
        conn._on_publish(conn.client, None, 1, None, None)
    assert got == ["a/b"]
    assert {r.exc_info[0] for r in caplog.records if r.exc_info} == {ValueError,
                                                                      ZeroDivisionError}


@pytest.mark.parametrize(("text", "result"), [
    ("broker", ("broker", None)), ("broker:1884", ("broker", 1884)),
    ("10.0.0.2:8883", ("10.0.0.2", 8883)), ("::1", ("::1", None)),
    ("fe80::1%eth0", ("fe80::1%eth0", None)), ("[::1]", ("::1", None)),
    ("[2001:db8::1]:1883", ("2001:db8::1", 1883)),
])
def test_parse_host(text, result):
    assert parse_host(text) == result


@pytest.mark.parametrize(("text", "message"), [
    (":1883", "--mqtt ':1883': the host is empty"),
    ("", "--mqtt '': the host is empty"),
    ("[]:1883", "the host is empty"),
    ("broker:abc", "--mqtt 'broker:abc': the port must be a number from 1 to 65535"),
    ("broker:", "the port must be a number"),
    ("broker:0", "the port must be a number"),
    ("broker:65536", "the port must be a number"),
    ("broker:" + "1" * 5000, "the port must be a number"),
    ("broker:١٨٨٣", "the port must be a number"),
    ("[::1", "unclosed or misplaced ']'"),
    ("[::1]1883", "unclosed or misplaced ']'"),
    ("[::1]:", "the port must be a number"),
    ("mqtt://broker:1883", "a host, not a URL"),
    ("my broker", "'my broker' is not a host name or address"),
    ("bro\x00ker", "is not a host name or address"),
])
def test_parse_host_mistakes_are_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_host(text)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "give HOST or HOST:PORT" in str(err.value) or "port must be" in str(err.value)


def test_an_empty_host_is_an_error_not_a_paho_traceback():
    conn = Connection(config_from_dict({}).mqtt, client_id="unit")
    conn.cfg = dataclasses.replace(conn.cfg, host="")
    with pytest.raises(ConfigError, match=r"mqtt\.host is empty"):
        conn.start()


def test_an_outage_is_one_warning_and_its_end_another(caplog):
    conn = Connection(config_from_dict({}).mqtt, client_id="smartbin-t1")
    conn._down_since = time.monotonic() - 12
    with caplog.at_level(logging.DEBUG, logger="bin_controller.mqtt.connection"):
        for _ in range(3):
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError:  # as paho calls it: inside its except block
                conn._on_connect_fail(conn.client, None)
        conn._on_connect(conn.client, None, None, ReasonCode(PacketTypes.CONNACK, "Success"),
                         None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "MQTT broker localhost:1883 unreachable (Connection refused); retrying every 30 s "
        "at most, events wait in the outbox",
        "MQTT connected to localhost:1883 after 12 s"]


def test_repeated_drops_hint_at_a_shared_client_id(caplog):
    conn = Connection(config_from_dict({}).mqtt, client_id="smartbin-t1")
    success = ReasonCode(PacketTypes.CONNACK, "Success")
    lost = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
    with caplog.at_level(logging.WARNING, logger="bin_controller.mqtt.connection"):
        for _ in range(6):
            conn._on_connect(conn.client, None, None, success, None)
            conn._on_disconnect(conn.client, None, None, lost, None)
    drops = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(drops) == 3  # then only at debug level
    assert "client id smartbin-t1" not in drops[0]
    assert "dropped 2 times within a minute: if another client uses the client id " \
           "smartbin-t1 (a bin with the same bin.id)" in drops[1]


# ---------------------------------------------------------------------- owner claim


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int, bool]] = []

    def publish(self, topic, payload, *, qos=0, retain=False):
        self.sent.append((topic, payload, qos, retain))


def claim(token: str, host: str = "pi-2", pid: int = 77) -> bytes:
    return json.dumps({"token": token, "host": host, "pid": pid, "since": 1.0}).encode()


@pytest.fixture
def owner():
    faults: list[Fault] = []
    conn = FakeConn()
    o = OwnerClaim(conn, "smartbin/t1", "t1", on_duplicate=faults.append, token="me")
    return SimpleNamespace(claim=o, conn=conn, faults=faults)


def test_the_claim_is_published_retained_on_every_connect(owner):
    owner.claim.on_connect()
    owner.claim.on_connect()
    assert len(owner.conn.sent) == 2
    topic, payload, qos, retain = owner.conn.sent[0]
    assert (topic, qos, retain) == ("smartbin/t1/owner", 1, True)
    assert json.loads(payload)["token"] == "me"


def test_a_claim_left_by_a_previous_run_is_no_duplicate(owner):
    owner.claim.on_connect()
    owner.claim.on_message("smartbin/t1/owner", claim("old"), True)
    owner.claim.on_message("smartbin/t1/owner", claim("me"), False)  # our own, echoed
    owner.claim.on_connect()  # a reconnect: the retained claim is ours now
    owner.claim.on_message("smartbin/t1/owner", claim("me"), True)
    for junk in (b"", b"null", b"[1]", b'{"token": 5}', b"\xff", b"[" * 10_000):
        owner.claim.on_message("smartbin/t1/owner", junk, False)
    assert owner.faults == []


def test_another_claim_on_two_connects_within_a_minute_is_a_duplicate(owner, caplog):
    with caplog.at_level(logging.ERROR):
        for _ in range(4):
            owner.claim.on_connect()
            owner.claim.on_message("smartbin/t1/owner", claim("other"), True)
            owner.claim.on_message("smartbin/t1/owner", claim("other"), True)
    assert len(owner.faults) == 1  # reported once, not on every kick
    fault = owner.faults[0]
    assert fault.kind == "duplicate_bin_id"
    assert fault.detail == (
        "another smartbin (host pi-2, pid 77) uses bin.id 't1' on this broker, and the "
        "broker keeps disconnecting one of the two: give each bin its own bin.id (bin.id "
        "in its config file, or --bin-id)")
    assert [r.getMessage() for r in caplog.records] == [f"fault duplicate_bin_id: {fault.detail}"]


def test_another_claim_arriving_live_is_a_duplicate_at_once(owner):
    owner.claim.on_connect()
    owner.claim.on_message("smartbin/t1/owner", claim("other", host="kitchen-pi"), False)
    assert [f.kind for f in owner.faults] == ["duplicate_bin_id"]
    assert "host kitchen-pi" in owner.faults[0].detail


def test_recalibrate_camera_reports_the_settled_exposure(bin_):
    reply = bin_.commands.handle("recalibrate_camera", b'{"id": 4}')
    assert reply == {"ok": True, "exposure_us": 8000, "analogue_gain": 1.5,
                     "colour_gains": [1.9, 1.4], "command": "recalibrate_camera", "id": 4}
    assert bin_.loop.calls == [("recalibrate_camera", None)]
    reply = bin_.commands.handle("recalibrate_camera", b'{"exposure": 1}')
    assert not reply["ok"] and "unexpected field(s) exposure" in reply["error"]
    bin_.loop.busy = True
    reply = bin_.commands.handle("recalibrate_camera", b"")
    assert not reply["ok"] and "flap empty" in reply["error"]


# ---------------------------------------------------------------------- pictures, contamination


class RecordingConn:
    """A connection that records publishes; a pause inside each lets threads interleave."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[tuple[str, str | bytes, bool]] = []
        self.pause_s = pause_s

    def publish(self, topic, payload, *, qos=0, retain=False):
        self.sent.append((topic, payload, retain))
        if self.pause_s:
            time.sleep(self.pause_s)
        return SimpleNamespace(rc=0, mid=len(self.sent))

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.sent]


def thumbnail(seq: int) -> Thumbnail:
    return Thumbnail(seq=seq, time=1700000000.0 + seq, jpeg=f"jpeg {seq}".encode(), width=4,
                     height=3, label="易拉罐", bin="recyclable")


def test_a_picture_and_its_meta_go_out_together_from_any_thread():
    from bin_controller.mqtt.pictures import Pictures

    conn = RecordingConn(pause_s=0.0002)
    newest: list[Thumbnail] = []
    pictures = Pictures(conn, "s/b", lambda: newest[-1] if newest else None)

    def writer():
        for seq in range(1, 101):
            newest.append(thumbnail(seq))
            pictures.on_photo(newest[-1])

    def reconnects():
        for _ in range(100):
            pictures.republish()

    threads = [threading.Thread(target=writer), threading.Thread(target=reconnects)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert conn.sent and len(conn.sent) % 2 == 0
    shown = []
    for (meta_topic, meta, meta_retained), (image_topic, jpeg, image_retained) in zip(
            conn.sent[::2], conn.sent[1::2], strict=True):
        assert (meta_topic, image_topic) == ("s/b/image/meta", "s/b/image")
        assert meta_retained and image_retained
        seq = json.loads(meta)["seq"]
        assert jpeg == f"jpeg {seq}".encode()
        shown.append(seq)
    assert shown == sorted(shown)  # a newer picture is never followed by an older one
    assert shown[-1] == 100


def test_pictures_wait_for_a_connection():
    from bin_controller.mqtt.pictures import Pictures

    conn = RecordingConn()
    conn.connected.clear()
    pictures = Pictures(conn, "s/b", lambda: thumbnail(3))
    pictures.on_photo(thumbnail(3))
    assert conn.sent == []  # dropped: the connect publishes the newest
    pictures.republish()
    assert conn.topics() == ["s/b/image/meta", "s/b/image"]
    assert Pictures(conn, "s/b", lambda: None).republish() is None and len(conn.sent) == 2


class FakeSiteLog:
    def __init__(self) -> None:
        self.version = 1
        self.value = {"total": {"reviewed": 0, "wrong": 0, "rate": None}, "items": 0}
        self.broken = False

    def contamination(self) -> dict:
        if self.broken:
            raise sqlite3.OperationalError("database is locked")
        return json.loads(json.dumps(self.value))

    def data_version(self) -> int:
        return self.version


class FakeStore:
    def snapshot(self):
        return {"recyclable": 1, "kitchen": 0, "hazardous": 0, "other": 0, "total": 1}

    def last_event(self):
        return None

    def outbox_size(self):
        return 0


def retained_state(sitelog):
    from bin_controller.mqtt.retained import RetainedState

    conn = RecordingConn()
    state = RetainedState(conn, FakeStore(), "s/b", status=dict, stats_interval_s=60,
                          reviewed=sitelog, photo_stats=lambda: {"photos_mb": 1.5})
    return conn, state


def counts_sent(conn: RecordingConn) -> list[dict]:
    return [json.loads(p) for t, p, _ in conn.sent if t == "s/b/counts"]


def test_counts_carry_the_contamination_and_follow_other_writers(caplog):
    from bin_controller.mqtt import retained

    sitelog = FakeSiteLog()
    conn, state = retained_state(sitelog)
    state.republish()
    assert counts_sent(conn)[-1] == {**FakeStore().snapshot(),
                                     "contamination": sitelog.value}
    state.poll_reviews()
    assert len(counts_sent(conn)) == 1  # nothing changed: nothing sent
    # Another process reviewed an item: the log's data_version moves.
    sitelog.value = {"total": {"reviewed": 1, "wrong": 1, "rate": 1.0}, "items": 1}
    sitelog.version = 2
    state.poll_reviews()
    assert counts_sent(conn)[-1]["contamination"] == sitelog.value
    assert conn.topics()[-1] == "s/b/counts"  # counts/<bin> did not change
    state.poll_reviews()
    assert len(counts_sent(conn)) == 2
    # An item was counted: its row reaches the site log a moment later, on another thread.
    state.on_event(sample_event(seq=2))
    sent = len(counts_sent(conn))
    sitelog.value = {**sitelog.value, "items": 2}
    state.poll_reviews()
    assert len(counts_sent(conn)) == sent + 1
    assert counts_sent(conn)[-1]["contamination"]["items"] == 2
    # The sorting thread's publish never reads the site log.
    sitelog.broken = True
    state.on_event(sample_event(seq=3))
    assert counts_sent(conn)[-1]["contamination"]["items"] == 2
    # A site log that cannot be read: the counts still go out, with the last value.
    with caplog.at_level(logging.WARNING, logger="bin_controller.mqtt.retained"):
        state.publish_counts(refresh=True)
    assert counts_sent(conn)[-1]["contamination"]["items"] == 2
    assert "database is locked" in caplog.text
    sitelog.broken = False
    stats = state.stats()
    assert stats["contamination"] == sitelog.value and stats["photos_mb"] == 1.5
    conn.connected.clear()
    sitelog.version = 3
    sent = len(conn.sent)
    state.poll_reviews()  # offline: the next connect publishes
    assert len(conn.sent) == sent
    assert retained.POLL_S <= 1.0


def test_without_a_site_log_counts_are_as_before():
    conn, state = retained_state(None)
    state.republish()
    state.poll_reviews()
    assert counts_sent(conn) == [FakeStore().snapshot()]
    assert "contamination" not in state.stats() and state.stats()["photos_mb"] == 1.5


# ---------------------------------------------------------------------- review commands


LABELS = [Label("可回收物_易拉罐", "can", "recyclable"), Label("厨余垃圾_果皮", "peel", "kitchen"),
          Label("其他垃圾_纸巾", "tissue", "other")]


@pytest.fixture
def review(tmp_path):
    from bin_controller.mqtt.review_commands import make_review_handlers
    from bin_controller.review import Reviews
    from bin_controller.sitelog import SiteLog

    sitelog = SiteLog(tmp_path)
    for seq, (label, bin_name) in enumerate([("可回收物_易拉罐", "recyclable"),
                                             ("厨余垃圾_果皮", "kitchen"),
                                             ("其他垃圾_纸巾", "other")], start=1):
        sitelog.add_item(sample_event(seq=seq, label=label, bin=bin_name,
                                      predicted_bin=bin_name))
    photo = tmp_path / "photos" / "00000002.jpg"
    photo.parent.mkdir()
    photo.write_bytes(b"\xff\xd8 the photo of #2")
    sitelog.set_photo(2, "00000002.jpg", photo.stat().st_size)
    published: list[tuple[str, bytes]] = []
    changed: list[int] = []

    photos = PhotoLog(config_from_dict({}).photos, photo.parent, sitelog)  # not started
    def publish(suffix, data):
        published.append((suffix, data))
        return f"s/b/{suffix}"

    handlers = make_review_handlers(Reviews(sitelog, photo.parent, lambda: LABELS), photos,
                                    publish, lambda: changed.append(1))
    yield SimpleNamespace(sitelog=sitelog, commands=Commands(handlers), published=published,
                          changed=changed)
    sitelog.close()


def reviews_of(sitelog) -> list[tuple]:
    return sitelog.db.execute("SELECT seq, verdict, label, bin, reached, source FROM reviews "
                              "ORDER BY seq").fetchall()


def test_review_commands_record_verdicts_and_republish_the_counts(review):
    c = review.commands
    reply = c.handle("label", b'{"seqs": [1, 3], "label": "peel", "id": 5}')
    assert reply == {"ok": True, "seqs": [1, 3], "label": "厨余垃圾_果皮", "bin": "kitchen",
                     "new_label": False, "wrong": 2, "command": "label", "id": 5}
    assert c.handle("accept", b'{"seq": 2}')["ok"]
    reply = c.handle("label", b'{"seq": 2, "label": "glass jar", "bin": "recyclable"}')
    assert reply["ok"] and reply["new_label"] and reply["wrong"] == 1
    assert review.changed == [1, 1, 1]
    assert reviews_of(review.sitelog) == [
        (1, "corrected", "厨余垃圾_果皮", "kitchen", "recyclable", "mqtt"),
        (2, "corrected", "glass jar", "recyclable", "kitchen", "mqtt"),
        (3, "corrected", "厨余垃圾_果皮", "kitchen", "other", "mqtt")]
    page = c.handle("review_list", b'{"limit": 2, "unreviewed": false}')
    assert [i["seq"] for i in page["items"]] == [3, 2] and page["next_before"] == 2
    assert page["items"][0]["review"]["label"] == "厨余垃圾_果皮"
    reply = c.handle("review_photo", b'{"seq": 2}')
    assert reply == {"ok": True, "seq": 2, "topic": "s/b/reply/review_photo/2",
                     "bytes": 18, "command": "review_photo"}
    assert review.published == [("reply/review_photo/2", b"\xff\xd8 the photo of #2")]
    reply = c.handle("review_photo", b'{"seq": 1}')
    assert not reply["ok"] and "item #1 has no photo" in reply["error"]


def test_a_refused_review_command_changes_nothing(review):
    c = review.commands
    assert c.handle("accept", b'{"seq": 1}')["ok"]
    before = reviews_of(review.sitelog)
    changed = len(review.changed)
    for name, payload in [("label", b'{"seqs": [2, 3, 4], "label": "peel"}'),
                          ("label", b'{"seqs": [2, 3], "label": "tissue", "bin": "kitchen"}'),
                          ("label", b'{"seqs": [2, "3"], "label": "peel"}'),
                          ("label", b'{"seq": 2, "label": "new thing"}'),
                          ("accept", b'{"seqs": [2, 3, 99]}'),
                          ("accept", b'{"seqs": [2], "seq": 3}'),
                          ("accept", b'{"seqs": [' + b"2," * 40_000 + b"3]}")]:
        reply = c.handle(name, payload)
        assert reply["ok"] is False and "\n" not in reply["error"], (name, payload[:60])
        assert reviews_of(review.sitelog) == before
    assert len(review.changed) == changed  # nothing to republish


# ---------------------------------------------------------------------- fill


@pytest.fixture
def fill_bin(tmp_path):
    from bin_controller.mqtt.fill_commands import make_fill_handlers

    cfg = config_from_dict({"fill": {"capacity_l": {
        "recyclable": 40.0, "kitchen": 2.0, "hazardous": 10.0, "other": 40.0},
        "estimate_margin_pct": 0.0}}).fill
    tracker = FillTracker(cfg, tmp_path)
    emptied: list[Emptied] = []
    tracker.on_emptied.append(emptied.append)
    for _ in range(4):
        tracker.added(sample_event(bin="kitchen"))
    return SimpleNamespace(tracker=tracker, emptied=emptied,
                           commands=Commands(make_fill_handlers(tracker)))


def test_the_emptied_command_resets_the_level_and_answers_what_it_was(fill_bin):
    reply = fill_bin.commands.handle("emptied", b'{"bin": "kitchen", "id": 3}')
    assert reply == {"ok": True, "bin": "kitchen", "pct_before": 60.0, "items": 4,
                     "command": "emptied", "id": 3}
    assert [(e.bin, e.pct_before, e.items, e.source) for e in fill_bin.emptied] == [
        ("kitchen", 60.0, 4, "command")]
    after = fill_bin.tracker.snapshot()["kitchen"]
    assert (after["pct"], after["items"], after["emptied_events"]) == (0.0, 0, 1)


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"bin": "garden"}', "bin 'garden' is not a compartment of this bin; bin must be one "
                           "of recyclable, kitchen, hazardous, other"),
    (b'{"bin": 2}', "bin must be the name of a compartment"),
    (b'{"bin": ["kitchen"]}', "bin must be the name of a compartment"),
    (b"{}", "missing field(s) bin"),
    (b"", "missing field(s) bin"),
    (b'{"bin": "kitchen", "pct": 0}', "unexpected field(s) pct; allowed: bin"),
    (b'["kitchen"]', "payload must be a JSON object"),
    (b'{"bin": "' + b"x" * 60_000 + b'"}', "bin 'xxxxxxxxxx"),
])
def test_a_bad_emptied_command_changes_nothing(fill_bin, payload, message):
    before = fill_bin.tracker.snapshot()
    reply = fill_bin.commands.handle("emptied", payload)
    assert reply["ok"] is False and reply["error"].startswith(message), reply
    assert "\n" not in reply["error"] and len(reply["error"]) < 200
    assert fill_bin.tracker.snapshot() == before and fill_bin.emptied == []


def test_fill_is_published_on_change_only_while_connected_and_on_every_connect(tmp_path):
    from bin_controller.mqtt.retained import RetainedState

    tracker = FillTracker(config_from_dict({}).fill, tmp_path)
    conn = RecordingConn()
    state = RetainedState(conn, FakeStore(), "s/b", status=dict, stats_interval_s=60,
                          fill=tracker.snapshot)
    tracker.on_change.append(state.on_fill)

    def fills() -> list[dict]:
        return [json.loads(p) for t, p, r in conn.sent if t == "s/b/fill" and r]

    tracker.added(sample_event(bin="other"))
    assert [f["other"]["items"] for f in fills()] == [1]
    conn.connected.clear()
    tracker.added(sample_event(bin="other"))
    assert len(fills()) == 1  # offline: the next connect publishes it
    conn.connected.set()
    state.republish()
    assert fills()[-1]["other"]["items"] == 2
    assert fills()[-1] == json.loads(fill_payload(tracker.snapshot()))
    # Without a tracker there is no fill topic at all.
    _, plain = retained_state(None)
    plain.republish()
    plain.on_fill()
    assert "s/b/fill" not in plain.conn.topics()


def test_fill_changes_from_many_threads_leave_the_newest_retained(tmp_path):
    from bin_controller.mqtt.retained import RetainedState

    tracker = FillTracker(config_from_dict({}).fill, tmp_path)
    conn = RecordingConn(pause_s=0.0002)
    state = RetainedState(conn, FakeStore(), "s/b", status=dict, stats_interval_s=60,
                          fill=tracker.snapshot)
    tracker.on_change.append(state.on_fill)

    def sorter(bin_name: str) -> None:
        for _ in range(50):
            tracker.added(sample_event(bin=bin_name))

    threads = [threading.Thread(target=sorter, args=(b,)) for b in BINS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [json.loads(p) for t, p, _ in conn.sent if t == "s/b/fill"]
    totals = [sum(entry["items"] for entry in f.values()) for f in sent]
    assert totals == sorted(totals) and totals[-1] == 200


# ---------------------------------------------------------------------- state


def test_the_state_carries_the_status_from_the_first_connect():
    """Every connect publishes the state with the status as it is then (not a bare
    {"state": "idle", "detail": ""}), and publish_state sends it again after a change."""
    from bin_controller.mqtt.retained import RetainedState

    status = {"paused": False, "model": "demo", "model_version": "1.0.0", "backend": "litert",
              "faults": {}, "last_fault": None}
    conn = RecordingConn()
    conn.connected.clear()
    state = RetainedState(conn, FakeStore(), "s/b", status=lambda: dict(status),
                          stats_interval_s=60)

    def states() -> list[dict]:
        return [json.loads(p) for t, p, r in conn.sent if t == "s/b/state" and r]

    state.publish_state()  # offline: nothing
    assert states() == []
    conn.connected.set()
    state.republish()
    assert states() == [{"state": "idle", "detail": "", **status}]
    # stats once on every connect too (not retained), so nobody waits stats_interval_s.
    assert [(t, r) for t, _, r in conn.sent if t == "s/b/stats"] == [("s/b/stats", False)]
    state.on_state(State.SORTING, "kitchen")
    status.update(model="demo2", model_version="2.0.0")  # a reload swapped the model in
    state.publish_state()
    assert states()[-2:] == [
        {"state": "sorting", "detail": "kitchen", **{**status, "model": "demo",
                                                   "model_version": "1.0.0"}},
        {"state": "sorting", "detail": "kitchen", **status}]
    conn.connected.clear()
    state.on_state(State.IDLE, "")
    status["faults"] = {"jam": 1}
    conn.connected.set()
    state.republish()
    assert states()[-1] == {"state": "idle", "detail": "", **status} and len(states()) == 4


def test_a_reload_tells_only_when_the_model_changed(tmp_path):
    loop, told = FakeLoop(), []

    def load_classifier(bundle):
        if Path(bundle).name == "broken":
            raise BundleError("no trained weights yet")
        return SimpleNamespace(bundle=SimpleNamespace(name=Path(bundle).name, version="2"))

    def fails():
        told.append("fail")
        raise RuntimeError("the broker is gone")

    models = tmp_path / "models"
    for name in ("broken", "other"):
        (models / name).mkdir(parents=True)
        (models / name / "manifest.json").write_text("{}")
    cfg = config_from_dict({"model": {"dir": str(models)}})
    commands = Commands(make_handlers(cfg, loop, FakeCounts(), load_classifier=load_classifier,
                                      on_model_changed=lambda: told.append(
                                          loop.classifier.bundle.name)))
    assert not commands.handle("reload_model", b'{"bundle": "broken"}')["ok"]
    assert told == []
    assert commands.handle("reload_model", b'{"bundle": "other"}')["ok"]
    assert told == ["other"]  # after the swap: the new model is the loop's
    loop.busy = True
    assert not commands.handle("reload_model", b'{"bundle": "other"}')["ok"]
    assert told == ["other"]
    # A failure to tell is logged; the reply still says the model is in.
    loop.busy = False
    commands = Commands(make_handlers(cfg, loop, FakeCounts(), load_classifier=load_classifier,
                                      on_model_changed=fails))
    reply = commands.handle("reload_model", b'{"bundle": "other"}')
    assert reply["ok"] and told == ["other", "fail"]
