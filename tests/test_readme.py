"""The README, walked through as a newcomer walks it, so that it fails when the README drifts.

- Quick start: the README opens with exactly two set-up commands, ``make demo`` and ``make test``; ``make
  -n`` shows each ends in the venv's own command (the demo itself, served and searched with its printed
  ``curl``, is tests/service/cli/test_demo.py).
- No command shown calls a bare ``modret``: ``make`` installs into ``.venv``, which is not on ``PATH``.
- "Your own images": a folder laid out as its ``labels.csv`` example shows (tests/folders.py draws it),
  then every command of its block run as written, in order, by bash in a fresh directory that holds only
  that folder and ``.venv``. Two things differ from a user's terminal, both ways the README itself gives:
  ``MODRET_TRAIN_STEPS`` (which it names for a first try) keeps training to seconds, and the port 8000 it
  shows is swapped for a free one so the test never collides with a running server. ``modret serve`` runs
  in the background until it is ready (the README's "from a second terminal").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.folders import HEADER, write_shirts
from tests.processes import free_port, start, wait_ready

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
OWN_DATA = "## Your own images"
SERVE = ".venv/bin/modret serve "


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(text) if lang == language]


def commands(block: str) -> list[str]:
    """A shell block's commands: its lines without comments (a command is one line in this README)."""
    lines = (line.split(" # ")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def section(title: str) -> str:
    start = README.index(title + "\n")
    end = README.find("\n## ", start + len(title))
    return README[start : end if end != -1 else len(README)]


def test_the_readme_opens_with_the_two_set_up_commands() -> None:
    assert commands(blocks(README, "bash")[0]) == ["make demo", "make test"]
    for target, last in (("demo", ".venv/bin/modret demo"), ("test", ".venv/bin/pytest")):
        # Run inside `make test` the child make would print "Entering directory" lines: a clean environment.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        plan = subprocess.run(
            ["make", "--no-print-directory", "-n", target],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert plan.returncode == 0, plan.stderr
        assert plan.stdout.strip().splitlines()[-1] == last, plan.stdout


def test_no_command_shown_needs_modret_on_the_path() -> None:
    bare = [c for block in blocks(README, "bash") for c in commands(block) if re.match(r"modret\b", c)]
    assert not bare, f"these README commands need `modret` on PATH, which `make` does not put it on: {bare}"


def test_the_own_data_walk_through_runs_as_written(tmp_path: Path) -> None:
    text = section(OWN_DATA)
    example = blocks(text, "csv")[0].splitlines()
    assert example[0] == HEADER  # the layout the folder below is written in
    write_shirts(tmp_path / "my_images", count=80)  # 8 in the test split
    written = (tmp_path / "my_images" / "labels.csv").read_text().splitlines()
    assert written[1 : len(example)] == example[1:], "the README's example rows are the folder's first rows"
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the clone's .venv, where `make` installed modret
    assert "MODRET_TRAIN_STEPS=" in text  # the fast setting used below is one the README shows

    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODRET_")}
    env["MODRET_TRAIN_STEPS"] = "3"
    steps = commands(blocks(text, "bash")[0])
    assert [c.split()[:3] for c in steps if c.startswith(".venv/bin/modret")] == [
        [".venv/bin/modret", "train", "--dataset"], [".venv/bin/modret", "eval", "--run"],
        [".venv/bin/modret", "index", "build"], [".venv/bin/modret", "index", "verify"],
        [".venv/bin/modret", "serve", "--run"],
    ]  # fmt: skip
    server: subprocess.Popen[str] | None = None
    outputs: dict[str, str] = {}
    try:
        for command in steps:
            shown = command.replace("--port 8000", f"--port {port}").replace(":8000/", f":{port}/")
            if command.startswith(SERVE):
                server = start(["bash", "-c", shown], tmp_path, env)
                wait_ready(server, port)
                continue
            done = subprocess.run(
                ["bash", "-c", shown], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            outputs[command] = done.stdout
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the README says
            server.wait(timeout=60)
    assert server is not None and server.returncode == 0  # Ctrl-C is a clean stop

    first, filtered = (json.loads(out) for command, out in outputs.items() if command.startswith("curl"))
    assert first["task"] == "colour" and len(first["results"]) == 5
    # the gallery kept labels.csv's names: shown on every result, and the filter matches them
    assert {r["labels"]["colour"] for r in first["results"]} <= {"red", "green", "blue"}
    assert filtered["task"] == "sleeves" and len(filtered["results"]) == 5
    assert all(r["labels"]["colour"] == "green" for r in filtered["results"])
    assert (tmp_path / "runs" / "mine" / "model.safetensors").is_file()
    assert not (tmp_path / "runs" / "mine" / "checkpoint.pt").exists()
