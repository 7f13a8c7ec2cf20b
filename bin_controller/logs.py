"""Logging shaped for where it goes: journald gets priorities and no timestamps."""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3) priority prefixes, read by journald from a service's stdout/stderr.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        text = super().format(record)
        # Every line of a multi-line message (a traceback) keeps the priority.
        return "\n".join(prefix + line for line in text.splitlines())


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        # journald stamps each line itself: a second timestamp would only be noise.
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
