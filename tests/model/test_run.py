"""Run directories: atomic save, faithful reload, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from model.run import CONFIG, WEIGHTS, RunError, load_run, save_run
from tests.factories import tiny_model


@pytest.fixture
def model():
    return tiny_model(
        perturb=1.0, task_names=["A", "B"], modulation="matrix", width=4, image_size=32, embedding_dim=8
    )


def test_round_trip_gives_identical_embeddings(tmp_path, model):
    save_run(tmp_path, model, {"dataset": {"dataset": "synthfaces"}})
    run = load_run(tmp_path)
    images, tasks = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1])
    torch.testing.assert_close(run.model.embed(images, tasks), model.embed(images, tasks), atol=0, rtol=0)
    assert run.task_names == ["A", "B"] and run.embedding_dim == 8
    assert run.preprocess.image_size == 32 and len(run.model_hash) == 64
    assert run.config["dataset"] == {"dataset": "synthfaces"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left"


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match=r"config\.json: not found"):
        load_run(tmp_path / "nope")


def test_truncated_weights_are_a_clear_error(tmp_path, model):
    save_run(tmp_path, model)
    weights = tmp_path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RunError, match="cannot load weights"):
        load_run(tmp_path)


def test_invalid_config_is_a_clear_error(tmp_path, model):
    save_run(tmp_path, model)
    config = json.loads((tmp_path / CONFIG).read_text())
    config["model"]["arch"] = "bogus"
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(RunError, match="not a valid run config"):
        load_run(tmp_path)


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path, model):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    save_run(tmp_path, model)
    with pytest.raises(RunError, match="CUDA is not available"):
        load_run(tmp_path, device="cuda")
