"""Fill levels over a real mosquitto: the retained `fill`, the `full` fault, `cmd/emptied`
and the `emptied` event, on the simulated bin with its real store and fill state in
tmp_path. Every compartment holds 2 l and every item is 1 l: the second item in a
compartment fills it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from bin_controller.bins import BINS
from bin_controller.config import config_from_dict
from bin_controller.payloads import FILL_FIELDS
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import GeneratedSource
from tests.broker import Listener
from tests.test_mqtt_photos import Requester

BASE = "smartbin/t1"
FILL = f"{BASE}/fill"
EMPTIED = f"{BASE}/emptied"
MAX_ITEMS = len(BINS) + 1  # by then two items share a compartment




def fill_cfg(port: int, state: Path):
    return sim_config(config_from_dict({
        "bin": {"id": "t1", "state_dir": str(state)},
        "fill": {"capacity_l": dict.fromkeys(BINS, 2.0),
                 "item_volume_l": dict.fromkeys(BINS, 1.0),
                 # Items count as their typical volume: the levels go in steps of 50 %.
                 "estimate_margin_pct": 0.0},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port,
                 "stats_interval_s": 60.0}}), fast=True)


class FillBin:
    """The simulated bin with MQTT, started and subscribed to its commands."""

    def __init__(self, port: int, demo, state: Path) -> None:
        self.port = port
        # Nobody empties: the tests empty with cmd/emptied themselves.
        self.simulation = Simulation(fill_cfg(port, state), classifier=demo,
                                     emptier=False).__enter__()
        self.bin = self.simulation.bin
        self.fill, self.store, self.telemetry = self.bin.fill, self.bin.store, \
            self.bin.telemetry
        assert self.fill is not None and self.telemetry is not None
        assert self.telemetry.subscribed.wait(10)
        self._seed = 0
        self.requester: Requester | None = None

    def drop_until_full(self) -> str:
        """Drop items one at a time until a compartment is full; that compartment."""
        for _ in range(MAX_ITEMS):
            self._seed += 1
            result = self.simulation.drop(GeneratedSource(self._seed).items(1))
            assert not result.timed_out
            full = [b for b in BINS if self.fill.is_full(b)]
            if full:
                return full[0]
        raise AssertionError(f"no compartment full after {MAX_ITEMS} items")

    def cmd(self, name: str, payload: bytes) -> dict:
        if self.requester is None:
            self.requester = Requester(self.port)
        return self.requester.request(name, payload)

    def close(self) -> None:
        if self.requester is not None:
            self.requester.close()
        self.simulation.__exit__(None, None, None)


@pytest.fixture
def listener(broker):
    li = Listener(broker.port, topic=f"{BASE}/#", client_id="fill-dashboard")
    yield li
    li.close()


@pytest.fixture
def fill_bin(broker, listener, demo, tmp_path):
    b = FillBin(broker.port, demo, tmp_path / "state")
    yield b
    b.close()


def retained_fill(li: Listener) -> dict:
    with li.lock:
        raw = li.retained.get(FILL, b"")
    return json.loads(raw) if raw else {}


def wait_fill(li: Listener, predicate, timeout: float = 20.0) -> dict:
    assert li.wait_for(lambda x: bool(retained_fill(x)) and predicate(retained_fill(x)),
                       timeout=timeout), retained_fill(li)
    return retained_fill(li)


def levels(li: Listener, bin_name: str) -> list[float]:
    """The levels `bin_name` went through, as published (repeats left out)."""
    out: list[float] = []
    for raw in li.payloads(FILL):
        pct = json.loads(raw)[bin_name]["pct"]
        if not out or out[-1] != pct:
            out.append(pct)
    return out


def emptied_events(li: Listener) -> list[dict]:
    return [json.loads(p) for p in li.payloads(EMPTIED)]


def test_the_retained_fill_follows_the_items_and_a_full_compartment_is_a_fault(
        fill_bin, listener):
    full = fill_bin.drop_until_full()
    counts = fill_bin.store.snapshot()
    sent = wait_fill(listener, lambda f: f[full]["state"] == "full")
    assert list(sent) == list(BINS)
    assert all(list(entry) == list(FILL_FIELDS) for entry in sent.values())
    assert levels(listener, full) == [0.0, 50.0, 100.0]  # rising with each item
    for b in BINS:
        assert sent[b]["items"] == counts[b]  # nothing emptied yet: the items are the counts
        assert sent[b]["pct"] == 50.0 * counts[b]
        assert sent[b]["state"] == ("full" if b == full else "ok")
        assert (sent[b]["source"], sent[b]["sensor_fault"], sent[b]["capacity_l"]) == (
            "estimate", False, 2.0)
    assert listener.wait_for(lambda li: any(
        json.loads(p)["kind"] == "full" for p in li.payloads(f"{BASE}/fault")))
    faults = [json.loads(p) for p in listener.payloads(f"{BASE}/fault")]
    (fault,) = [f for f in faults if f["kind"] == "full"]
    assert fault["detail"].startswith(f"{full} is 100 % full")


def test_emptied_resets_the_level_keeps_the_counts_and_publishes_the_fill_before(
        fill_bin, listener):
    full = fill_bin.drop_until_full()
    wait_fill(listener, lambda f: f[full]["state"] == "full")
    counts = fill_bin.store.snapshot()
    # What Home Assistant's "Emptied <bin>" button sends.
    button = fill_bin.telemetry.discovery_payloads()[
        f"homeassistant/button/smartbin_t1/emptied_{full}/config"]
    assert button["command_topic"] == f"{BASE}/cmd/emptied"
    reply = fill_bin.cmd("emptied", str(button["payload_press"]).encode())
    assert reply == {"ok": True, "bin": full, "pct_before": 100.0, "items": 2,
                     "command": "emptied"}
    sent = wait_fill(listener, lambda f: f[full]["pct"] == 0.0)
    assert (sent[full]["state"], sent[full]["items"]) == ("ok", 0)
    assert listener.wait_for(lambda li: emptied_events(li))
    (event,) = emptied_events(listener)
    assert {k: event[k] for k in ("bin", "pct_before", "items", "source")} == {
        "bin": full, "pct_before": 100.0, "items": 2, "source": "command"}
    assert abs(event["time"] - time.time()) < 60
    assert not fill_bin.fill.is_full(full)
    # The counts are what physically happened: they stay.
    assert fill_bin.store.snapshot() == counts
    assert json.loads(listener.retained[f"{BASE}/counts"])["total"] == counts["total"]


@pytest.mark.parametrize(("payload", "error"), [
    (b'{"bin": "garden"}', "bin 'garden' is not a compartment of this bin; bin must be one "
                           "of recyclable, kitchen, hazardous, other"),
    (b"{}", "missing field(s) bin"),
    (b'{"bin": "kitchen", "all": true}', "unexpected field(s) all; allowed: bin"),
    (b'{"bin": null}', "bin must be the name of a compartment"),
    (b"not json", "payload is not JSON"),
])
def test_a_bad_emptied_command_is_refused_and_changes_nothing(fill_bin, listener, payload,
                                                             error):
    full = fill_bin.drop_until_full()
    wait_fill(listener, lambda f: f[full]["state"] == "full")
    before = fill_bin.fill.snapshot()
    reply = fill_bin.cmd("emptied", payload)
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert fill_bin.fill.snapshot() == before
    assert fill_bin.store.outbox_size() == 0 and emptied_events(listener) == []
    assert retained_fill(listener)[full]["state"] == "full"


def test_an_emptying_during_a_broker_outage_arrives_after_the_reconnect(
        broker, fill_bin, listener):
    full = fill_bin.drop_until_full()
    wait_fill(listener, lambda f: f[full]["state"] == "full")
    assert fill_bin.telemetry.drain(20)
    broker.stop()
    assert gone(fill_bin)
    # The sensor saw the compartment emptied while the network was down.
    fill_bin.fill.emptied(full, source="sensor")
    assert fill_bin.store.outbox_size() == 1  # kept in the store, not lost with paho
    broker.start()
    assert listener.wait_for(lambda li: emptied_events(li), timeout=30)
    (event,) = emptied_events(listener)
    assert (event["bin"], event["pct_before"], event["items"], event["source"]) == (
        full, 100.0, 2, "sensor")
    # The reconnect published the level as it is now.
    wait_fill(listener, lambda f: f[full]["pct"] == 0.0 and f[full]["state"] == "ok",
              timeout=30)
    assert fill_bin.telemetry.drain(20) and fill_bin.store.outbox_size() == 0


def gone(fill_bin: FillBin, timeout: float = 20.0) -> bool:
    """Whether the bin noticed that the broker is gone."""
    end = time.monotonic() + timeout
    while fill_bin.telemetry.connected.is_set():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_a_full_compartment_is_still_full_after_a_restart(broker, demo, tmp_path):
    state = tmp_path / "state"
    first = FillBin(broker.port, demo, state)
    try:
        full = first.drop_until_full()
        assert first.telemetry.drain(20)
    finally:
        first.close()
    # Forget what the first run left retained: the second must publish it itself.
    clear = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    clear.connect("127.0.0.1", broker.port)
    clear.loop_start()
    clear.publish(FILL, b"", qos=1, retain=True).wait_for_publish(5)
    clear.loop_stop()
    clear.disconnect()
    listener = Listener(broker.port, topic=FILL, client_id="after-restart")
    try:
        time.sleep(0.5)
        assert retained_fill(listener) == {}
        second = FillBin(broker.port, demo, state)
        try:
            sent = wait_fill(listener, lambda f: full in f)
            assert (sent[full]["state"], sent[full]["pct"], sent[full]["items"]) == (
                "full", 100.0, 2)
            assert second.fill.is_full(full)
        finally:
            second.close()
    finally:
        listener.close()
