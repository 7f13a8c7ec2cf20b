"""The dashboard's routes: pages, the JSON API, the live stream (server-sent events).

Everything runs on one asyncio loop: MQTT messages (from the bridge), the fleet view, the
history database and every request. Access is checked in one middleware: a session for
everything but the login page and the static files; on every POST the request's Origin,
the session's CSRF token (header X-CSRF-Token) and the admin role.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from bin_controller.bins import BINS
from bin_controller.dashboard.auth import ADMIN, Auth, Session, csrf_ok, new_token
from bin_controller.dashboard.bridge import Bridge, BridgeError
from bin_controller.dashboard.fleet import Fleet, bin_id_ok
from bin_controller.dashboard.history import MAX_HOURS, History
from bin_controller.payloads import MAX_JSON_BYTES, JsonObject, parse_json

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "smartbin_session"
LOGIN_COOKIE = "smartbin_login"  # the login form's CSRF token, before any session
CSRF_HEADER = "X-CSRF-Token"
STREAM_QUEUE = 2000  # messages waiting for one page; a page that falls behind reconnects
KEEPALIVE_S = 15.0
COALESCE_S = 0.2  # bin snapshots to the pages at most this often (items go at once)
PHOTO_CACHE = 64
MAX_LABEL = 100
MAX_SEQ = 2**53

CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


# ---------------------------------------------------------------------- live stream


@dataclass(eq=False)  # each page's stream is its own, kept in a set
class Client:
    bin_id: str | None  # None: the whole fleet
    token: str = ""  # the session it was opened in: a logout ends its stream
    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(STREAM_QUEUE))
    behind: bool = False


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Hub:
    """Fans MQTT changes out to every open page; also writes the history."""

    def __init__(self, fleet: Fleet, history: History) -> None:
        self.fleet = fleet
        self.history = history
        self.clients: set[Client] = set()
        self.broker = False  # whether the dashboard is connected to the MQTT broker
        self._dirty: set[str] = set()
        self._flush: asyncio.TimerHandle | None = None

    def on_message(self, topic: str, payload: bytes) -> None:
        for kind, data in self.fleet.take(topic, payload):
            if kind == "item":
                if self.history.add_event(data["bin"], data["item"]):
                    self._send(data["bin"], sse("item", data))
            elif kind == "fault":
                if self.history.add_fault(data["bin"], data):
                    self._send(data["bin"], sse("fault", data))
            elif kind == "bin":
                self.history.add_sample(data["id"], data["contamination"])
                self._dirty.add(data["id"])
        if self._dirty and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(COALESCE_S, self._send_dirty)

    def broker_state(self, connected: bool) -> None:
        self.broker = connected
        for client in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                client.queue.put_nowait(sse("broker", {"connected": connected}))

    def _send_dirty(self) -> None:
        self._flush = None
        dirty, self._dirty = self._dirty, set()
        for bin_id in sorted(dirty):
            view = self.fleet.get(bin_id)
            if view is not None:
                self._send(bin_id, sse("bin", view.snapshot()))

    def _send(self, bin_id: str, message: bytes) -> None:
        for client in list(self.clients):
            if client.bin_id is not None and client.bin_id != bin_id:
                continue
            try:
                client.queue.put_nowait(message)
            except asyncio.QueueFull:
                client.behind = True  # its stream ends; the page reconnects and starts over

    def end_session(self, token: str) -> None:
        for client in self.clients:
            if client.token == token:
                client.behind = True
                with contextlib.suppress(asyncio.QueueFull):
                    client.queue.put_nowait(None)

    def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(asyncio.QueueFull):
                client.queue.put_nowait(None)


# ---------------------------------------------------------------------- the app


class Dashboard:
    def __init__(self, *, fleet: Fleet, history: History, auth: Auth,
                 bridge: Bridge | None, hub: Hub) -> None:
        self.fleet = fleet
        self.history = history
        self.auth = auth
        self.bridge = bridge
        self.hub = hub
        self._photos: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    # ------------------------------------------------------------------ access

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        public = path == "/login" or path.startswith("/static/") or path == "/favicon.ico"
        if public:
            response = await handler(request)
        else:
            session = self.auth.session(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if path.startswith("/api/"):
                    return _error(401, "not logged in (or the session expired)", None)
                raise web.HTTPSeeOther(f"/login?next={_quote(path)}")
            if request.method not in ("GET", "HEAD"):
                refused = self._refused(request, session)
                if refused is not None:
                    return refused
            response = await handler(request)
        _headers(response)
        return response

    def _refused(self, request: web.Request, session: Session) -> web.Response | None:
        if not _same_origin(request):
            return _error(403, "cross-site request refused (Origin does not match)", None)
        if not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return _error(403, f"missing or wrong CSRF token (header {CSRF_HEADER})", None)
        if session.role != ADMIN and request.path != "/logout":
            return _error(403, "read-only login: actions are refused", None)
        return None

    # ------------------------------------------------------------------ login

    async def login_page(self, request: web.Request, *, message: str = "",
                         status: int = 200) -> web.Response:
        token = new_token()
        nxt = _local(request.query.get("next") or "/")
        body = LOGIN_HTML.format(csrf=html.escape(token), next=html.escape(nxt),
                                 message=html.escape(message),
                                 hidden="" if message else " hidden")
        response = web.Response(text=body, content_type="text/html", status=status)
        response.set_cookie(LOGIN_COOKIE, token, path="/login", httponly=True,
                            samesite="Strict", secure=_https(request))
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return await self.login_page(request)
        form = await request.post()
        given = form.get("csrf")
        expected = request.cookies.get(LOGIN_COOKIE)
        if not _same_origin(request) or not isinstance(given, str) or not expected \
                or not csrf_ok(_token_holder(expected), given):
            return await self.login_page(request, status=403, message=(
                "The login form was stale or came from another site; try again."))
        address = request.remote or "?"
        wait = self.auth.wait_s(address)
        if wait > 0:
            return await self.login_page(request, status=429, message=(
                f"Too many wrong passwords: try again in {wait:.0f} s."))
        password = form.get("password")
        role = self.auth.role_for(password) if isinstance(password, str) else None
        if role is None:
            self.auth.failed(address)
            log.warning("dashboard: wrong password from %s", address)
            return await self.login_page(request, status=401, message="Wrong password.")
        self.auth.succeeded(address)
        session = self.auth.start(role)
        nxt = form.get("next")
        response = web.HTTPSeeOther(_local(nxt if isinstance(nxt, str) else "/"))
        response.set_cookie(SESSION_COOKIE, session.token, path="/", httponly=True,
                            samesite="Strict", secure=_https(request),
                            max_age=int(self.auth.max_age_s))
        response.del_cookie(LOGIN_COOKIE, path="/login")
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(SESSION_COOKIE) or ""
        self.auth.end(token)
        self.hub.end_session(token)
        response = web.json_response({"ok": True})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------------ pages, reads

    async def page(self, request: web.Request) -> web.StreamResponse:
        name = "bin.html" if "bin_id" in request.match_info else "fleet.html"
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

    async def session_info(self, request: web.Request) -> web.Response:
        session = self.auth.session(request.cookies.get(SESSION_COOKIE))
        assert session is not None  # the guard let the request in
        return web.json_response({"role": session.role, "csrf": session.csrf,
                                  "prefix": self.fleet.prefix, "bins": list(BINS),
                                  "mqtt": self.bridge is not None and self.bridge.connected})

    async def fleet_json(self, request: web.Request) -> web.Response:
        return web.json_response({"bins": self.fleet.snapshot()})

    def _bin(self, request: web.Request) -> str:
        bin_id = request.match_info["bin_id"]
        if self.fleet.get(bin_id) is None:
            raise web.HTTPNotFound(text=json.dumps({"ok": False, "error": (
                f"no bin {bin_id!r} under the prefix {self.fleet.prefix!r}")}),
                content_type="application/json")
        return bin_id

    async def bin_json(self, request: web.Request) -> web.Response:
        view = self.fleet.get(self._bin(request))
        assert view is not None
        return web.json_response(view.snapshot())

    async def image(self, request: web.Request) -> web.Response:
        view = self.fleet.get(self._bin(request))
        if view is None or view.image is None:
            return _error(404, "no picture from this bin yet", None)
        return web.Response(body=view.image, content_type="image/jpeg",
                            headers={"Cache-Control": "no-store"})

    async def history_json(self, request: web.Request) -> web.Response:
        bin_id = self._bin(request)
        try:
            hours = _query_int(request, "hours", 24, 1, MAX_HOURS)
        except BadRequest as exc:
            return _error(400, str(exc), exc.field)
        return web.json_response(self.history.charts(bin_id, hours=hours or 24))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        bin_id = request.query.get("bin")
        client = Client(bin_id, token=request.cookies.get(SESSION_COOKIE) or "")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        _headers(response)
        await response.prepare(request)
        self.hub.clients.add(client)
        try:
            first = [v.snapshot() for v in self.fleet.bins.values()
                     if bin_id is None or v.bin_id == bin_id]
            await response.write(b"retry: 1000\n\n" + sse("fleet", {
                "bins": first, "broker": self.hub.broker}))
            while not client.behind:
                try:
                    message = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message is None:
                    break
                await response.write(message)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.clients.discard(client)
        return response

    # ------------------------------------------------------------------ commands

    async def _ask(self, bin_id: str, name: str, args: JsonObject) -> web.Response:
        if self.bridge is None:
            return _error(503, "no MQTT connection", None)
        try:
            reply = await self.bridge.request(bin_id, name, args)
        except BridgeError as exc:
            return _error(504, str(exc), None)
        return web.json_response(reply)

    async def command(self, request: web.Request) -> web.Response:
        bin_id = self._bin(request)
        name = request.match_info["name"]
        check = CONTROLS.get(name)
        if check is None:
            return _error(404, f"no control {name!r}; controls: {', '.join(CONTROLS)}", None)
        try:
            args = check(await _body(request))
        except BadRequest as exc:
            return _error(400, str(exc), exc.field)
        return await self._ask(bin_id, name, args)

    async def review_list(self, request: web.Request) -> web.Response:
        bin_id = self._bin(request)
        try:
            before = _query_int(request, "before", None, 1, MAX_SEQ)
            limit = _query_int(request, "limit", 12, 1, 100)
        except BadRequest as exc:
            return _error(400, str(exc), exc.field)
        args: JsonObject = {"limit": limit}
        if request.query.get("queue", "1") != "0":
            args.update(unreviewed=True, uncertain=True, failed=True)
        if before is not None:
            args["before"] = before
        return await self._ask(bin_id, "review_list", args)

    async def review_photo(self, request: web.Request) -> web.Response:
        bin_id = self._bin(request)
        text = request.match_info["seq"]
        if not (text.isascii() and text.isdigit() and len(text) < 16):
            return _error(400, "seq must be a whole number", "seq")
        key = (bin_id, int(text))
        data = self._photos.get(key)
        if data is None:
            if self.bridge is None:
                return _error(503, "no MQTT connection", None)
            try:
                reply, data = await self.bridge.photo(*key)
            except BridgeError as exc:
                return _error(504, str(exc), None)
            if data is None:
                return _error(404, str(reply.get("error") or "no photo"), None)
            self._photos[key] = data
            while len(self._photos) > PHOTO_CACHE:
                self._photos.popitem(last=False)
        return web.Response(body=data, content_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})

    async def review(self, request: web.Request) -> web.Response:
        bin_id = self._bin(request)
        verdict = request.match_info["verdict"]
        try:
            body = await _body(request)
            if verdict == "label":
                args = _label_args(body)
            elif verdict == "accept":
                _only(body, "seq")
                args = {"seq": _seq(body)}
            else:
                return _error(404, f"no review action {verdict!r}; use label or accept", None)
        except BadRequest as exc:
            return _error(400, str(exc), exc.field)
        return await self._ask(bin_id, verdict, args)


# ---------------------------------------------------------------------- request bodies


async def _body(request: web.Request) -> JsonObject:
    raw = await request.read()
    if not raw.strip():
        return {}
    if len(raw) > MAX_JSON_BYTES:
        raise BadRequest("body", f"the body is over {MAX_JSON_BYTES} bytes")
    try:
        data = parse_json(raw, what="the body")
    except ValueError as exc:
        raise BadRequest("body", str(exc)) from None
    if not isinstance(data, dict):
        raise BadRequest("body", "the body must be a JSON object")
    return data


def _only(body: JsonObject, *allowed: str) -> None:
    for key in body:
        if key not in allowed:
            raise BadRequest(key, f"unexpected field {key!r}; allowed: "
                                  f"{', '.join(allowed) or 'none'}")


def _compartment(body: JsonObject) -> str:
    value = body.get("bin")
    if not isinstance(value, str) or value not in BINS:
        raise BadRequest("bin", f"bin must be one of {', '.join(BINS)}")
    return value


def _seq(body: JsonObject) -> int:
    value = body.get("seq")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQ:
        raise BadRequest("seq", "seq must be an item number (a whole number from 1)")
    return value


def _bundle(body: JsonObject) -> JsonObject:
    _only(body, "bundle")
    if "bundle" not in body:
        return {}
    value = body["bundle"]
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL:
        raise BadRequest("bundle", "bundle must be a bundle name")
    return {"bundle": value}


def _nothing(body: JsonObject) -> JsonObject:
    _only(body)
    return {}


def _to_bin(body: JsonObject) -> JsonObject:
    _only(body, "bin")
    return {"bin": _compartment(body)}


def _label_args(body: JsonObject) -> JsonObject:
    _only(body, "seq", "label", "bin")
    label = body.get("label")
    if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL:
        raise BadRequest("label", f"label must be text of 1 to {MAX_LABEL} characters")
    args: JsonObject = {"seq": _seq(body), "label": label.strip()}
    if body.get("bin") is not None:
        args["bin"] = _compartment(body)
    return args


CONTROLS: dict[str, Callable[[JsonObject], JsonObject]] = {
    "pause": _nothing, "resume": _nothing, "sort_next": _to_bin, "calibrate": _to_bin,
    "reload_model": _bundle, "rollback": _bundle, "teach": _nothing}


def _query_int(request: web.Request, name: str, default: int | None, low: int,
               high: int) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) < 17 and low <= int(text) <= high):
        raise BadRequest(name, f"{name} must be a whole number from {low} to {high}")
    return int(text)


# ---------------------------------------------------------------------- helpers


def _error(status: int, message: str, field_name: str | None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error": message}
    if field_name is not None:
        body["field"] = field_name
    return web.json_response(body, status=status)


def _headers(response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")


def _https(request: web.Request) -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def _same_origin(request: web.Request) -> bool:
    """A POST from our own pages: its Origin (browsers send one on every POST) is this
    server's. No Origin at all (a script, curl) still needs the CSRF token."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    scheme = "https" if _https(request) else "http"
    return origin == f"{scheme}://{request.host}"


