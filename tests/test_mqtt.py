"""Telemetry and commands against a real mosquitto on a free loopback port."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.vision.bundle import load_bundle
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import GeneratedSource
from tests.broker import Listener, request

DEMO_VERSION = load_bundle("demo").version  # the shipped demo bundle's version


def mqtt_cfg(port: int, bin_id: str = "t1", **extra):
    return config_from_dict({"bin": {"id": bin_id},
                             "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port,
                                      "stats_interval_s": 1.0, **extra}})


def run_bin(cfg, demo, tmp_path, n, *, on_item=None, seed=0, drain_s=30):
    """The bin as the composition root builds it (store and telemetry from the config)."""
    cfg = sim_config(cfg.with_overrides({"bin": {"state_dir": str(tmp_path / "state")}}),
                     fast=True)
    with Simulation(cfg, classifier=demo) as simulation:
        result = simulation.drop(GeneratedSource(seed).items(n), on_item=on_item)
        telemetry, store = simulation.bin.telemetry, simulation.bin.store
        drained = telemetry.drain(drain_s)
        counts = store.snapshot()
    return result, drained, counts


def event_seqs(listener, base="smartbin/t1"):
    return sorted({json.loads(p)["seq"] for p in listener.payloads(f"{base}/event")})


def test_counts_events_state_and_stats_arrive(broker, demo, tmp_path):
    listener = Listener(broker.port)
    _result, drained, counts = run_bin(mqtt_cfg(broker.port), demo, tmp_path, 10)
    assert drained
    assert listener.wait_for(lambda li: len(event_seqs(li)) == 10)
    assert event_seqs(listener) == list(range(1, 11))
    # Stopped cleanly: the goodbye is the last retained message; everything before it is in.
    assert listener.wait_for(
        lambda li: li.retained.get("smartbin/t1/availability") == b"offline")
    events = [json.loads(p) for p in listener.payloads("smartbin/t1/event")]
    assert {e["bin"] for e in events} <= set(BINS) and all(e["label"] for e in events)
    retained = json.loads(listener.retained["smartbin/t1/counts"])
    assert retained["total"] == 10 == sum(retained[b] for b in BINS)
    assert {k: retained[k] for k in counts} == counts
    # With the site log: what reviewers found (nothing yet), among every item logged.
    assert retained["contamination"]["total"] == {"reviewed": 0, "wrong": 0, "rate": None}
    assert retained["contamination"]["items"] == 10
    for b in BINS:
        assert int(listener.retained[f"smartbin/t1/counts/{b}"]) == counts[b]
    assert json.loads(listener.retained["smartbin/t1/state"])["state"] == "idle"
    listener.close()


def test_broker_outage_mid_run_loses_nothing(broker, demo, tmp_path):
    listener = Listener(broker.port)
    outage = {}

    def on_item(item):
        if item.id == 5:
            broker.stop()  # the network goes away for a while
        if item.id == 15:
            outage["queued"] = store_size(tmp_path)
            broker.start()

    _result, drained, _counts = run_bin(mqtt_cfg(broker.port), demo, tmp_path, 25,
                                      on_item=on_item)
    assert outage["queued"] >= 9  # events waited in the outbox
    assert drained
    assert listener.wait_for(lambda li: len(event_seqs(li)) == 25, timeout=30), \
        event_seqs(listener)
    assert event_seqs(listener) == list(range(1, 26))  # no gap, whatever the order
    assert listener.wait_for(
        lambda li: json.loads(li.retained.get("smartbin/t1/counts", b"{}")).get("total") == 25), \
        listener.payloads("smartbin/t1/counts")
    listener.close()


def store_size(tmp_path) -> int:
    import sqlite3

    db = sqlite3.connect(tmp_path / "state" / "smartbin.db")
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        db.close()


def test_outbox_survives_a_restart_without_broker(broker, demo, tmp_path):
    """Events sorted while the broker is away are delivered by the next run."""
    broker.stop()
    cfg = mqtt_cfg(broker.port)
    _, drained, counts = run_bin(cfg, demo, tmp_path, 4, drain_s=1)
    assert not drained and counts["total"] == 4
    broker.start()
    listener = Listener(broker.port)
    _, drained, counts = run_bin(mqtt_cfg(broker.port), demo, tmp_path, 3, seed=1)
    assert drained and counts["total"] == 7
    assert listener.wait_for(lambda li: len(event_seqs(li)) == 7)
    assert event_seqs(listener) == list(range(1, 8))
    listener.close()


def test_discovery_payloads(broker, demo, tmp_path):
    listener = Listener(broker.port, topic="homeassistant/#", client_id="ha")
    run_bin(mqtt_cfg(broker.port), demo, tmp_path, 1)
    # 11 entities, and per compartment its fill, a problem while full and an Emptied button.
    assert listener.wait_for(lambda li: len(li.retained) >= 11 + 3 * len(BINS))
    configs = {t: json.loads(p) for t, p in listener.retained.items() if t.endswith("/config")}
    for b in BINS:
        conf = configs[f"homeassistant/sensor/smartbin_t1/count_{b}/config"]
        assert conf["state_class"] == "total_increasing"
        assert conf["state_topic"] == f"smartbin/t1/counts/{b}"
    for conf in configs.values():
        assert {"name", "unique_id", "device"} <= set(conf)
        assert {"state_topic", "image_topic", "command_topic"} & set(conf)
        assert conf["device"]["identifiers"] == ["smartbin_t1"]
    names = {c["name"] for c in configs.values()}
    assert {"Items sorted", "Last item", "Last bin", "State", "Online", "Contamination",
            "Last item picture", "Kitchen fill", "Kitchen full", "Emptied kitchen"} <= names
    button = configs["homeassistant/button/smartbin_t1/emptied_kitchen/config"]
    assert button["command_topic"] == "smartbin/t1/cmd/emptied"
    image = configs["homeassistant/image/smartbin_t1/last_image/config"]
    assert image["image_topic"] == "smartbin/t1/image"
    assert all("availability_topic" in c for t, c in configs.items() if "/sensor/" in t)
    listener.close()


def test_discovery_is_republished_when_home_assistant_restarts(running_bin):
    import paho.mqtt.client as mqtt

    listener = Listener(running_bin.port, topic="homeassistant/sensor/#", client_id="ha2")
    assert listener.wait_for(lambda li: len(li.messages) >= 8)  # the retained configs
    before = len(listener.messages)
    ha = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    ha.connect("127.0.0.1", running_bin.port)
    ha.loop_start()
    ha.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
    assert listener.wait_for(lambda li: len(li.messages) >= before + 8)
    ha.loop_stop()
    ha.disconnect()
    listener.close()


class _Bin:
    """A running simulated bin with telemetry, for command tests."""

    def __init__(self, port, demo, tmp_path):
        # model.dir too: the default was made from the state_dir before this override.
        self.cfg = sim_config(mqtt_cfg(port).with_overrides(
            {"bin": {"state_dir": str(tmp_path / "state")},
             "model": {"dir": str(tmp_path / "state" / "models")}}), fast=True)
        self.simulation = Simulation(self.cfg, classifier=demo).__enter__()
        smartbin = self.simulation.bin
        self.loop, self.store, self.telemetry = smartbin.loop, smartbin.store, smartbin.telemetry
        assert self.telemetry.subscribed.wait(10)  # commands sent now are received
        self.port = port
        self.tmp_path = tmp_path

    def cmd(self, name, payload):
        raw = request(self.port, f"smartbin/t1/cmd/{name}", payload,
                      f"smartbin/t1/reply/{name}")
        assert raw is not None, f"no reply to {name}"
        return json.loads(raw)

    def close(self):
        self.simulation.__exit__(None, None, None)


@pytest.fixture
def running_bin(broker, demo, tmp_path):
    b = _Bin(broker.port, demo, tmp_path)
    yield b
    b.close()


def test_commands(running_bin):
    b = running_bin
    assert b.cmd("pause", "{}") == {"ok": True, "paused": True, "command": "pause"}
    assert b.loop.status()["paused"]
    assert b.cmd("resume", "")["ok"]
    r = b.cmd("sort_next", '{"bin": "hazardous", "id": 7}')
    assert r == {"ok": True, "bin": "hazardous", "command": "sort_next", "id": 7}
    assert b.cmd("calibrate", '{"angle": 30}')["angle"] == 30.0
    assert b.cmd("calibrate", '{"bin": "other"}')["angle"] == 60.0
    r = b.cmd("reset_counts", "{}")
    assert not r["ok"] and "missing field(s) confirm" in r["error"]
    r = b.cmd("reset_counts", '{"confirm": "reset_counts"}')
    assert r["ok"]
    r = b.cmd("reload_model", '{"bundle": "garbage120"}')
    assert not r["ok"] and "no trained weights" in r["error"]
    assert b.loop.classifier.bundle.name == "demo"  # the old model stays
    r = b.cmd("reload_model", '{"bundle": "demo"}')
    assert r["ok"] and r["model"] == "demo"
    r = b.cmd("explode", '{}')
    assert not r["ok"] and "unknown command 'explode'" in r["error"]
    r = b.cmd("pause", "{not json")
    assert not r["ok"] and "not JSON" in r["error"] and not b.loop.status()["paused"]
    r = b.cmd("sort_next", '["other"]')
    assert not r["ok"] and "JSON object" in r["error"] and b.loop._next_bin == "hazardous"


COMMANDS = ["pause", "resume", "reset_counts", "sort_next", "calibrate", "reload_model",
            "explode", "PAUSE", "", "reset"]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                           | st.text(max_size=10),
                           lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                           max_leaves=8)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(COMMANDS[:6]) | st.text(min_size=1, max_size=12).filter(
           lambda s: "/" not in s and "+" not in s and "#" not in s and "\x00" not in s),
       payload=st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()))
def test_malformed_and_unknown_commands_change_nothing(running_bin, name, payload):
    """Anything but a well-formed command gets an error reply and changes nothing."""
    b = running_bin
    before = (b.store.snapshot(), b.loop.status()["paused"], b.loop._next_bin,
              b.loop.classifier.bundle.name)
    reply = b.telemetry.handle_command(name, payload)
    valid = _is_valid(name, payload)
    if not valid:
        assert reply["ok"] is False and reply["error"], (name, payload, reply)
        after = (b.store.snapshot(), b.loop.status()["paused"], b.loop._next_bin,
                 b.loop.classifier.bundle.name)
        assert after == before
    else:
        b.loop.resume()
        b.loop._next_bin = None


def _is_valid(name: str, payload: bytes) -> bool:
    """The narrow set of commands that are allowed to succeed."""
    try:
        args = json.loads(payload.decode()) if payload.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return False
    if not isinstance(args, dict):
        return False
    args.pop("id", None)
    if name in ("pause", "resume"):
        return args == {}
    if name == "sort_next":
        return set(args) == {"bin"} and args["bin"] in BINS
    if name == "calibrate":
        if set(args) == {"bin"}:
            return args["bin"] in BINS
        angle = args.get("angle")
        return set(args) == {"angle"} and isinstance(angle, int | float) \
            and not isinstance(angle, bool) and -90 <= angle <= 90
    if name == "reload_model":
        return args == {} or args == {"bundle": "demo"}
    return False  # the rest change things only with exact, unlikely payloads


def test_bad_bin_id_for_topics():
    from bin_controller.errors import SmartbinError
    from bin_controller.mqtt.telemetry import Telemetry

    with pytest.raises(SmartbinError, match="single MQTT topic level"):
        Telemetry(mqtt_cfg(1).mqtt, bin_id="a/b", store=None)


def test_monitor_shows_the_fleet(broker, demo, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    run_bin(mqtt_cfg(broker.port, bin_id="t1"), demo, tmp_path / "a", 3)
    run_bin(mqtt_cfg(broker.port, bin_id="t2"), demo, tmp_path / "b", 2, seed=4)
    r = subprocess.run([sys.executable, "-m", "bin_controller", "monitor", "--host",
                        f"127.0.0.1:{broker.port}", "--seconds", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()
            if line.startswith(("t1 ", "t2 "))}
    assert rows["t1"][1] == "offline" and rows["t1"][-1] == "3"
    assert rows["t2"][-1] == "2"
    r = subprocess.run([sys.executable, "-m", "bin_controller", "monitor", "--host",
                        "127.0.0.1:9", "--seconds", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the broker" in r.stderr


def test_stats_are_published_periodically(running_bin):
    listener = Listener(running_bin.port, topic="smartbin/t1/stats", client_id="stats")
    assert listener.wait_for(lambda li: len(li.messages) >= 2, timeout=10)
    stats = json.loads(listener.messages[-1][1])
    assert {"uptime_s", "cycle_ms_p50", "cycle_ms_p95", "items_per_hour", "model",
            "backend", "outbox"} <= set(stats)
    assert stats["model"] == "demo" and stats["backend"] == "litert"
    listener.close()


# ---------------------------------------------------------------------- hardening


def burst(n: int) -> list[tuple[str, bytes]]:
    """A mix of slow, quick and malformed commands, each with its own id."""
    kinds = [("reload_model", {"bundle": "demo"}), ("calibrate", {"bin": "other"}),
             ("sort_next", {"bin": "kitchen"}), ("reset_counts", {"confirm": "no"}),
             ("explode", {}), ("reload_model", {"bundle": "../etc"}),
             ("calibrate", {"angle": "x"})]
    out = []
    for i in range(n):
        name, args = kinds[i % len(kinds)]
        out.append((name, json.dumps({**args, "id": i}).encode()))
    out[5] = ("sort_next", b"[" * 30_000 + b"]" * 30_000)
    out[6] = ("calibrate", b'{"angle": ' + b"9" * 5000 + b"}")
    return out


def test_a_pause_after_a_burst_of_1000_commands_is_answered_ahead_of_them(running_bin):
    import paho.mqtt.client as mqtt

    b = running_bin
    b.loop.flap.cfg = dataclasses.replace(b.loop.flap.cfg, move_s=0.05)  # a real servo's pace
    replies = Listener(b.port, topic="smartbin/t1/reply/#", client_id="replies")
    assert replies.wait_for(lambda li: li.client.is_connected(), timeout=10)
    sender = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    sender.max_inflight_messages_set(100)
    sender.connect("127.0.0.1", b.port)
    sender.loop_start()
    try:
        commands = burst(1000)
        infos = [sender.publish(f"smartbin/t1/cmd/{name}", payload, qos=1)
                 for name, payload in commands]
        pause = sender.publish("smartbin/t1/cmd/pause", '{"id": "p"}', qos=1)
        for info in [*infos, pause]:
            info.wait_for_publish(30)

        def pause_reply(li):
            return [i for i, (_, p, _) in enumerate(li.messages) if b'"id": "p"' in p]

        assert replies.wait_for(pause_reply, timeout=10), "no reply to the pause"
        assert b.loop.status()["paused"]
        # Every command is answered in the end, refused or run: exactly once each.
        assert replies.wait_for(lambda li: len(li.messages) >= 1001, timeout=120), \
            len(replies.messages)
        got = [json.loads(p) for _, p, _ in replies.messages]
        assert sorted(str(r.get("id")) for r in got) == sorted(
            [str(i) for i in range(1000) if i not in (5, 6)] + ["None", "None", "p"])
        refused = [r for r in got if "queue full" in r.get("error", "")]
        ran = [i for i, r in enumerate(got) if r["command"] in ("reload_model", "calibrate")
               and "queue full" not in r.get("error", "")]
        assert refused and ran
        assert pause_reply(replies)[0] < ran[-1]  # the pause went ahead of slow work
        assert {r["error"] for r in got if r.get("id") in (None,)} == {
            "payload nests JSON more than 32 levels deep (the limit)",
            "payload has a number of 5000 characters; the limit is 100"}
        # The command thread is alive and well.
        assert b.cmd("resume", '{"id": "r"}') == {"ok": True, "paused": False,
                                                  "command": "resume", "id": "r"}
        assert b.cmd("sort_next", '{"bin": "other"}')["ok"]
    finally:
        sender.loop_stop()
        sender.disconnect()
        replies.close()


def test_reload_model_loads_bundles_by_name_only(running_bin, tmp_path):
    b = running_bin
    outside = tmp_path / "elsewhere" / "demo2"
    outside.parent.mkdir()
    import shutil

    from bin_controller.vision.bundle import SHIPPED_MODELS

    shutil.copytree(SHIPPED_MODELS / "demo", outside)
    for ref in (str(outside), "../elsewhere/demo2", "x" * 300, ".demo", "demo\\x"):
        r = b.cmd("reload_model", json.dumps({"bundle": ref}))
        assert not r["ok"] and ("not a bundle name" in r["error"]
                                or "the limit is 100" in r["error"]), r
    assert b.loop.classifier.bundle.name == "demo"
    assert b.cmd("reload_model", '{"bundle": "demo"}')["ok"]


def two_telemetries(port, tmp_path, bin_id="dup"):
    from bin_controller.mqtt.telemetry import Telemetry
    from bin_controller.store import Store

    out = []
    for name in ("a", "b"):
        store = Store(tmp_path / name)
        t = Telemetry(mqtt_cfg(port, bin_id=bin_id, discovery=False).mqtt, bin_id=bin_id,
                      store=store)
        out.append((t, store))
    return out


def test_two_services_with_one_bin_id_report_a_fault(broker, tmp_path, caplog):
    import logging

    faults = Listener(broker.port, topic="smartbin/dup/fault", client_id="faults")
    pair = two_telemetries(broker.port, tmp_path)
    with caplog.at_level(logging.WARNING):
        for t, _ in pair:
            t.start()
        try:
            assert faults.wait_for(lambda li: li.messages, timeout=30), \
                "no duplicate_bin_id fault"
        finally:
            for t, store in pair:
                t.stop()
                store.close()
    fault = json.loads(faults.messages[0][1])
    assert fault["kind"] == "duplicate_bin_id"
    assert "bin.id 'dup'" in fault["detail"] and "give each bin its own bin.id" in \
        fault["detail"]
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("duplicate_bin_id" in m and "'dup'" in m for m in logged), logged
    faults.close()


def test_a_restarted_service_is_not_its_own_duplicate(broker, tmp_path, caplog):
    """The claim a previous run left (retained) is seen once: no fault, even after a
    reconnect within the minute."""
    import logging
    import time

    from bin_controller.mqtt.telemetry import Telemetry
    from bin_controller.store import Store

    faults = Listener(broker.port, topic="smartbin/solo/fault", client_id="faults")
    owner = Listener(broker.port, topic="smartbin/solo/owner", client_id="owner")
    store = Store(tmp_path / "s")
    cfg = mqtt_cfg(broker.port, bin_id="solo", discovery=False).mqtt
    first = Telemetry(cfg, bin_id="solo", store=store)
    first.start()
    assert owner.wait_for(lambda li: li.messages)
    first.stop()
    with caplog.at_level(logging.WARNING):
        second = Telemetry(cfg, bin_id="solo", store=store)
        second.start()
        try:
            assert second.connected.wait(10)
            assert owner.wait_for(lambda li: len(li.messages) >= 2)
            broker.stop()
            broker.start()  # the retained claim (now the second run's) survives
            assert owner.wait_for(lambda li: len(li.messages) >= 3, timeout=30)
            time.sleep(1)  # the claim read back after the reconnect is handled
        finally:
            second.stop()
            store.close()
    tokens = [json.loads(p)["token"] for _, p, _ in owner.messages]
    assert tokens[0] != tokens[1] == tokens[-1]
    assert faults.messages == []
    assert not [r for r in caplog.records if "duplicate_bin_id" in r.getMessage()]
    faults.close()
    owner.close()


def test_an_unreachable_broker_is_logged_once_and_its_return_too(broker, tmp_path, caplog):
    import logging
    import time

    from bin_controller.mqtt.telemetry import Telemetry
    from bin_controller.store import Store

    broker.stop()
    store = Store(tmp_path / "s")
    t = Telemetry(mqtt_cfg(broker.port, discovery=False).mqtt, bin_id="t1", store=store)
    with caplog.at_level(logging.DEBUG, logger="bin_controller"):
        t.start()
        try:
            time.sleep(4)  # a few retries
            broker.start()
            assert t.connected.wait(60)
        finally:
            t.stop()
            store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("bin_controller.mqtt")]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"MQTT broker 127.0.0.1:{broker.port} unreachable "
                                  "(Connection refused)")
    assert warnings[1].startswith(f"MQTT connected to 127.0.0.1:{broker.port} after ")
    retries = [r for r in caplog.records if "still unreachable" in r.getMessage()]
    assert retries and all(r.levelno == logging.DEBUG for r in retries)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--mqtt", ":1883"], "--mqtt ':1883': the host is empty"),
    (["simulate", "--items", "1", "--mqtt", "localhost:abc"],
     "--mqtt 'localhost:abc': the port must be a number from 1 to 65535"),
    (["monitor", "--host", "[::1", "--seconds", "1"], "--host '[::1': unclosed or misplaced"),
    (["monitor", "--bin-id", "a/b", "--seconds", "1"], "--bin-id 'a/b': must be one MQTT"),
])
def test_broker_address_mistakes_are_one_line(args, message, tmp_path):
    from tests.test_cli import smartbin

    r = smartbin(*args, "--state-dir", str(tmp_path)) if args[0] == "simulate" \
        else smartbin(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"smartbin: error: {message}") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_fault_during_an_outage_arrives_afterwards(broker, tmp_path):
    """Faults go through the outbox: one raised while the broker is away (a jam at night,
    just before a crash) still reaches the dashboard."""
    import time

    from bin_controller.domain import Fault
    from bin_controller.mqtt.telemetry import Telemetry
    from bin_controller.payloads import event_message
    from bin_controller.store import Store

    store = Store(tmp_path / "state", message=event_message)
    telemetry = Telemetry(mqtt_cfg(broker.port, bin_id="f1").mqtt, bin_id="f1", store=store)
    broker.stop()
    try:
        telemetry.on_fault(Fault("jam", "chute still blocked 4 s after sorting"))
        assert store.outbox_size() == 1
        broker.start()
        listener = Listener(broker.port, topic="smartbin/f1/fault", client_id="faults")
        time.sleep(0.5)  # subscribed before the bin connects (the message is not retained)
        telemetry.start()
        assert telemetry.drain(30)
        assert listener.wait_for(lambda li: li.payloads("smartbin/f1/fault"), timeout=30)
        (payload,) = listener.payloads("smartbin/f1/fault")
        assert json.loads(payload)["kind"] == "jam"
        listener.close()
    finally:
        telemetry.stop()
        store.close()


# ---------------------------------------------------------------------- Home Assistant, fuller

STATE_FIELDS = {"state", "detail", "paused", "model", "model_version", "backend", "faults",
                "last_fault", "teach"}


def retained_state(listener, base="smartbin/t1"):
    return json.loads(listener.retained.get(f"{base}/state", b"{}"))


def test_the_first_retained_state_after_a_start_has_every_field(running_bin):
    """No item yet, so the loop has not changed state: the state the connect published."""
    b = running_bin
    listener = Listener(b.port, topic="smartbin/t1/state", client_id="first-state")
    assert listener.wait_for(lambda li: li.messages)
    states = [json.loads(p) for p in listener.payloads("smartbin/t1/state")]
    assert all(set(s) == STATE_FIELDS for s in states), states
    assert states[0] == {"state": "idle", "detail": "", "paused": False, "model": "demo",
                         "model_version": DEMO_VERSION, "backend": "litert", "faults": {},
                         "last_fault": None, "teach": None}
    listener.close()


def test_the_retained_state_follows_a_model_reload_and_faults(running_bin):
    import shutil

    from bin_controller.vision.bundle import SHIPPED_MODELS

    b = running_bin
    # A second bundle that loads offline: the demo's files under another name and version.
    copy = Path(b.cfg.model.dir) / "demo2"
    assert copy.is_relative_to(b.tmp_path)
    shutil.copytree(SHIPPED_MODELS / "demo", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "name": "demo2",
                                                     "version": "2.0.0"}))
    listener = Listener(b.port, topic="smartbin/t1/state", client_id="state")
    assert listener.wait_for(lambda li: retained_state(li).get("model") == "demo")
    r = b.cmd("reload_model", '{"bundle": "demo2"}')
    assert r["ok"] and (r["model"], r["version"], r["previous"]) == (
        "demo2", "2.0.0", f"demo {DEMO_VERSION}"), r
    assert listener.wait_for(lambda li: retained_state(li).get("model") == "demo2"), \
        listener.payloads("smartbin/t1/state")
    state = retained_state(listener)
    assert set(state) == STATE_FIELDS and state["model_version"] == "2.0.0"
    assert state["state"] == "idle"  # the loop did not change state: the reload said it
    # A fault that changes no state still reaches the retained counts of faults.
    b.loop.report_fault("camera", "no frame within 2 s")
    assert listener.wait_for(lambda li: retained_state(li).get("faults") == {"camera": 1})
    assert retained_state(listener)["last_fault"] == "no frame within 2 s"
    # And a reload back to the configured bundle says so too.
    assert b.cmd("reload_model", "{}")["ok"]
    assert listener.wait_for(lambda li: retained_state(li).get("model") == "demo")
    assert retained_state(listener)["model_version"] == DEMO_VERSION
    listener.close()


def render(template: str, value: str) -> str:
    """Home Assistant's rendering of the only template the controls use."""
    assert template.count("{{ value }}") == 1
    return template.replace("{{ value }}", value)


