"""MQTT `cmd/teach` on the simulated bin (demo bundle, real mosquitto, real SQLite, the
real teach in a child process): the loop keeps sorting and counting while it runs, the
progress is in the retained `state`, an accepted bundle is installed and swapped in, a
worse one is refused with its numbers, a killed teach changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bin_controller.model_updates import CURRENT
from bin_controller.vision.bundle import load_bundle
from hardware_sim import items
from hardware_sim.unknown_kinds import GLASS_JAR, GRAPES, MixedSource
from tests.broker import Listener
from tests.test_mqtt_photos import BASE, PhotoBin

DEMO_VERSION = load_bundle("demo").version  # the shipped demo bundle's version

STATE = f"{BASE}/state"
OLD = tuple(items.KINDS)


class TeachBin(PhotoBin):
    """The simulated bin with MQTT, a listener on its retained state, and items of known
    kinds (indices into `kinds`) dropped on demand."""

    def __init__(self, port: int, demo, state: Path) -> None:
        super().__init__(port, demo, state)
        self.kinds = (*OLD, GRAPES, GLASS_JAR)
        self.source = MixedSource(self.kinds, seed=11)
        self.states = Listener(port, topic=STATE, client_id=f"states-{id(self)}")
        self.dropped = 0

    def sort(self, order: list[int]) -> list:
        batch = self.source.items(order, first_id=self.dropped + 1)
        result = self.simulation.drop(batch)
        assert not result.timed_out
        self.dropped += len(batch)
        # The site log learns of an item on the photo writer's thread: reviewable once
        # the writer has caught up.
        assert self.photos.flush()
        return batch

    def teaches(self) -> list[dict]:
        return [s["teach"] for s in map(json.loads, self.states.payloads(STATE))
                if s.get("teach")]

    def retained_state(self) -> dict:
        return json.loads(self.states.retained[STATE])

    def wait_teach(self, phases: set[str], timeout: float = 120.0) -> dict:
        assert self.states.wait_for(
            lambda li: (json.loads(li.retained.get(STATE, b"{}")).get("teach") or {})
            .get("phase") in phases, timeout=timeout), self.teaches()[-3:]
        return self.retained_state()["teach"]

    def state_dir_models(self) -> Path:
        return Path(self.simulation.bin.config.model.dir).expanduser()

    def close(self) -> None:
        self.states.close()
        super().close()


@pytest.fixture
def teach_bin(broker, demo, tmp_path):
    b = TeachBin(broker.port, demo, tmp_path / "state")
    yield b
    b.close()


def label(b: TeachBin, batch, name: str, bin_name: str | None = None) -> None:
    seqs = [i.events[0].seq for i in batch]
    reply = b.cmd("label", {"seqs": seqs, "label": name, **({"bin": bin_name} if bin_name
                                                             else {})})
    assert reply["ok"], reply


def reviewed_site(b: TeachBin, per_old: int = 3, per_new: int = 6) -> None:
    """Items of the two unknown kinds and of every known one, all labelled by a reviewer."""
    for index, kind in enumerate(b.kinds):
        n = per_new if kind in (GRAPES, GLASS_JAR) else per_old
        batch = b.sort([index] * n)
        label(b, batch, kind.name, kind.bin if kind in (GRAPES, GLASS_JAR) else None)


def models_snapshot(models: Path) -> dict[str, str]:
    """Every file under the models folder and its bytes' hash (what must not change)."""
    import hashlib

    if not models.exists():
        return {}
    return {str(p.relative_to(models)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(models.rglob("*")) if p.is_file()}


def teach_children() -> list[int]:
    """Processes of ours running `bin_controller teach` (Linux /proc)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"teach" in cmdline and b"bin_controller" in cmdline:
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------- happy path


def test_cmd_teach_installs_and_reloads_while_the_bin_keeps_sorting(teach_bin):
    b = teach_bin
    reviewed_site(b)
    before = b.retained_state()
    assert before["model"] == "demo" and before["model_version"] == DEMO_VERSION
    assert before["teach"] is None

    reply = b.cmd("teach", {"id": "t-1"})
    assert reply["ok"] and reply["started"] is True and reply["id"] == "t-1", reply
    # The loop goes on: items dropped while the teach runs are sorted and counted.
    during = 0
    while during < 200:
        b.sort([during % len(OLD)])
        during += 1
        if b.retained_state()["teach"]["phase"] in ("done", "rejected", "failed"):
            break
    final = b.wait_teach({"done", "rejected", "failed"})
    assert final["phase"] == "done", final
    assert during >= 2  # some items were sorted while it ran

    phases = [t["phase"] for t in b.teaches()]
    assert phases[0] == "exporting" and phases[-1] == "done"
    for step in ("features", "fitting", "installing"):
        assert step in phases, phases
    # phases only move forward
    order = ["exporting", "features", "fitting", "checking", "installing", "done"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases)
    assert final["finished"] >= final["started"] and final["error"] is None
    result = final["result"]
    assert result["model"] == "demo" and result["version"].startswith(f"{DEMO_VERSION}+teach.")
    assert result["previous"] == f"demo {DEMO_VERSION}" and result["photos"] == 8 * 3 + 2 * 6

    after = b.retained_state()
    assert after["model_version"] == result["version"]
    assert b.simulation.loop.classifier.bundle.version == result["version"]
    models = b.state_dir_models()
    assert json.loads((models / CURRENT).read_text())["bundles"]["demo"]["current"]
    # Every item counted once: one event per item, seqs without gaps, counts agree.
    events = b.simulation.events
    assert len(events) == b.dropped
    assert [e.seq for e in events] == list(range(1, b.dropped + 1))
    assert sum(b.simulation.bin.store.counts().values()) == b.dropped
    # The new kinds now reach their compartments.
    grapes = b.sort([len(OLD)] * 10)
    assert sum(i.compartment == "kitchen" for i in grapes) >= 8
    # Its scratch folder is gone.
    assert not any((b.state / "teach").iterdir())


# ---------------------------------------------------------------------- refusals


def test_a_second_teach_is_refused_and_bad_payloads_name_the_field(teach_bin):
    b = teach_bin
    for payload, words in (({"margin": "2"}, "margin must be a number"),
                           ({"margin": True}, "margin must be a number"),
                           ({"margin": 101}, "margin must be a number"),
                           ({"margin": -1}, "margin must be a number"),
                           ({"bundle": "demo"}, "unexpected field(s) bundle")):
        reply = b.cmd("teach", payload)
        assert not reply["ok"] and words in reply["error"], (payload, reply)
    assert b.retained_state()["teach"] is None  # nothing started
    reply = b.cmd("teach_cancel", {})
    assert not reply["ok"] and reply["error"] == "no teach is running"
    assert not b.cmd("teach_cancel", {"now": 1})["ok"]

    reviewed_site(b)
    first = b.cmd("teach", {})
    second = b.cmd("teach", {"margin": 5})
    assert first["ok"], first
    assert not second["ok"] and "a teach is running" in second["error"], second
    assert b.wait_teach({"done", "rejected", "failed"})["phase"] == "done"


def test_teach_with_nothing_reviewed_fails_in_one_line(teach_bin):
    b = teach_bin
    b.sort([0, 1])
    assert b.cmd("teach", {})["ok"]
    final = b.wait_teach({"done", "rejected", "failed"})
    assert final["phase"] == "failed"
    assert final["error"].startswith("no reviewed photos") and "\n" not in final["error"]
    assert b.retained_state()["model_version"] == DEMO_VERSION


# ---------------------------------------------------------------------- rejected


def test_a_worse_teach_is_rejected_with_its_numbers_and_changes_nothing(teach_bin):
    """Banana peels filed as a new kind of 'other' waste take the base's bananas: on the
    held-out reviewed photos the old labels lose far more than the margin."""
    b = teach_bin
    for index, kind in enumerate(OLD):
        label(b, b.sort([index] * 5), kind.name)
    label(b, b.sort([0] * 6), "其他垃圾_果皮", "other")
    models = b.state_dir_models()
    snapshot = models_snapshot(models)

    assert b.cmd("teach", {"margin": 2})["ok"]
    final = b.wait_teach({"done", "rejected", "failed"})
    assert final["phase"] == "rejected", final
    old = final["result"]["evaluation"]["old_labels_top1"]
    assert old["base"] - old["new"] > 0.02 and old["n"] > 0, old
    assert final["result"]["evaluation"]["accepted"] is False
    assert final["error"].startswith("rejected: ") and "\n" not in final["error"]
    assert final["margin"] == 2
    assert b.retained_state()["model_version"] == DEMO_VERSION
    assert b.simulation.loop.classifier.bundle.version == DEMO_VERSION
    assert models_snapshot(models) == snapshot


# ---------------------------------------------------------------------- killed, cancelled


def test_a_teach_child_killed_mid_way_leaves_the_model_and_the_models_folder(teach_bin):
    b = teach_bin
    reviewed_site(b)
    models = b.state_dir_models()
    snapshot = models_snapshot(models)
    assert b.cmd("teach", {})["ok"]
    deadline = time.monotonic() + 30
    children: list[int] = []
    while not children and time.monotonic() < deadline:
        children = teach_children()
        time.sleep(0.005)
    assert children, "the teach child never started"
    # Let it get into its work (imports, features), then kill it without warning.
    b.states.wait_for(lambda li: any(t.get("phase") == "features" for t in b.teaches()),
                      timeout=30)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    final = b.wait_teach({"done", "rejected", "failed"})
    assert final["phase"] == "failed", final
    assert final["error"] == ("the teach process was killed (signal 9) before it finished; "
                              "nothing was changed")
    assert b.retained_state()["model_version"] == DEMO_VERSION
    assert models_snapshot(models) == snapshot
    b.sort([0, 1, 2])  # the bin sorts on
    assert len(b.simulation.events) == b.dropped


def test_teach_cancel_stops_it_and_changes_nothing(teach_bin):
    b = teach_bin
    reviewed_site(b)
    assert b.cmd("teach", {})["ok"]
    reply = b.cmd("teach_cancel", {})
    if not reply["ok"]:  # finished before the cancel arrived: nothing to show here
        pytest.skip(f"the teach finished first: {reply}")
    assert reply["cancelled"] is True
    final = b.wait_teach({"done", "rejected", "failed", "cancelled"})
    assert final["phase"] == "cancelled", final
    assert b.retained_state()["model_version"] == DEMO_VERSION
    deadline = time.monotonic() + 10
    while teach_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not teach_children()


# ---------------------------------------------------------------------- the job alone


def test_progress_is_rate_limited_but_every_phase_change_is_published(tmp_path):
    from bin_controller.teaching import TeachJob

    published: list[float] = []
    job = TeachJob(state_dir=tmp_path, export=lambda d: {}, base=lambda: (tmp_path, "x"),
                   install=lambda p: {}, on_change=lambda: published.append(time.monotonic()),
                   min_interval_s=0.5)
    from bin_controller.teaching import _Progress

    job._progress = _Progress("features", time.time(), 2.0)
    for n in range(100):
        job._update("features", n, 100)
    assert len(published) == 1  # a burst of steps: one message
    job._update("fitting", 0, 2)
    assert len(published) == 2  # a new phase goes out at once


# ---------------------------------------------------------------------- cmd/capture


def test_cmd_capture_photographs_the_item_on_the_paused_flap(teach_bin):
    b = teach_bin
    args = {"label": GRAPES.name, "bin": "kitchen", "shots": 3, "interval_s": 0}
    reply = b.cmd("capture", args)
    assert not reply["ok"] and reply["error"].startswith("pause the bin first"), reply
    assert b.cmd("pause", {})["ok"]
    reply = b.cmd("capture", args)
    assert not reply["ok"] and reply["error"].startswith("nothing on the flap"), reply
    for payload, words in (({"bin": "kitchen"}, "missing field(s) label"),
                           ({**args, "shots": 0}, "shots must be a whole number from 1 to 30"),
                           ({**args, "shots": 2.5}, "shots must be a whole number"),
                           ({**args, "interval_s": 5}, "interval_s must be a number from 0"),
                           ({**args, "bin": "garden"}, "bin 'garden': one of"),
                           ({"label": "coffee cup"}, "give its bin with bin"),
                           ({"label": "../x", "bin": "other"}, "give a label name"),
                           ({**args, "photo": 1}, "unexpected field(s) photo")):
        reply = b.cmd("capture", payload)
        assert not reply["ok"] and words in reply["error"], (payload, reply)

    # A person lays a bunch of grapes on the paused bin's flap: it stays there.
    item = b.source.items([len(OLD)], first_id=b.dropped + 1)[0]
    b.simulation.world.drop(item)
    deadline = time.monotonic() + 10
    while not b.simulation.bin.sensor.present and time.monotonic() < deadline:
        time.sleep(0.01)
    reply = b.cmd("capture", args)
    assert reply["ok"], reply
    assert reply["label"] == GRAPES.name and reply["new_label"] is True
    assert reply["folder"] == GRAPES.name and len(reply["files"]) == 3 and reply["total"] == 3
    folder = b.state / "captures" / GRAPES.name
    assert sorted(p.name for p in folder.iterdir()) == sorted(reply["files"])
    # A label the model knows, by its English name: its own folder.
    reply = b.cmd("capture", {"label": "banana peel", "shots": 1})
    assert reply["ok"] and reply["folder"] == "厨余垃圾_香蕉皮" and reply["bin"] == "kitchen"
    assert not b.simulation.events  # nothing was sorted or counted meanwhile
    # Resumed with the item still there: it is sorted and counted like any item.
    assert b.cmd("resume", {})["ok"]
    deadline = time.monotonic() + 10
    while not b.simulation.events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(b.simulation.events) == 1


def test_captured_photos_join_the_reviewed_ones_in_cmd_teach(teach_bin):
    """Grapes only ever captured (never sorted), the old kinds reviewed: the teach learns
    grapes from the captures."""
    b = teach_bin
    for index, kind in enumerate(OLD):
        label(b, b.sort([index] * 3), kind.name)
    assert b.cmd("pause", {})["ok"]
    rng = np.random.default_rng(5)
    for n in range(2):  # two bunches, five shots each
        item = b.source.items([len(OLD)], first_id=100 + n)[0]
        b.simulation.world.drop(item)
        deadline = time.monotonic() + 10
        while not b.simulation.bin.sensor.present and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(5):
            # The simulated camera sees the same picture of a still item; the person turns
            # the bunch between captures (a real camera's shots differ by light anyway).
            item.image = items.render(GRAPES, rng)
            assert b.cmd("capture", {"label": GRAPES.name, "bin": "kitchen", "shots": 1,
                                     "interval_s": 0})["ok"]
        item.jam = True  # the person takes the bunch off the flap, as a jam is cleared
        b.simulation.world.clear_jam()
        while b.simulation.bin.sensor.present and time.monotonic() < deadline:
            time.sleep(0.01)
    assert b.cmd("resume", {})["ok"]
    assert b.cmd("teach", {})["ok"]
    final = b.wait_teach({"done", "rejected", "failed"})
    assert final["phase"] == "done", final
    assert final["result"]["photos"] == 8 * 3 + 10
    grapes = b.sort([len(OLD)] * 10)
    assert sum(i.compartment == "kitchen" for i in grapes) >= 8


# ---------------------------------------------------------------------- after a restart


def clear_retained_state(port: int) -> None:
    """The broker forgets the bin's retained state: what is retained next is the next
    service's."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(STATE, b"", qos=1, retain=True).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def state_teach(listener: Listener, phases: set[str], timeout: float = 120.0) -> dict:
    def teach(li: Listener) -> dict:
        payload = li.retained.get(STATE) or b"{}"
        return json.loads(payload).get("teach") or {}

    assert listener.wait_for(lambda li: teach(li).get("phase") in phases, timeout=timeout), \
        listener.retained.get(STATE)
    return teach(listener)


def test_the_last_teach_is_shown_again_after_a_restart(broker, demo, tmp_path):
    """Accepted and installed: after the service restarts, the retained state.teach says
    so again, field by field, and `smartbin monitor` shows the version."""
    from bin_controller.teach_record import iso_time
    from tests.test_cli import smartbin

    state = tmp_path / "state"
    b = TeachBin(broker.port, demo, state)
    try:
        reviewed_site(b)
        assert b.cmd("teach", {})["ok"]
        final = b.wait_teach({"done", "rejected", "failed"})
    finally:
        b.close()
    assert final["phase"] == "done", final
    assert final["finished_at"] == iso_time(final["finished"])
    version = final["result"]["version"]

    clear_retained_state(broker.port)
    again = TeachBin(broker.port, demo, state)
    try:
        assert state_teach(again.states, {"done"}) == final
        assert again.cmd("teach_cancel", {})["error"] == "no teach is running"
        shown = smartbin("monitor", "--host", f"127.0.0.1:{broker.port}", "--bin-id", "t1",
                         "--seconds", "3")
        assert shown.returncode == 0, shown.stderr
        clock = time.strftime("%H:%M:%S", time.localtime(final["finished"]))
        assert f"  t1               done {clock}: installed demo {version}" in \
            shown.stdout.splitlines(), shown.stdout
    finally:
        again.close()


def seed_captures(state: Path, per_kind: int = 5) -> int:
    """Captured photos of every known kind and of grapes, as cmd/capture keeps them: a
    teach has something to learn from without a reviewer."""
    from bin_controller.captures import save_shot

    rng = np.random.default_rng(3)
    n = 0
    for kind in (*OLD, GRAPES):
        folder = state / "captures" / kind.name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            save_shot(folder, items.render(kind, rng), i + 1, "20261128T120000")
            n += 1
    return n


def processes_with(marker: str) -> list[int]:
    """Our processes whose command line names `marker` (the test's own state folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_teach_the_service_was_killed_during_is_failed_after_a_restart(broker, tmp_path):
    """SIGKILL of the whole service (a power cut) while its teach runs: the restarted
    service publishes that teach as failed, saying why, never as still running."""
    from tests.conftest import REPO
    from tests.test_mqtt_photos import Requester

    state = tmp_path / "state"
    seed_captures(state)

    def simulate(*args: str) -> list[str]:
        return [sys.executable, "-m", "bin_controller", "simulate", "--fast", "--quiet",
                "--state-dir", str(state), "--mqtt", f"127.0.0.1:{broker.port}",
                "--bin-id", "t1", *args]

    states = Listener(broker.port, topic=STATE, client_id="killed-states")
    proc = subprocess.Popen(simulate("--items", "400", "--pace", "0.25"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    requester = None
    try:
        assert states.wait_for(lambda li: STATE in li.retained, timeout=120), "never started"
        requester = Requester(broker.port)
        for _ in range(60):  # the service subscribes to its commands just after connecting
            requester.send("teach", b"{}")
            reply = requester.reply("teach", 1, timeout=2)
            if reply is not None:
                break
        assert reply is not None and json.loads(reply)["ok"], reply
        running = state_teach(states, {"features", "fitting", "checking"}, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        states.close()
        if requester is not None:
            requester.close()
    record = json.loads((state / "teach.json").read_text())
    assert record["phase"] in ("features", "fitting", "checking"), record
    assert record["finished"] is None and running["finished"] is None

    clear_retained_state(broker.port)
    after = Listener(broker.port, topic=STATE, client_id="restarted-states")
    try:
        done = subprocess.run(simulate("--items", "2"), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        teach = state_teach(after, {"done", "rejected", "failed", "cancelled", "features",
                                    "fitting", "checking", "exporting", "installing"})
        assert teach["phase"] == "failed", teach
        assert teach["error"] == (f"the service stopped during the teach (phase "
                                  f"{record['phase']}); nothing was installed: send teach "
                                  "again")
        assert teach["started"] == running["started"] and teach["finished"] >= teach["started"]
        assert json.loads(after.retained[STATE])["model_version"] == DEMO_VERSION
    finally:
        after.close()
    assert not (state / "teach").exists() or not any((state / "teach").iterdir())
    # The killed service's teach child, orphaned, ended too (its progress pipe broke).
    deadline = time.monotonic() + 30
    while processes_with(str(state)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_with(str(state))
    for pid in left:  # not to outlive the test whatever happens
        os.kill(pid, signal.SIGKILL)
    assert not left
