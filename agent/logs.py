"""Logging for a daemon and a command: one setup, local time with its offset, text or JSON.

Text lines read ``2026-11-29T14:03:07.512+01:00 INFO agent.node: …``; with JSON each line
is one object (``ts``, ``level``, ``logger``, ``thread``, ``msg``, and ``exc`` when there
is a traceback), for journald, Loki or anything else that parses lines.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
               "thread": record.threadName, "msg": record.getMessage()}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup(level: str, *, json_lines: bool = False, paho_debug: bool = False, stream: TextIO | None = None) -> None:
    """Configure the root logger once (later calls replace the handler)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_edge_agent", False):
            root.removeHandler(old)
    handler._edge_agent = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    logging.getLogger("agent.bus.paho").setLevel(logging.DEBUG if paho_debug else logging.WARNING)
