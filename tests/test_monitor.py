"""`smartbin monitor` against messages of every shape: a retained message read by every
monitor started later must never crash one."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bin_controller.errors import SmartbinError
from bin_controller.tools.monitor import Fleet, run
from tests.broker import Broker
from tests.conftest import REPO


def message(topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    msg.retain = retain
    return msg


def feed(fleet: Fleet, topic: str, payload: bytes | str | object) -> None:
    if not isinstance(payload, bytes):
        payload = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    fleet.on_message(None, None, message(topic, payload))


def row(screen: str, bin_id: str) -> list[str]:
    return next(line.split() for line in screen.splitlines() if line.startswith(bin_id + " "))


GOOD_EVENT = {"seq": 4, "time": 1700000000.0, "label": "苹果", "label_en": "apple",
              "bin": "kitchen", "confidence": 0.9, "uncertain": False, "failed": False}


def test_well_formed_messages_are_shown():
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/availability", "online")
    feed(fleet, "smartbin/b1/counts", {"recyclable": 1, "kitchen": 2, "hazardous": 0,
                                       "other": 3, "total": 6})
    feed(fleet, "smartbin/b1/state", {"state": "idle", "detail": ""})
    feed(fleet, "smartbin/b1/event", GOOD_EVENT)
    feed(fleet, "smartbin/b1/event", GOOD_EVENT)  # a duplicate (at least once delivery)
    screen = fleet.render()
    assert row(screen, "b1") == ["b1", "online", "idle", "1", "2", "0", "3", "6"]
    items = [line for line in screen.splitlines() if "apple" in line]
    assert len(items) == 1 and "#4" in items[0] and "-> kitchen 90%" in items[0]


def contamination_row(screen: str, bin_id: str) -> list[str]:
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("contamination"))
    return next(line.split() for line in lines[start + 2:] if line.startswith(f"  {bin_id} "))


COUNTS = {"recyclable": 4, "kitchen": 2, "hazardous": 0, "other": 2, "total": 8}


def test_contamination_is_shown_with_the_counts():
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/counts", {**COUNTS, "contamination": {
        "recyclable": {"reviewed": 3, "wrong": 1, "rate": 0.3333},
        "kitchen": {"reviewed": 1, "wrong": 0, "rate": 0.0},
        "hazardous": {"reviewed": 0, "wrong": 0, "rate": None},
        "other": {"reviewed": 0, "wrong": 0, "rate": None},
        "total": {"reviewed": 4, "wrong": 1, "rate": 0.25}, "reviewed_fraction": 0.5,
        "items": 8}})
    feed(fleet, "smartbin/b2/counts", COUNTS)  # a bin without a site log
    screen = fleet.render()
    assert row(screen, "b1")[3:] == ["4", "2", "0", "2", "8"]
    assert contamination_row(screen, "b1") == ["b1", "25.0%", "50.0%", "1", "0", "0", "0"]
    assert not [line for line in screen.splitlines() if line.startswith("  b2 ")]
    feed(fleet, "smartbin/b1/counts", {**COUNTS, "contamination": {
        "total": {"reviewed": 0, "wrong": 0, "rate": None}, "reviewed_fraction": 0.0}})
    assert contamination_row(fleet.render(), "b1")[1:3] == ["-", "0.0%"]


@pytest.mark.parametrize("contamination", [
    {"total": {"rate": "high"}, "reviewed_fraction": 7, "recyclable": {"wrong": [1]},
     "kitchen": {"wrong": -3}, "hazardous": "x", "other": {"wrong": 10**40}},
    {"total": [0.5], "reviewed_fraction": {"a": 1}, "kitchen": None},
    {"total": {"rate": -0.1}, "reviewed_fraction": 1.5},
    [1, 2, 3],
    "dirty",
    7,
    {"total": {"rate": True}, "reviewed_fraction": False},
])
def test_a_malformed_contamination_is_shown_as_unknown(contamination):
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/counts", {**COUNTS, "contamination": contamination})
    screen = fleet.render()
    assert row(screen, "b1")[3:] == ["4", "2", "0", "2", "8"]  # the counts still read
    assert contamination_row(screen, "b1") == ["b1"] + ["?"] * 6


def test_a_contamination_that_is_not_json_does_not_crash_the_monitor():
    fleet = Fleet("smartbin")
    for raw in (b'{"total": 1, "contamination": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                b'{"total": 1, "contamination": {"total": {"rate": ' + b"9" * 5000 + b"}}}",
                b'{"total": 1, "contamination": {"total": {"rate": NaN}}}',
                b'{"total": 1, "contamination": {"total": {"rate": 1e999}}}'):
        feed(fleet, "smartbin/b1/counts", raw)
        assert isinstance(fleet.render(), str)
    feed(fleet, "smartbin/b1/counts", {**COUNTS, "contamination": {"total": {"rate": 0.5}}})
    assert contamination_row(fleet.render(), "b1")[1] == "50.0%"


def fill_lines(screen: str, bin_id: str) -> dict[str, str]:
    """Compartment -> the rest of its fill line."""
    lines = screen.splitlines()
    start = lines.index("fill")
    out = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        words = line.split(maxsplit=2)
        if words[0] == bin_id:
            out[words[1]] = words[2]
    return out


FILL = {"recyclable": {"pct": 12.0, "state": "ok", "source": "estimate", "sensor_fault": False,
                       "items": 3, "capacity_l": 40.0, "full_in_s": None},
        "kitchen": {"pct": 72.4, "state": "warn", "source": "sensor", "sensor_fault": False,
                    "items": 20, "capacity_l": 20.0, "full_in_s": 4800},
        "hazardous": {"pct": 100.0, "state": "full", "source": "estimate",
                      "sensor_fault": True, "items": 40, "capacity_l": 10.0,
                      "full_in_s": None},
        "other": {"pct": 0.0, "state": "ok", "source": "sensor", "sensor_fault": False,
                  "items": 0, "capacity_l": 40.0, "full_in_s": 200000}}


def test_fill_bars_per_compartment():
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/counts", COUNTS)
    assert "fill" not in fleet.render().splitlines()  # a bin that sends no fill
    feed(fleet, "smartbin/b1/fill", FILL)
    assert fill_lines(fleet.render(), "b1") == {
        "recyclable": "[#         ]  12 % ok",
        "kitchen": "[#######   ]  72 % warn, full in 1 h 20 m",
        "hazardous": "[##########] 100 % full, sensor fault",
        "other": "[          ]   0 % ok, full in 2 d 7 h"}
    assert row(fleet.render(), "b1")[3:] == ["4", "2", "0", "2", "8"]


@pytest.mark.parametrize("payload", [
    {"kitchen": {"pct": "72", "state": "brimming", "sensor_fault": "yes", "full_in_s": -5}},
    {"kitchen": {"pct": 250.0, "state": ["full"], "full_in_s": 10**40}},
    {"kitchen": {"pct": True, "state": None, "full_in_s": "soon"}},
    {"kitchen": {"pct": -1, "state": "\x1b[2Jfull"}},
    {"kitchen": [72, "warn"]},
    {"kitchen": None},
    {},
    [1, 2],
    "full",
    b'{"kitchen": {"pct": NaN}}',
    b'{"kitchen": {"pct": 1e999}}',
    b'{"kitchen": {"pct": ' + b"9" * 5000 + b"}}",
    b"[" * 50_000 + b"]" * 50_000,
    b"\xff\xfe",
])
def test_a_malformed_fill_is_shown_as_unknown(payload):
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/fill", payload)
    lines = fill_lines(fleet.render(), "b1")
    assert lines["kitchen"] == "[          ]   ? % ?"
    assert "\x1b" not in fleet.render()
    feed(fleet, "smartbin/b1/fill", FILL)  # the next good one is shown again
    assert fill_lines(fleet.render(), "b1")["kitchen"].startswith("[#######   ]  72 % warn")


ALL_UNKNOWN_COUNTS = ["?"] * 5


@pytest.mark.parametrize(("topic", "payload", "shown"), [
    ("smartbin/b1/counts", {"recyclable": [1], "kitchen": "2", "hazardous": 10**30,
                            "other": True, "total": {"n": 1}}, ALL_UNKNOWN_COUNTS),
    ("smartbin/b1/counts", [1, 2, 3], ALL_UNKNOWN_COUNTS),
    ("smartbin/b1/counts", b"[" * 100_000 + b"]" * 100_000, ALL_UNKNOWN_COUNTS),
    ("smartbin/b1/counts", b"[" * 1000 + b"]" * 1000, ALL_UNKNOWN_COUNTS),
    ("smartbin/b1/counts", b'{"total": ' + b"9" * 5000 + b"}", ALL_UNKNOWN_COUNTS),
    ("smartbin/b1/counts", b'{"total": 1e999, "other": NaN}', ALL_UNKNOWN_COUNTS),
    ("smartbin/b1/state", {"state": ["sorting"]}, ["?"]),
    ("smartbin/b1/state", b"\xff\xfe\x00", ["?"]),
    ("smartbin/b1/availability", b"\xff\xfe", ["?"]),
    ("smartbin/b1/availability", "x" * 100_000, ["?"]),
])
def test_retained_values_of_the_wrong_shape_are_shown_as_unknown(topic, payload, shown):
    fleet = Fleet("smartbin")
    feed(fleet, topic, payload)
    cols = row(fleet.render(), "b1")
    where = {"counts": slice(3, 8), "state": slice(2, 3), "availability": slice(1, 2)}
    assert cols[where[topic.rsplit("/", 1)[1]]] == shown


@pytest.mark.parametrize("payload", [
    {"seq": "4", "time": "yesterday", "label_en": ["apple"], "bin": {"x": 1},
     "confidence": 10**30, "uncertain": "yes"},
    {"seq": 5, "time": 1e300, "confidence": -1, "bin": 3},
    {"seq": 6, "time": float("nan"), "bin_confidence": [0.5]},
    {"seq": 10**50, "time": -5},
    b'{"seq": 7, "time": 1e999}',
    b'{"seq": 8, "confidence": NaN}',
    b'{"seq": ' + b"1" * 5000 + b"}",
    b"[" * 20_000,
    "null",
    b"\xc3\x28",
])
def test_events_of_the_wrong_shape_are_skipped_or_shown_with_question_marks(payload):
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/event", payload)
    feed(fleet, "smartbin/b1/event", GOOD_EVENT)
    lines = fleet.render().splitlines()
    items = lines[lines.index("recent items") + 1:]
    assert any("apple" in line for line in items)  # the good one after it is still shown
    for line in items:
        if "apple" not in line:
            assert "??:??:??" in line and "-> ?" in line and "%" not in line, line


def test_wrong_counts_become_question_marks_not_values():
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/counts", {"recyclable": [1], "kitchen": "2", "hazardous": 10**30,
                                       "other": 5, "total": -1})
    assert row(fleet.render(), "b1")[3:] == ["?", "?", "?", "5", "?"]


def test_a_wrong_event_still_lists_what_can_be_read():
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/b1/event", {"seq": 9, "time": "noon", "label_en": "can",
                                      "bin": "recyclable", "confidence": 7})
    line = next(line for line in fleet.render().splitlines() if "#9" in line)
    assert line.split()[:2] == ["??:??:??", "b1"] and "can" in line and "-> recyclable" in line
    assert "%" not in line  # a confidence of 7 is not shown as 700%


def test_escape_sequences_never_reach_the_terminal():
    fleet = Fleet("smartbin")
    feed(fleet, "smartbin/evil\x1b[2J/state", {"state": "\x1b]0;owned\x07idle"})
    feed(fleet, "smartbin/evil\x1b[2J/event", {"seq": 1, "label_en": "\x1b[31mred",
                                               "bin": "other\r"})
    screen = fleet.render()
    assert "\x1b" not in screen and "\x07" not in screen and "\r" not in screen
    assert "evil?[2J" in screen


def test_the_fleet_stays_bounded():
    from bin_controller.tools import monitor

    fleet = Fleet("smartbin")
    for n in range(monitor.MAX_BINS + 50):
        feed(fleet, f"smartbin/b{n}/availability", "online")
    assert len(fleet.bins) == monitor.MAX_BINS


topics = st.builds(lambda bin_id, rest: f"smartbin/{bin_id}/{rest}",
                   st.text(max_size=8).filter(lambda s: "/" not in s),
                   st.sampled_from(["availability", "counts", "state", "event", "stats",
                                    "last", "counts/kitchen", "fault", "fill", "emptied",
                                    "x/y"]) | st.text(
                                        max_size=10)) | st.text(max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["seq", "time", "label", "label_en", "error", "bin", "confidence",
                         "bin_confidence", "uncertain", "failed", "state", "total",
                         "kitchen", "other", "contamination", "rate", "wrong",
                         "reviewed_fraction", "recyclable", "hazardous", "pct",
                         "full_in_s", "sensor_fault"]) | st.text(max_size=5), kids,
        max_size=5),
    max_leaves=12)
payloads = (st.binary(max_size=200)
            | json_values.map(lambda v: json.dumps(v).encode())
            | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
            | st.integers(4000, 6000).map(lambda n: b'{"total": ' + b"7" * n + b"}")
            | st.sampled_from([b"NaN", b"-Infinity", b"1e999", b'{"time": 1e308}']))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(topics, payloads), max_size=8))
def test_no_message_crashes_the_monitor(messages):
    fleet = Fleet("smartbin")
    for topic, payload in messages:
        fleet.on_message(None, None, message(topic, payload))
        assert isinstance(fleet.render(), str)


def test_bad_options_are_one_line_errors():
    def args(**over):
        return argparse.Namespace(**{"host": "localhost", "port": 1883, "bin_id": "+",
                                     "prefix": "smartbin", "seconds": 1, **over})

    for over, message_ in [({"host": ":1883"}, "--host ':1883': the host is empty"),
                           ({"host": "h:abc"}, "the port must be a number"),
                           ({"bin_id": "a/b"}, "--bin-id 'a/b': must be one MQTT topic level"),
                           ({"bin_id": "#"}, "--bin-id '#'"),
                           ({"prefix": ""}, "--prefix '': must be one MQTT topic level"),
                           ({"port": 70000}, "cannot reach the broker at localhost:70000")]:
        with pytest.raises(SmartbinError, match=message_.replace("(", r"\(")):
            run(args(**over))


def test_a_bad_retained_message_does_not_stop_later_monitors(tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    try:
        pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for topic, payload in [
                ("smartbin/bad/counts", b'{"kitchen": [1, 2], "total": "many"}'),
                ("smartbin/bad/state", b"[" * 20_000 + b"]" * 20_000),
                ("smartbin/bad/availability", b"\xff\xfe"),
                ("smartbin/bad/event", b'{"seq": 1, "time": "noon", "confidence": 1e400}'),
                ("smartbin/bad/fill", b'{"kitchen": {"pct": "lots", "state": 7}, '
                                      b'"other": {"pct": 1e400}}'),
                ("smartbin/good/counts", b'{"recyclable": 1, "kitchen": 0, "hazardous": 0, '
                                         b'"other": 0, "total": 1}')]:
            pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        for _ in range(2):  # the first monitor, and the next one that reads the same
            r = subprocess.run([sys.executable, "-m", "bin_controller", "monitor", "--host",
                                f"127.0.0.1:{broker.port}", "--seconds", "2"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
            assert row(r.stdout, "bad")[1:4] == ["?", "?", "?"]
            assert fill_lines(r.stdout, "bad")["kitchen"] == "[          ]   ? % ?"
            assert row(r.stdout, "good")[-1] == "1"
    finally:
        broker.stop()