def test_the_home_assistant_controls_drive_the_bin(running_bin):
    """What Home Assistant would send, taken from the discovery the bin published: each
    button's payload_press and each select option through its command_template, to its
    command_topic; each is answered ok and does what it says."""
    b = running_bin
    ha = Listener(b.port, topic="homeassistant/#", client_id="ha-controls")
    node = "homeassistant/{}/smartbin_t1/{}/config"
    wanted = [node.format("button", k) for k in ("pause", "resume",
                                                 *(f"sort_next_{x}" for x in BINS),
                                                 *(f"emptied_{x}" for x in BINS))]
    wanted.append(node.format("select", "sort_next"))
    assert ha.wait_for(lambda li: set(wanted) <= set(li.retained)), sorted(ha.retained)
    configs = {t: json.loads(ha.retained[t]) for t in wanted}
    ha.close()
    state = Listener(b.port, topic="smartbin/t1/state", client_id="ha-state")

    def press(key: str, payload: str | None = None) -> dict:
        platform = "select" if payload is not None else "button"
        conf = configs[node.format(platform, key)]
        topic = conf["command_topic"]
        assert topic.startswith("smartbin/t1/cmd/")
        sent = payload if payload is not None else conf["payload_press"]
        raw = request(b.port, topic, sent, topic.replace("/cmd/", "/reply/"))
        assert raw is not None, f"no reply to {key}"
        return json.loads(raw)

    assert press("pause") == {"ok": True, "paused": True, "command": "pause"}
    assert b.loop.status()["paused"]
    assert state.wait_for(lambda li: retained_state(li).get("state") == "paused"
                          and retained_state(li).get("paused") is True)
    assert press("resume") == {"ok": True, "paused": False, "command": "resume"}
    assert not b.loop.status()["paused"]
    assert state.wait_for(lambda li: retained_state(li).get("paused") is False)
    state.close()
    for x in BINS:
        assert press(f"sort_next_{x}") == {"ok": True, "bin": x, "command": "sort_next"}
        assert b.loop._next_bin == x
    select = configs[node.format("select", "sort_next")]
    assert select["options"] == list(BINS)
    for x in reversed(BINS):
        reply = press("sort_next", render(select["command_template"], x))
        assert reply == {"ok": True, "bin": x, "command": "sort_next"}
        assert b.loop._next_bin == x
    for x in BINS:
        reply = press(f"emptied_{x}")
        assert reply["ok"] and reply["bin"] == x, reply
    b.loop._next_bin = None