def _local(path: str) -> str:
    """Only a path on this site to go to after the login (no open redirect)."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path \
            or not path.isprintable():
        return "/"
    return path


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _token_holder(token: str) -> Session:
    return Session(token="", role="", csrf=token, created=0.0, seen=0.0)


def make_app(dashboard: Dashboard) -> web.Application:
    d = dashboard
    app = web.Application(middlewares=[d.guard], client_max_size=MAX_JSON_BYTES * 2)
    app.router.add_route("GET", "/login", d.login)
    app.router.add_route("POST", "/login", d.login)
    app.router.add_post("/logout", d.logout)
    app.router.add_get("/", d.page)
    app.router.add_get("/bin/{bin_id}", d.page)
    app.router.add_get("/api/session", d.session_info)
    app.router.add_get("/api/fleet", d.fleet_json)
    app.router.add_get("/api/stream", d.stream)
    app.router.add_get("/api/bins/{bin_id}", d.bin_json)
    app.router.add_get("/api/bins/{bin_id}/image", d.image)
    app.router.add_get("/api/bins/{bin_id}/history", d.history_json)
    app.router.add_get("/api/bins/{bin_id}/review", d.review_list)
    app.router.add_get("/api/bins/{bin_id}/photo/{seq}", d.review_photo)
    app.router.add_post("/api/bins/{bin_id}/review/{verdict}", d.review)
    app.router.add_post("/api/bins/{bin_id}/cmd/{name}", d.command)
    app.router.add_static("/static/", STATIC, append_version=False)

    async def close_streams(app: web.Application) -> None:
        d.hub.close()

    app.on_shutdown.append(close_streams)
    return app


LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>smartbin · log in</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/app.css"></head>
<body class="login">
<form class="login-box" method="post" action="/login">
  <h1>smartbin</h1>
  <p class="error" id="login-error"{hidden}>{message}</p>
  <label for="password">Password</label>
  <input type="password" id="password" name="password" autocomplete="current-password"
         autofocus required>
  <input type="hidden" name="csrf" value="{csrf}">
  <input type="hidden" name="next" value="{next}">
  <button type="submit">Log in</button>
</form>
</body></html>
"""

__all__ = ["Dashboard", "Hub", "bin_id_ok", "make_app"]
