"""The dashboard's access rules over HTTP (aiohttp's test server, no browser), its MQTT
bridge against a real mosquitto, and the `smartbin dashboard` command."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bin_controller.config import MqttSection
from bin_controller.dashboard.auth import FREE_FAILURES, Auth
from bin_controller.dashboard.bridge import Bridge, BridgeError
from bin_controller.dashboard.fleet import Fleet
from bin_controller.dashboard.history import History
from bin_controller.dashboard.web import CSRF_HEADER, SESSION_COOKIE, Dashboard, Hub, make_app
from bin_controller.mqtt.connection import Connection
from tests.dashboard_support import PASSWORD, VIEWER_PASSWORD, DashboardProcess, SimBin
from tests.test_cli import smartbin

P = "smartbin"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_dashboard(tmp_path: Path, clock: Clock | None = None) -> Dashboard:
    fleet = Fleet(P)
    fleet.take(f"{P}/b1/counts", b'{"recyclable": 1, "kitchen": 0, "hazardous": 0, '
                                 b'"other": 0, "total": 1}')
    history = History(tmp_path / "h.db")
    auth = Auth(password=PASSWORD, viewer_password=VIEWER_PASSWORD,
                **({"clock": clock} if clock else {}))
    return Dashboard(fleet=fleet, history=history, auth=auth, bridge=None,
                     hub=Hub(fleet, history))


def serve(tmp_path: Path, scenario, clock: Clock | None = None) -> None:
    """Run `scenario(client)` against the app (no MQTT: commands answer 503)."""
    async def main() -> None:
        client = TestClient(TestServer(make_app(make_dashboard(tmp_path, clock))))
        await client.start_server()
        try:
            await scenario(client)
        finally:
            await client.close()

    asyncio.run(main())


async def log_in(client: TestClient, password: str = PASSWORD, *, csrf: str | None = None,
                 headers: dict | None = None):
    page = await client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', await page.text()).group(1)
    return await client.post("/login", data={"password": password, "next": "/",
                                              "csrf": token if csrf is None else csrf},
                              allow_redirects=False, headers=headers or {})


async def session_csrf(client: TestClient) -> str:
    return (await (await client.get("/api/session")).json())["csrf"]


# ---------------------------------------------------------------------- access


def test_everything_but_the_login_page_needs_a_session(tmp_path):
    async def scenario(client: TestClient) -> None:
        r = await client.get("/", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login?next=/"
        r = await client.get("/bin/b1", allow_redirects=False)
        assert r.status == 303
        for path in ("/api/fleet", "/api/stream", "/api/bins/b1/history"):
            assert (await client.get(path)).status == 401, path
        assert (await client.post("/api/bins/b1/cmd/pause", json={})).status == 401
        r = await client.get("/login")
        assert r.status == 200 and 'type="password"' in await r.text()
        assert (await client.get("/static/app.css")).status == 200

    serve(tmp_path, scenario)


def test_wrong_password_is_401_with_the_login_page_again(tmp_path):
    async def scenario(client: TestClient) -> None:
        r = await log_in(client, "nope")
        assert r.status == 401
        text = await r.text()
        assert "Wrong password." in text and 'type="password"' in text
        assert SESSION_COOKIE not in r.cookies
        assert (await client.get("/api/fleet")).status == 401

    serve(tmp_path, scenario)


def test_login_sets_a_strict_http_only_cookie(tmp_path):
    async def scenario(client: TestClient) -> None:
        r = await log_in(client)
        assert r.status == 303 and r.headers["Location"] == "/"
        cookie = r.cookies[SESSION_COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert not cookie["secure"]  # plain http on 127.0.0.1
        assert len(cookie.value) >= 40
        fleet = await (await client.get("/api/fleet")).json()
        assert fleet["bins"][0]["counts"]["total"] == 1
        # Behind a proxy that says the request came over https, the cookie is Secure.
        client.session.cookie_jar.clear()
        r = await log_in(client, headers={"X-Forwarded-Proto": "https"})
        assert r.cookies[SESSION_COOKIE]["secure"]

    serve(tmp_path, scenario)


def test_the_login_form_needs_its_csrf_token(tmp_path):
    async def scenario(client: TestClient) -> None:
        r = await log_in(client, csrf="forged")
        assert r.status == 403
        assert SESSION_COOKIE not in r.cookies
        r = await client.post("/login", data={"password": PASSWORD}, allow_redirects=False)
        assert r.status == 403

    serve(tmp_path, scenario)


def test_actions_need_the_csrf_token_the_origin_and_the_admin_role(tmp_path):
    async def scenario(client: TestClient) -> None:
        await log_in(client)
        csrf = await session_csrf(client)
        url = "/api/bins/b1/cmd/pause"
        r = await client.post(url, json={})
        assert r.status == 403 and "CSRF" in (await r.json())["error"]
        r = await client.post(url, json={}, headers={CSRF_HEADER: "x" + csrf[1:]})
        assert r.status == 403
        r = await client.post(url, json={}, headers={CSRF_HEADER: csrf,
                                                     "Origin": "http://evil.example"})
        assert r.status == 403 and "Origin" in (await r.json())["error"]
        # With both, the request passes the guard (and finds no MQTT here: 503).
        origin = f"http://{client.host}:{client.port}"
        r = await client.post(url, json={}, headers={CSRF_HEADER: csrf, "Origin": origin})
        assert r.status == 503
        # The read-only login sees everything and may do nothing.
        client.session.cookie_jar.clear()
        await log_in(client, VIEWER_PASSWORD)
        session = await (await client.get("/api/session")).json()
        assert session["role"] == "viewer"
        assert (await client.get("/api/fleet")).status == 200
        for path in (url, "/api/bins/b1/review/accept", "/api/bins/b1/cmd/teach"):
            r = await client.post(path, json={"seq": 1} if "review" in path else {},
                                  headers={CSRF_HEADER: session["csrf"]})
            assert r.status == 403 and "read-only" in (await r.json())["error"], path

    serve(tmp_path, scenario)


def test_a_bad_command_body_is_400_naming_the_field(tmp_path):
    async def scenario(client: TestClient) -> None:
        await log_in(client)
        headers = {CSRF_HEADER: await session_csrf(client)}
        cases = [
            ("/api/bins/b1/cmd/sort_next", {"bin": "garden"}, "bin"),
            ("/api/bins/b1/cmd/sort_next", {}, "bin"),
            ("/api/bins/b1/cmd/pause", {"force": True}, "force"),
            ("/api/bins/b1/cmd/calibrate", {"bin": 3}, "bin"),
            ("/api/bins/b1/cmd/reload_model", {"bundle": ""}, "bundle"),
            ("/api/bins/b1/review/label", {"seq": 1, "label": ""}, "label"),
            ("/api/bins/b1/review/label", {"seq": "1", "label": "cup"}, "seq"),
            ("/api/bins/b1/review/label", {"seq": 1, "label": "cup", "bin": "x"}, "bin"),
            ("/api/bins/b1/review/accept", {"seq": True}, "seq"),
        ]
        for url, body, field in cases:
            r = await client.post(url, json=body, headers=headers)
            answer = await r.json()
            assert r.status == 400 and answer["field"] == field, (url, body, answer)
            assert field in answer["error"]
        for raw in (b"[1]", b"{", b'"x"', b"\xff"):
            r = await client.post("/api/bins/b1/cmd/pause", data=raw, headers=headers)
            assert r.status == 400 and (await r.json())["field"] == "body"
        assert (await client.post("/api/bins/b1/cmd/reset_counts", json={},
                                  headers=headers)).status == 404
        assert (await client.post("/api/bins/nope/cmd/pause", json={},
                                  headers=headers)).status == 404
        r = await client.get("/api/bins/b1/history?hours=abc")
        assert r.status == 400 and (await r.json())["field"] == "hours"

    serve(tmp_path, scenario)


def test_sessions_expire(tmp_path):
    clock = Clock()

    async def scenario(client: TestClient) -> None:
        await log_in(client)
        assert (await client.get("/api/fleet")).status == 200
        clock.t += 11 * 3600  # used within the idle limit: still good
        assert (await client.get("/api/fleet")).status == 200
        clock.t += 12 * 3600 + 1  # idle too long
        assert (await client.get("/api/fleet")).status == 401

    serve(tmp_path, scenario, clock)


def test_repeated_wrong_passwords_are_slowed_down(tmp_path):
    clock = Clock()

    async def scenario(client: TestClient) -> None:
        for _ in range(FREE_FAILURES):
            assert (await log_in(client, "guess")).status == 401
        r = await log_in(client, PASSWORD)  # even the right one must wait now
        assert r.status == 429 and "try again" in await r.text()
        clock.t += 1.5
        assert (await log_in(client, "guess")).status == 401
        r = await log_in(client, "guess")  # the wait doubled
        assert r.status == 429
        clock.t += 2.5
        assert (await log_in(client, PASSWORD)).status == 303

    serve(tmp_path, scenario, clock)


def test_pages_set_a_strict_content_security_policy(tmp_path):
    async def scenario(client: TestClient) -> None:
        await log_in(client)
        for path in ("/", "/bin/b1", "/login", "/api/fleet"):
            r = await client.get(path)
            assert "script-src 'self'" in r.headers["Content-Security-Policy"], path
            assert r.headers["X-Content-Type-Options"] == "nosniff"

    serve(tmp_path, scenario)


# ---------------------------------------------------------------------- the bridge


class FakeBin:
    """A bin's command side: answers cmd/<name> on reply/<name>, echoing the id, in the
    order the test chooses."""

    def __init__(self, port: int, bin_id: str = "b1") -> None:
        self.base = f"{P}/{bin_id}"
        self.received: list[tuple[str, dict]] = []
        self.hold: dict[str, float] = {}  # command -> seconds before its reply
        self.silent: set[str] = set()
        self.ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{self.base}/cmd/#", 1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        name = msg.topic.rsplit("/", 1)[1]
        args = json.loads(msg.payload)
        self.received.append((name, args))
        if name in self.silent:
            return

        def answer() -> None:
            time.sleep(self.hold.get(name, 0))
            if name == "review_photo":
                client.publish(f"{self.base}/reply/review_photo/{args['seq']}", b"\xff\xd8JPEG",
                               qos=1)
            # A reply to someone else's request first: it must not be taken for ours.
            client.publish(f"{self.base}/reply/{name}",
                           json.dumps({"ok": True, "id": "not-yours", "name": "decoy"}), qos=1)
            client.publish(f"{self.base}/reply/{name}",
                           json.dumps({"ok": True, "id": args["id"], "name": name}), qos=1)

        threading.Thread(target=answer, daemon=True).start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def bridge_for(port: int, messages: list, timeout: float = 5.0) -> Bridge:
    connection = Connection(MqttSection(enabled=True, host="127.0.0.1", port=port),
                            client_id=f"dash-test-{time.monotonic_ns()}")
    return Bridge(connection, P, on_message=lambda t, p: messages.append((t, p)),
                  timeout=lambda name: timeout)


def test_each_command_gets_its_own_reply(broker):
    fake = FakeBin(broker.port)
    messages: list = []

    async def scenario() -> None:
        bridge = bridge_for(broker.port, messages)
        bridge.start(asyncio.get_running_loop())
        try:
            while not bridge.connection.subscribed.is_set():
                await asyncio.sleep(0.02)
            fake.hold["calibrate"] = 0.5  # answered after the pause sent later
            slow = asyncio.create_task(bridge.request("b1", "calibrate", {"bin": "other"}))
            await asyncio.sleep(0.1)
            fast = await bridge.request("b1", "pause", {})
            assert not slow.done()
            assert fast["name"] == "pause" and fast["id"] != "not-yours"
            assert (await slow)["name"] == "calibrate"
            reply, photo = await bridge.photo("b1", 42)
            assert reply["ok"] is True and photo == b"\xff\xd8JPEG"
        finally:
            bridge.stop()

    try:
        asyncio.run(scenario())
    finally:
        fake.close()
    sent = dict(fake.received)
    assert sent["calibrate"]["bin"] == "other" and len(sent["pause"]["id"]) == 16
    assert sent["review_photo"]["seq"] == 42
    # Replies went to the requests, never to the fleet view.
    assert not [t for t, _ in messages if "/reply/" in t]


def test_a_command_without_a_reply_times_out_clearly(broker):
    fake = FakeBin(broker.port)
    fake.silent.add("teach")

    async def scenario() -> None:
        bridge = bridge_for(broker.port, [], timeout=0.5)
        bridge.start(asyncio.get_running_loop())
        try:
            while not bridge.connection.subscribed.is_set():
                await asyncio.sleep(0.02)
            with pytest.raises(BridgeError, match=r"no reply from bin 'b1' to teach within"):
                await bridge.request("b1", "teach", {})
            assert not bridge._pending  # nothing left waiting
        finally:
            bridge.stop()

    try:
        asyncio.run(scenario())
    finally:
        fake.close()


def test_a_command_while_the_broker_is_away_is_refused_at_once():
    async def scenario() -> None:
        bridge = bridge_for(1, [])  # nothing listens on port 1
        with pytest.raises(BridgeError, match="not connected"):
            await bridge.request("b1", "pause", {})

    asyncio.run(scenario())


# ---------------------------------------------------------------------- the command


def test_no_password_or_a_bad_option_is_one_line_and_exit_2(tmp_path):
    r = smartbin("dashboard", "--mqtt", "127.0.0.1:1", "--history", str(tmp_path / "h.db"),
                 env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "smartbin: error: no dashboard password: give --password-file FILE or the systemd "
        "credential dashboard_password"]
    (tmp_path / "empty").write_text("\n")
    r = smartbin("dashboard", "--mqtt", "127.0.0.1:1", "--password-file",
                 str(tmp_path / "empty"))
    assert r.returncode == 2 and "is empty" in r.stderr and len(r.stderr.splitlines()) == 1
    r = smartbin("dashboard", "--mqtt", "127.0.0.1:1", "--password-file",
                 str(tmp_path / "empty"), "--listen", "localhost")
    assert r.returncode == 2 and "--listen 'localhost'" in r.stderr
    (tmp_path / "pw").write_text("secret\n")
    for args, words in ((["--history", str(tmp_path)], "--history"),
                        (["--tls", "--ca-file", str(tmp_path / "nope.pem")], "--ca-file"),
                        (["--prefix", "a/b"], "--prefix"),
                        (["--viewer-password-file", str(tmp_path / "pw")], "same as")):
        r = smartbin("dashboard", "--mqtt", "127.0.0.1:1", "--password-file",
                     str(tmp_path / "pw"), "--listen", "127.0.0.1:0", *args)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_the_credential_and_the_state_directory_are_used(tmp_path, broker):
    import os
    import signal
    import subprocess
    import sys

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dashboard_password").write_text("from systemd\n")
    state = tmp_path / "state"
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "STATE_DIRECTORY": str(state)}
    proc = subprocess.Popen([sys.executable, "-m", "bin_controller", "dashboard", "--mqtt",
                             f"127.0.0.1:{broker.port}", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline().strip()
        url = re.fullmatch(r"smartbin dashboard listening on (http://127\.0\.0\.1:\d+/)",
                           line).group(1)
        assert (state / "dashboard.db").is_file()
        page = urllib.request.urlopen(url + "login").read().decode()
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        data = urllib.parse.urlencode({"password": "from systemd", "csrf": token}).encode()
        request = urllib.request.Request(url + "login", data=data, headers={
            "Cookie": f"smartbin_login={token}"})
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as answer:
            opener.open(request)
        assert answer.value.code == 303  # logged in, sent on to the fleet page
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_a_restarted_dashboard_keeps_its_history(tmp_path, broker, demo):
    sim = SimBin(broker.port, demo, tmp_path / "state", "keep")
    try:
        first = DashboardProcess(tmp_path / "d", broker.port)
        sim.drop(3)
        deadline = time.monotonic() + 20
        while True:
            db = sqlite3.connect(first.history)
            try:
                n = db.execute("SELECT COUNT(*) FROM events WHERE bin_id = 'keep'").fetchone()[0]
            finally:
                db.close()
            if n == 3:
                break
            assert time.monotonic() < deadline, n
            time.sleep(0.1)
        assert first.stop() == 0
        second = DashboardProcess(tmp_path / "d", broker.port)
        try:
            charts = History(second.history).charts("keep", hours=1)
            assert sum(sum(v) for v in charts["per_hour"].values()) == 3
        finally:
            assert second.stop() == 0
    finally:
        sim.close()


@pytest.mark.parametrize("option", ["--password-file", "--viewer-password-file", "--history",
                                    "--mqtt-password-file", "--ca-file", "--cert-file",
                                    "--key-file"])
def test_nul_in_a_file_option_is_one_line(capsys, option):
    from bin_controller.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["dashboard", "--mqtt", "127.0.0.1", option, "a\0b"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: the path 'a\\x00b' must not contain a NUL character" in err
    assert "Traceback" not in err
