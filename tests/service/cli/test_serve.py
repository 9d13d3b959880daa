"""``modret serve`` stops cleanly on a signal: Ctrl-C (SIGINT) or SIGTERM ends a graceful shutdown with
exit status 0, so ``make demo`` (which runs ``modret demo``, served the same way) prints no
``make: *** Error 130``. Real processes: the installed ``modret`` entry point, a real uvicorn server on a
free loopback port, the signal sent to the whole process group as a terminal's Ctrl-C is."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.processes import free_port, start, wait_ready

MODRET = Path(sys.executable).with_name("modret")


def serve_command(run_dir: Path, index_dir: Path, port: int) -> list[str]:
    return [str(MODRET), "serve", "--run", str(run_dir), "--index", str(index_dir), "--port", str(port)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_serve_gracefully_with_status_0(
    run_dir: Path, index_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    port = free_port()
    proc = start(serve_command(run_dir, index_dir, port), tmp_path)
    wait_ready(proc, port)
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert "Application shutdown complete" in output and "Traceback" not in output, output[-3000:]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_ctrl_c_ends_a_make_target_without_an_error(run_dir: Path, index_dir: Path, tmp_path: Path) -> None:
    """The symptom itself: a Makefile target serving, interrupted as a terminal interrupts it."""
    port = free_port()
    recipe = " ".join(serve_command(run_dir, index_dir, port))
    (tmp_path / "Makefile").write_text(f"serve:\n\t{recipe}\n")
    proc = start(["make", "serve"], tmp_path)
    wait_ready(proc, port)
    os.killpg(proc.pid, signal.SIGINT)  # make and modret both get it, as from a terminal's Ctrl-C
    output, _ = proc.communicate(timeout=60)
    assert "***" not in output and "Traceback" not in output, output[-3000:]
    assert "Application shutdown complete" in output, output[-3000:]
