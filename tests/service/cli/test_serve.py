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
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.factories import make_run
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


def _another_model(run_dir: Path, index_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    return make_run(tmp_path / "other", seed=7), index_dir


def _truncated_weights(run_dir: Path, index_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    damaged = Path(shutil.copytree(run_dir, tmp_path / "damaged-run"))
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return damaged, index_dir


def _index_is_a_file(run_dir: Path, index_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.rmtree(index_dir)
    index_dir.write_text("not a gallery\n")
    return run_dir, index_dir


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_another_model, "not the ones the gallery was built with"),
        (_truncated_weights, "cannot load weights"),
        (_index_is_a_file, "cannot open the gallery"),
    ],
    ids=["another-model", "truncated-weights", "index-is-a-file"],
)
def test_a_run_or_gallery_that_cannot_be_served_is_one_error_line_and_status_2(
    run_dir: Path, index_dir: Path, tmp_path: Path, damage: Any, says: str
) -> None:
    """Found before the server starts or while it loads, the reason is one ``error:`` line and the exit
    status is 2 (the CLI's convention), not uvicorn's traceback and status 3."""
    run, index = damage(run_dir, index_dir, tmp_path)
    proc = start(serve_command(run, index, free_port()), tmp_path)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], output[-3000:]


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--port", "99999"], {}, "port: Input should be less than or equal to 65535, got 99999 (--port)"),
        ([], {"MODRET_MAX_QUEUE": "abc"}, "max_queue: Input should be a valid integer"),
        ([], {"MODRET_HEADER_TIMEOUT_S": "0"}, "header_timeout_s: Input should be greater than 0"),
    ],
    ids=["port-out-of-range", "env-not-a-number", "env-out-of-range"],
)
def test_an_invalid_setting_is_one_error_line_and_status_2(
    run_dir: Path, index_dir: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    command = ["serve", "--run", str(run_dir), "--index", str(index_dir), *args]
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert says in result.output and "Traceback" not in result.output, result.output
    source = f"({args[0]})" if args else f"({next(iter(env))})"  # where the bad value came from
    assert source in result.output, result.output
