"""A ``modret`` server in a subprocess, as a user starts one: a free loopback port to give it, the start
in a process group of its own, and a wait until it reports ready (or a failure that shows what it
printed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest


def start(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``command`` in ``cwd`` in a process group of its own (as a shell runs a foreground job, so that
    ``os.killpg`` is a terminal's Ctrl-C); output merged and piped; by default no ``MODRET_*`` of ours."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODRET_")}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[str], port: int | str, timeout: float = 120) -> None:
    """Until ``/v2/health/ready`` on ``port`` answers 200; fails with ``proc``'s output (stdout, merged
    stderr) if it exits first or takes longer than ``timeout`` (it is then killed, with its group)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before it was ready:\n{proc.communicate()[0][-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"not ready in {timeout} s:\n{proc.communicate()[0][-3000:]}")
