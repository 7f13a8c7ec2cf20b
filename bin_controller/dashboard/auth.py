"""Who may look and who may act: passwords, sessions, CSRF tokens, slowing down guessing.

Two roles: `admin` (the dashboard password) sees and acts; `viewer` (the optional viewer
password, a lobby screen) sees everything and is refused every action. Sessions live in
memory: a restart of the dashboard logs everyone out, which is the safe side.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

ADMIN = "admin"
VIEWER = "viewer"

IDLE_S = 12 * 3600  # a session unused this long ends
MAX_AGE_S = 7 * 86400  # and every session ends after a week
MAX_SESSIONS = 1000  # the oldest goes first: a login flood cannot fill memory
# Failed logins from one address: after FREE_FAILURES, each further attempt waits twice as
# long as the one before (1 s, 2 s, 4 s ... at most LOCK_MAX_S).
FREE_FAILURES = 3
LOCK_MAX_S = 60.0
FORGET_FAILURES_S = 900.0
MAX_TRACKED = 10000


def _digest(text: str) -> bytes:
    # Compared as digests: compare_digest then takes the same time whatever the lengths.
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass
class Session:
    token: str
    role: str
    csrf: str
    created: float
    seen: float


class Auth:
    def __init__(self, *, password: str, viewer_password: str | None = None,
                 clock: Callable[[], float] = time.monotonic, idle_s: float = IDLE_S,
                 max_age_s: float = MAX_AGE_S) -> None:
        self._admin = _digest(password)
        self._viewer = _digest(viewer_password) if viewer_password else None
        self.clock = clock
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.sessions: dict[str, Session] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, last time)

    # ------------------------------------------------------------------ passwords

    def role_for(self, password: str) -> str | None:
        given = _digest(password)
        admin = hmac.compare_digest(given, self._admin)
        viewer = self._viewer is not None and hmac.compare_digest(given, self._viewer)
        return ADMIN if admin else VIEWER if viewer else None

    def wait_s(self, address: str) -> float:
        """Seconds before `address` may try another password (0: now)."""
        count, last = self._failures.get(address, (0, 0.0))
        if count < FREE_FAILURES:
            return 0.0
        lock = min(2.0 ** (count - FREE_FAILURES), LOCK_MAX_S)
        return max(0.0, last + lock - self.clock())

    def failed(self, address: str) -> None:
        now = self.clock()
        count, last = self._failures.get(address, (0, now))
        if now - last > FORGET_FAILURES_S:
            count = 0
        if len(self._failures) >= MAX_TRACKED and address not in self._failures:
            self._failures.pop(next(iter(self._failures)))
        self._failures[address] = (count + 1, now)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    # ------------------------------------------------------------------ sessions

    def start(self, role: str) -> Session:
        now = self.clock()
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions.values(), key=lambda s: s.seen)
            del self.sessions[oldest.token]
        session = Session(token=secrets.token_urlsafe(32), role=role,
                          csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self.sessions[session.token] = session
        return session

    def session(self, token: str | None) -> Session | None:
        """The live session of a cookie's token; an expired one is ended."""
        if not token:
            return None
        found = self.sessions.get(token)
        if found is None:
            return None
        now = self.clock()
        if now - found.seen > self.idle_s or now - found.created > self.max_age_s:
            del self.sessions[token]
            return None
        found.seen = now
        return found

    def end(self, token: str | None) -> None:
        if token:
            self.sessions.pop(token, None)


def csrf_ok(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                     session.csrf.encode("ascii"))


def new_token() -> str:
    return secrets.token_urlsafe(32)
