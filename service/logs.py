"""Structured logs: one JSON object per line on stderr.

Extra fields go in ``extra={"fields": {...}}``; only those and the standard ones are written, so a log
call can never leak a request body or a key by accident.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines for the ``service`` loggers and uvicorn's; uvicorn's own access log is replaced by ours.
    Any other library's warnings and errors, and ``warnings.warn`` messages, go through the root logger
    as JSON lines too (left alone, Python would print them to stderr as plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("service", "uvicorn", "uvicorn.error", "index", "model"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    root = logging.getLogger()  # others' handlers (a test runner's) stay; an earlier call's JSON one goes
    root.handlers = [h for h in root.handlers if not isinstance(h.formatter, JsonFormatter)] + [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the root's JSON handler
    logging.getLogger("uvicorn.access").disabled = True
    # python-multipart warns about every malformed body it is given: the request log's 400 already says so.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
