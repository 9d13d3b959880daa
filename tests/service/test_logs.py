"""Structured logs: every line the service writes to stderr is one JSON object, whoever logs it."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, warnings
from service.logs import configure_logging
configure_logging("INFO")
logging.getLogger("service.api").info("ours", extra={"fields": {"status": 400}})
logging.getLogger("some.library").warning("a library warns")
logging.getLogger("some.library").info("a library's info stays out")
logging.getLogger("python_multipart.multipart").warning("Expected boundary character %r", "-")
logging.getLogger("python_multipart.multipart").error("a multipart error still shows")
warnings.warn("a library's UserWarning")
"""


def test_every_stderr_line_is_json_including_other_libraries_warnings():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    entries = [json.loads(line) for line in result.stderr.splitlines()]  # a plain-text line fails here
    assert [(e["logger"], e["level"], e["msg"]) for e in entries[:3]] == [
        ("service.api", "info", "ours"),
        ("some.library", "warning", "a library warns"),
        ("python_multipart.multipart", "error", "a multipart error still shows"),
    ]
    assert entries[3]["logger"] == "py.warnings" and "a library's UserWarning" in entries[3]["msg"]
    assert entries[0]["status"] == 400
