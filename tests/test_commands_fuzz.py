"""Commands under any input: every command gets one reply, nothing raises, and a `pause`
sent after anything at all is still answered."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from bin_controller.config import config_from_dict
from bin_controller.errors import BundleError
from bin_controller.mqtt.commands import Commands, make_handlers
from bin_controller.payloads import to_json
from tests.test_mqtt_units import FakeCounts, FakeLoop

KNOWN = ["pause", "resume", "reset_counts", "sort_next", "calibrate", "reload_model"]
CFG = config_from_dict({})


class SlowLoop(FakeLoop):
    """Moving the flap takes a while, as it does on a bin."""

    def calibrate(self, *, bin_name=None, angle=None):
        time.sleep(0.005)
        return super().calibrate(bin_name=bin_name, angle=angle)


def load_classifier(bundle: str):
    if bundle == "broken":
        raise BundleError("model/broken/manifest.json: has no trained weights yet")
    return SimpleNamespace(bundle=SimpleNamespace(name=bundle, version="2"))


def handlers(loop=None):
    return make_handlers(CFG, loop or FakeLoop(), FakeCounts(), load_classifier=load_classifier)


names = st.sampled_from(KNOWN) | st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "bin", "angle", "bundle", "confirm"]) | st.text(max_size=6),
        kids, max_size=4),
    max_leaves=10)
arguments = st.dictionaries(
    st.sampled_from(["id", "bin", "angle", "bundle", "confirm"]),
    st.sampled_from(["other", "kitchen", "glass", "demo", "broken", "../x", "reset_counts",
                     "", "a" * 200, 30, -400, 1e308, None, True, [], {}]) | json_values,
    max_size=3)
payloads = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | arguments.map(lambda v: json.dumps(v).encode())
    | st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(1, 200_000).map(lambda n: b'{"id": ' + b"[" * n)
    | st.integers(90, 20_000).map(lambda n: b'{"angle": ' + b"9" * n + b"}")
    | st.integers(4300, 5000).map(lambda n: b'{"id": -' + b"1" * n + b"}")
    | st.sampled_from([b"", b"  ", b"NaN", b'{"angle": Infinity}', b'{"angle": 1e999}',
                       b"\xff", b'{"bin": "other"', b"{}" * 40_000, b" " * 70_000])
)


def check_reply(name: str, reply: dict) -> None:
    assert reply["ok"] in (True, False) and reply["command"] == name
    if reply["ok"] is False:
        assert isinstance(reply["error"], str) and reply["error"]
    json.loads(to_json(reply))  # what goes on the wire is JSON again


@settings(max_examples=400, deadline=None)
@given(name=names, payload=payloads)
def test_any_command_gets_a_reply_and_nothing_raises(name, payload):
    reply = Commands(handlers()).handle(name, payload)
    check_reply(name, reply)


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, reply: dict) -> None:
        with self.cond:
            self.got.append((name, reply))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.got), timeout=timeout)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(names, payloads), max_size=150))
def test_a_pause_after_anything_is_answered(commands):
    """Through the real queue and threads: the pause is answered, and in the end every
    command, refused or run, got exactly one reply."""
    loop = SlowLoop()
    sink = Sink()
    c = Commands(handlers(loop), reply=sink)
    c.start()
    try:
        for name, payload in commands:
            c.submit(name, payload)
        c.submit("pause", b'{"id": "last"}')
        assert sink.wait_for(lambda got: any(r.get("id") == "last" for _, r in got),
                             timeout=10)
        assert sink.wait_for(lambda got: len(got) == len(commands) + 1, timeout=30)
    finally:
        c.stop()
    for name, reply in sink.got:
        check_reply(name, reply)
    assert ("pause", {"ok": True, "paused": True, "command": "pause", "id": "last"}) \
        in sink.got
