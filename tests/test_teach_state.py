"""The background teach's state beyond the running service: its record in the state folder
(kept over a restart, a teach the service died during coming back failed), its line in
`smartbin monitor` and its Home Assistant entities. The broker and restart tests are in
test_teach_background.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bin_controller import teach_record
from bin_controller.config import config_from_dict
from bin_controller.mqtt import discovery
from bin_controller.mqtt.discovery import discovery_payloads
from bin_controller.payloads import to_json
from bin_controller.teaching import PHASES, TeachJob, TeachSettings, _Progress
from bin_controller.tools import monitor
from bin_controller.tools.monitor import Fleet, teach_line

FINISHED_AT = 1795871112.25  # 2026-11-28T13:05:12Z

DONE = {"phase": "done", "done": 1, "total": 1, "started": 1764335000.0,
        "finished": FINISHED_AT, "finished_at": "2026-11-28T13:05:12Z", "margin": 2.0,
        "result": {"installed": "1.0.0+teach.20261128T1305Z", "model": "demo",
                   "version": "1.0.0+teach.20261128T1305Z", "previous": "demo 1.0.0",
                   "evaluation": {"accepted": True}, "photos": 36, "seconds": 4.2},
        "error": None}
REJECTED = {**DONE, "phase": "rejected", "margin": 2,
            "result": {"evaluation": {"accepted": False, "margin_points": 2, "old_labels_top1": {
                "base": 0.9167, "new": 0.7083, "n": 24}}},
            "error": "rejected: the taught bundle is worse on demo's labels by 20.8 points"}
FAILED = {**DONE, "phase": "failed", "result": None,
          "error": "no reviewed photos with a label to teach from; review some items first "
                   "(cmd/label or smartbin review label)"}


def job(state: Path) -> TeachJob:
    return TeachJob(state_dir=state, export=lambda d: {}, base=lambda: (state, "x"),
                    install=lambda p: {})


# ---------------------------------------------------------------------- the record


def test_the_last_teach_comes_back_as_it_ended(tmp_path):
    """What a finished teach published is what a new service publishes, field by field."""
    first = job(tmp_path)
    assert first.snapshot() is None  # no teach yet: state.teach is null
    first._progress = _Progress("features", time.time(), 2.0)
    first._update("fitting", 0, 2)
    first._finish("rejected", result=REJECTED["result"], error=REJECTED["error"])
    ended = first.snapshot()
    assert ended is not None and ended["phase"] == "rejected"
    assert ended["finished_at"] == teach_record.iso_time(ended["finished"])
    assert job(tmp_path).snapshot() == ended
    assert not job(tmp_path).running()  # a new teach may start


@pytest.mark.parametrize("phase", ["exporting", "features", "fitting", "checking"])
def test_a_teach_the_service_died_during_comes_back_failed(tmp_path, phase):
    (tmp_path / teach_record.RECORD).write_text(json.dumps(
        {**DONE, "phase": phase, "done": 3, "total": 40, "finished": None,
         "finished_at": None, "result": None}))
    (tmp_path / "teach" / "job-x" / "site").mkdir(parents=True)  # its scratch folder
    before = time.time()
    teach = job(tmp_path).snapshot()
    assert teach is not None and teach["phase"] == "failed"
    assert teach["error"] == (f"the service stopped during the teach (phase {phase}); "
                              "nothing was installed: send teach again")
    assert before - 1 <= teach["finished"] <= time.time() + 1
    assert teach["finished_at"] == teach_record.iso_time(teach["finished"])
    assert teach["started"] == DONE["started"] and teach["result"] is None
    assert not (tmp_path / "teach").exists()
    # Written back: the next restart says the same, with the same time.
    assert job(tmp_path).snapshot() == teach


def test_an_install_the_service_died_during_says_where_to_look(tmp_path):
    (tmp_path / teach_record.RECORD).write_text(json.dumps(
        {**DONE, "phase": "installing", "finished": None, "result": None}))
    teach = job(tmp_path).snapshot()
    assert teach is not None and teach["phase"] == "failed"
    assert teach["error"].startswith("the service stopped while the teach was installing")
    assert "model_version" in teach["error"] and "\n" not in teach["error"]


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"phase": "done"}',
                                     b'{"phase": "sleeping", "started": 1}', b"\xff\xfe"])
def test_a_record_that_cannot_be_read_is_forgotten_not_fatal(tmp_path, content):
    (tmp_path / teach_record.RECORD).write_bytes(content)
    j = job(tmp_path)
    assert j.snapshot() is None
    assert j.start(TeachSettings())["started"] is True  # the bin can teach again
    j.wait(30)
    assert j.snapshot()["phase"] == "failed"  # nothing to teach from in an empty folder
    assert json.loads((tmp_path / teach_record.RECORD).read_text())["phase"] == "failed"


def test_a_record_write_cut_short_leaves_the_old_one(tmp_path):
    (tmp_path / teach_record.RECORD).write_text(json.dumps(DONE))
    leftover = tmp_path / f"{teach_record.TMP_PREFIX}{teach_record.RECORD}.123"
    leftover.write_text('{"phase": "feat')
    assert job(tmp_path).snapshot() == DONE
    assert not leftover.exists()


def test_a_record_that_cannot_be_written_does_not_stop_the_teach(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / teach_record.RECORD).mkdir()  # a folder where the file belongs
    j = job(state)
    j.start(TeachSettings())
    assert j.wait(30)
    assert j.snapshot()["phase"] == "failed"
    assert j.snapshot()["error"].startswith("no reviewed photos")


def test_a_service_stopping_mid_teach_says_so(tmp_path):
    """A graceful stop (systemd stop) cancels the teach and keeps why."""
    import threading

    release = threading.Event()

    def export(dest: Path) -> dict:
        release.wait(10)
        return {"photos": 3}

    j = TeachJob(state_dir=tmp_path, export=export, base=lambda: (tmp_path, "x"),
                 install=lambda p: {})
    j.start(TeachSettings())
    threading.Timer(0.2, release.set).start()
    j.stop()
    teach = job(tmp_path).snapshot()
    assert teach is not None and teach["phase"] == "cancelled"
    assert teach["error"] == ("the service stopped during the teach (phase exporting); "
                              "nothing was installed: send teach again")


# ---------------------------------------------------------------------- the monitor


def test_monitor_lines_for_a_teach():
    assert teach_line(None) is None
    running = {"phase": "features", "done": 120, "total": 260, "finished": None}
    assert teach_line(running) == "features 120/260"
    assert teach_line({"phase": "exporting", "done": 0, "total": 0}) == "exporting"
    clock = time.strftime("%H:%M:%S", time.localtime(FINISHED_AT))
    assert teach_line(DONE) == f"done {clock}: installed demo 1.0.0+teach.20261128T1305Z"
    assert teach_line(REJECTED) == (f"rejected {clock}: old labels 91.7% -> 70.8% on 24 "
                                    "photos (20.8 points worse, margin 2 points)")
    assert teach_line(FAILED) == (f"failed {clock}: no reviewed photos with a label to teach "
                                  "from; review some items first (cmd/label or smartbin rev...")
    assert len(teach_line(FAILED).split(": ", 1)[1]) == monitor.TEACH_ERROR
    cancelled = {**FAILED, "phase": "cancelled", "error": "cancelled by teach_cancel"}
    assert teach_line(cancelled) == f"cancelled {clock}: cancelled by teach_cancel"


@pytest.mark.parametrize("teach", [
    {"phase": "<b>"}, {"phase": "features", "done": "x", "total": [1]},
    {"phase": "done", "finished": "today", "result": [1]},
    {"phase": "rejected", "result": {"evaluation": {"old_labels_top1": {"base": 7}}}},
    {"phase": "failed", "error": "\x1b[2Jgone"}, "done", 5, [None]])
def test_a_teach_of_the_wrong_shape_is_shown_with_question_marks(teach):
    line = teach_line(teach)
    assert line is None or "\x1b" not in line
    fleet = Fleet("smartbin")
    fleet.on_message(None, None, _message("smartbin/b1/state",
                                          {"state": "idle", "teach": teach}))
    fleet.render()  # never raises


def test_the_monitor_screen_has_a_teach_section_per_bin():
    fleet = Fleet("smartbin")
    fleet.on_message(None, None, _message("smartbin/b1/state", {"state": "idle",
                                                                 "teach": None}))
    assert "teach" not in fleet.render().split("recent items")[0]
    fleet.on_message(None, None, _message("smartbin/b1/state", {
        "state": "sorting", "teach": {"phase": "features", "done": 120, "total": 260}}))
    fleet.on_message(None, None, _message("smartbin/b2/state", {"state": "idle",
                                                                 "teach": FAILED}))
    lines = fleet.render().splitlines()
    at = lines.index("teach")
    assert lines[at + 1].split() == ["b1", "features", "120/260"]
    assert lines[at + 2].split()[:2] == ["b2", "failed"]
    # A state without the teach (an older bin) clears the line.
    fleet.on_message(None, None, _message("smartbin/b1/state", {"state": "idle"}))
    assert not any(line.startswith("  b1 ") for line in fleet.render().splitlines()
                   if "features" in line)


def _message(topic: str, payload: object):
    import paho.mqtt.client as mqtt

    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = json.dumps(payload).encode()
    return msg


# ---------------------------------------------------------------------- Home Assistant


def test_discovery_has_the_teach_phase_and_progress_with_the_photo_log():
    cfg = config_from_dict({}).mqtt
    plain = discovery_payloads(cfg, "g-1", "smartbin/g-1")
    assert not any("teach" in topic for topic in plain)  # no photo log: no cmd/teach
    out = discovery_payloads(cfg, "g-1", "smartbin/g-1", photos=True)
    dev = out["homeassistant/sensor/smartbin_g_1/state/config"]["device"]
    made_by = out["homeassistant/sensor/smartbin_g_1/state/config"]["origin"]
    tail = {"device": dev, "availability_topic": "smartbin/g-1/availability",
            "payload_available": "online", "payload_not_available": "offline",
            "origin": made_by}
    assert out["homeassistant/sensor/smartbin_g_1/teach/config"] == {
        "name": "Teach", "state_topic": "smartbin/g-1/state",
        "value_template": "{% set t = value_json.teach | default(none) %}{{ t.phase if t and "
                          "t.phase in ['exporting', 'features', 'fitting', 'checking', "
                          "'installing', 'done', 'rejected', 'failed', 'cancelled'] else "
                          "none }}",
        "json_attributes_topic": "smartbin/g-1/state",
        "json_attributes_template":
            "{% set t = value_json.teach | default(none) or {} %}{% set r = t.result | "
            "default(none) or {} %}{{ {'done': t.done | default(none), 'total': t.total | "
            "default(none), 'finished_at': t.finished_at | default(none), 'error': t.error | "
            "default(none), 'model': r.model | default(none), 'version': r.version | "
            "default(none)} | tojson }}",
        "icon": "mdi:school", "device_class": "enum",
        "options": ["exporting", "features", "fitting", "checking", "installing", "done",
                    "rejected", "failed", "cancelled"],
        "unique_id": "smartbin_g_1_teach", "object_id": "smartbin_g_1_teach", **tail}
    assert to_json(out["homeassistant/sensor/smartbin_g_1/teach_progress/config"]).startswith(
        '{"name": "Teach progress", "state_topic": "smartbin/g-1/state", "value_template": '
        '"{% set t = value_json.teach | default(none) %}{{ ((100 * t.done / t.total) | '
        'round(0) if t.total else 0) if t and t.finished is none else none }}", '
        '"unit_of_measurement": "%", "icon": "mdi:progress-clock", "unique_id": '
        '"smartbin_g_1_teach_progress"')
    # Every entity the bin had before keeps its bytes.
    assert {t: c for t, c in out.items() if t in plain} == plain


def test_every_teach_phase_is_known_to_home_assistant_the_monitor_and_the_record():
    assert discovery.TEACH_PHASES == PHASES
    assert (*monitor.TEACH_RUNNING, *monitor.TEACH_FINISHED) == PHASES
    assert (*teach_record.RUNNING, *teach_record.FINISHED) == PHASES


@pytest.mark.parametrize(("teach", "phase", "progress", "attributes"), [
    (None, "None", "None", {"done": None, "total": None, "finished_at": None, "error": None,
                            "model": None, "version": None}),
    ({"phase": "features", "done": 120, "total": 260, "finished": None}, "features", "46.0",
     None),
    ({"phase": "exporting", "done": 0, "total": 0, "finished": None}, "exporting", "0", None),
    (DONE, "done", "None", {"done": 1, "total": 1, "finished_at": "2026-11-28T13:05:12Z",
                            "error": None, "model": "demo",
                            "version": "1.0.0+teach.20261128T1305Z"}),
    (FAILED, "failed", "None", None),
    ({"phase": "<b>"}, "None", "None", None)])
def test_the_teach_templates_render_as_home_assistant_reads_them(teach, phase, progress,
                                                                   attributes):
    """Home Assistant renders these with Jinja; "None" is its unknown."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    state = {"state": "idle", "teach": teach}

    def render(template: str) -> str:
        return env.from_string(template).render(value_json=state)

    assert render(discovery.TEACH_TEMPLATE) == phase
    assert render(discovery.TEACH_PROGRESS_TEMPLATE) == progress
    attrs = json.loads(render(discovery.TEACH_ATTRIBUTES_TEMPLATE))
    if attributes is not None:
        assert attrs == attributes
