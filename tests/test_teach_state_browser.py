"""The bin page's teach line in a real browser (Debian's chromium, Playwright), from the
retained `state` a bin publishes: running, and ended (also the last teach a restarted bin
publishes again) with when it ended. Skips like test_dashboard_browser without chromium."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
import pytest

from tests.broker import Broker, mosquitto_binary
from tests.dashboard_support import DashboardProcess
from tests.test_dashboard_browser import WAIT_MS, browser, login  # noqa: F401 (fixture)

# 2026-06-01T08:00:00Z: not the day the test runs, so the page shows the date too
FINISHED = 1780300800.25


@pytest.fixture
def dash(tmp_path):
    mosquitto_binary()
    broker = Broker(tmp_path / "broker")
    broker.start()
    dashboard = DashboardProcess(tmp_path / "dashboard", broker.port)
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()

    def state(teach: dict | None) -> None:
        pub.publish("smartbin/taught/state", json.dumps({
            "state": "idle", "detail": "", "paused": False, "model": "demo",
            "model_version": "1.0.0", "teach": teach}), qos=1, retain=True).wait_for_publish(5)

    pub.publish("smartbin/taught/availability", "online", qos=1,
                retain=True).wait_for_publish(5)
    try:
        yield dashboard, state
    finally:
        pub.loop_stop()
        pub.disconnect()
        assert dashboard.stop() == 0, "".join(dashboard.stderr)[-2000:]
        broker.stop()


def teach_text(page, pattern: str) -> str:
    page.wait_for_function(
        "(p) => new RegExp(p).test((document.querySelector('#teach') || {}).textContent)",
        arg=pattern, timeout=WAIT_MS)
    return page.locator("#teach").inner_text()


def test_the_bin_page_shows_a_running_and_an_ended_teach(browser, dash):  # noqa: F811
    dashboard, state = dash
    state({"phase": "features", "done": 120, "total": 260, "started": FINISHED - 60,
           "finished": None, "finished_at": None, "margin": 2.0, "result": None,
           "error": None})
    context = browser.new_context(timezone_id="UTC", locale="en-GB")
    page = login(context, dashboard.url)
    page.goto(dashboard.url + "bin/taught")
    assert teach_text(page, "^features") == "features 120 / 260"
    state({"phase": "done", "done": 1, "total": 1, "started": FINISHED - 60,
           "finished": FINISHED, "finished_at": "2026-06-01T08:00:00Z", "margin": 2.0,
           "result": {"model": "demo", "version": "1.0.0+teach.20261128T1305Z"},
           "error": None})
    # Ended: no steps left over from the last phase, the time it ended, the version.
    assert teach_text(page, "^done") == \
        "done 01/06/2026 08:00:00 · model 1.0.0+teach.20261128T1305Z"
    state({"phase": "failed", "done": 3, "total": 40, "started": FINISHED - 60,
           "finished": FINISHED, "finished_at": "2026-06-01T08:00:00Z", "margin": 2.0,
           "result": None, "error": "the service stopped during the teach (phase features); "
                                    "nothing was installed: send teach again"})
    assert teach_text(page, "^failed") == (
        "failed 01/06/2026 08:00:00 · the service stopped during the teach (phase features); "
        "nothing was installed: send teach again")
    context.close()
