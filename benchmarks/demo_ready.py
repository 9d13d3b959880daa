"""Benchmark: how long ``modret demo`` takes to be ready, as a newcomer starts it (not a test).

Three measurements, each printed and written as JSON:

- ``--clone``: ``git clone`` of the repository (its committed state, shipped demo model included) into a
  scratch directory, then the Makefile's install (a fresh virtualenv, the CPU torch wheel, ``pip install
  -e .``), timed apart from the demo.
- ``ready``: ``modret demo`` (of the clone when ``--clone``, else of this checkout's virtualenv) on an
  empty data directory: seconds from launching the process to the banner (the wall clock seen from
  here) and the "ready in X s" the banner prints (counted from process start), plus the demo's own
  lines (model reused or shipped, index seconds, example check).
- ``index``: embedding the demo gallery with the shipped model as the demo did before issue 16 (batches
  of 64, contiguous tensors) and as it does now (``INDEX_BATCH``, channels-last), into scratch galleries.

    flock /tmp/modret-heavy.lock .venv/bin/python benchmarks/demo_ready.py [--clone] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from report import json_out, write_json

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"modret demo ready in ([0-9.]+) s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clone_and_install(scratch: Path) -> tuple[Path, dict[str, float]]:
    clone = scratch / "clone"
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    t1 = time.perf_counter()
    # The Makefile's install step only (its demo target would then serve in the foreground).
    subprocess.run(["make", "-s", "-C", str(clone), ".venv/.installed"], check=True)
    t2 = time.perf_counter()
    return clone / ".venv" / "bin" / "modret", {"clone_s": round(t1 - t0, 1), "install_s": round(t2 - t1, 1)}


def time_to_ready(modret: Path, cwd: Path, timeout: float = 900) -> dict[str, Any]:
    """Launch ``modret demo`` in ``cwd`` (data under ``cwd/data``), wait for the banner, stop it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODRET_")}
    out, err = cwd / "demo.out", cwd / "demo.err"
    started = time.perf_counter()
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [str(modret), "demo", "--port", str(port)], cwd=cwd, env=env, stdout=o, stderr=e
        )
    try:
        while not (match := READY.search(out.read_text())):
            if proc.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError(f"demo never got ready:\n{err.read_text()[-3000:]}")
            time.sleep(0.05)
        wall = time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    lines = err.read_text().replace("\r", "\n").splitlines()
    said = [s for s in lines if s.startswith(("model:", "index:", "example:")) and "%|" not in s]
    return {"wall_to_banner_s": round(wall, 1), "printed_ready_s": float(match.group(1)), "demo_said": said}


def index_timings(scratch: Path) -> dict[str, Any]:
    """The demo gallery embedded with the shipped model: before (batch 64, contiguous) and now."""
    from index.build import build_gallery, dataset_source
    from model.run import load_run
    from service.cli.demo import DEMO_IMAGES
    from service.cli.demo_cache import INDEX_BATCH, SHIPPED_RUN

    run = load_run(SHIPPED_RUN)
    out: dict[str, Any] = {}
    for name, batch, channels_last in (("before", 64, False), ("now", INDEX_BATCH, True)):
        source = dataset_source("synthfaces", image_size=run.preprocess.image_size, num_images=DEMO_IMAGES)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        run.model.to(memory_format=memory)  # type: ignore[call-overload]
        report = build_gallery(
            run, source, scratch / f"index-{name}", batch_size=batch, store_options={"kind": "flat"}
        )
        t = report.timings
        out[name] = {
            "batch": batch,
            "channels_last": channels_last,
            "wall_s": round(report.wall_s, 1),
            "read_s": round(t.read_s, 1),
            "embed_s": round(t.embed_s, 1),
            "write_s": round(t.write_s + t.save_s, 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clone", action="store_true", help="measure from a fresh clone and install")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--json", type=json_out)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    with tempfile.TemporaryDirectory(prefix="demo-ready-") as tmp:
        scratch = Path(tmp)
        if args.clone:
            modret, install = clone_and_install(scratch)
            result["install"] = install
            cwd = modret.parents[2]
        else:
            modret, cwd = Path(sys.executable).parent / "modret", scratch
        result["first_start"] = time_to_ready(modret, cwd)
        result["second_start"] = time_to_ready(modret, cwd)
        if not args.skip_index:
            result["index"] = index_timings(scratch)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
