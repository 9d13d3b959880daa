"""A run directory: what training writes and what evaluation, indexing and serving load.

``RUN_DIR/model.safetensors`` (weights), ``RUN_DIR/config.json`` (everything needed to rebuild the
network and its preprocessing, task names included) and ``RUN_DIR/metrics.json``. Files are written
atomically (temp file, fsync, rename: ``model.durable``) so a crash never leaves a half-written run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.durable import atomic_write, atomic_write_text, file_sha256
from model.network import ModelConfig, MultiTaskEmbedder, create_model
from model.preprocess import Preprocess
from model.tasks import Fingerprints, fingerprints

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
FORMAT_VERSION = 1


class RunError(ValueError):
    """A run directory that is missing or cannot be loaded; the message says which file and why."""


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_run(
    run_dir: Path,
    model: MultiTaskEmbedder,
    extra: dict[str, Any] | None = None,
    preprocess: Preprocess | None = None,
) -> None:
    """Write weights and config.json; ``extra`` (dataset, training settings, the pretrained weights'
    provenance under ``"pretrained"``) is stored alongside. ``preprocess``: what the model was trained
    with (default: the [-1, 1] scaling at the model's image size)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": (preprocess or Preprocess(model.config.image_size)).to_dict(),
        **(extra or {}),
    }
    write_json(run_dir / CONFIG, config)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunError(f"{path}: not found — is {run_dir} a run directory written by `modret train`?")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        ModelConfig.from_dict(data["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: not a valid run config ({exc})") from exc
    return data


@dataclass
class LoadedRun:
    run_dir: Path
    model: MultiTaskEmbedder  # in eval mode, on ``device``
    config: dict[str, Any]
    preprocess: Preprocess
    model_hash: str  # sha256 of model.safetensors: indices record it to detect a model swap
    device: torch.device

    @property
    def task_names(self) -> list[str]:
        return list(self.model.config.task_names)

    @property
    def embedding_dim(self) -> int:
        return self.model.config.embedding_dim

    @cached_property
    def fingerprints(self) -> Fingerprints:
        """The shared weights' digest and one per task (``model.tasks.fingerprints``): an index built
        under task ``t`` is valid for this run when ``fingerprints.tasks[t]`` is the one it recorded,
        whatever tasks were added or removed since (``model_hash`` changes with any of them)."""
        return fingerprints(self.model)

    @property
    def lineage(self) -> list[dict[str, Any]]:
        """The task additions and removals that led from a trained run to this one (oldest first)."""
        return list(self.config.get("lineage", []))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{weights}: not found")
    model = create_model(ModelConfig.from_dict(config["model"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError, OSError) as exc:  # truncated, corrupt or mismatched
        raise RunError(f"{weights}: cannot load weights ({exc})") from exc
    target = resolve_device(device)
    return LoadedRun(
        run_dir=run_dir,
        model=model.to(target).eval(),
        config=config,
        preprocess=Preprocess(**config["preprocess"]),
        model_hash=file_sha256(weights),
        device=target,
    )
