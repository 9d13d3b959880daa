"""What every benchmark's ``--json PATH`` shares: the path is checked (its folder made) when the options
are parsed, so that a long run never ends by failing to write its report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for model.durable

from model.durable import atomic_write_text


def json_out(text: str) -> Path:
    """``argparse`` type of ``--json``: PATH with its folder created, refused at once if not writable."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name for the JSON report")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create the folder of {path}: {exc.strerror}") from exc
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path} is not writable")
    return path


def write_json(path: Path, report: Any) -> None:
    """Write ``report`` to ``path`` whole or not at all (``model.durable``'s atomic replacement)."""
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
