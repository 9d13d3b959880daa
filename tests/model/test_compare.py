"""The comparison: which recipe each dataset trains with when options are left out, one decode for every
run, pretrained rows beside from-scratch ones."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from PIL import Image

from model.compare import (
    FACE_BUDGET,
    FACE_DATASETS,
    REAL_DATA_BUDGET,
    DecodedData,
    compare,
    compare_budget,
    markdown_table,
)
from model.data import DATASETS
from model.data.synthfaces import SynthFaces
from model.network import BatchNeck, MultiTaskEmbedder, TaskNeck, create_model
from model.train import DataConfig, TrainConfig, train
from tests.factories import tiny_train_config
from tests.model.test_pretrained import tv_resnet


def _network(dataset: str) -> MultiTaskEmbedder:
    cfg = TrainConfig(**compare_budget(dataset).train_options())
    return create_model(cfg.model_config(["Smiling", "Eyeglasses", "Bald"]))


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_dataset_trains_the_neck_measured_for_it(dataset):
    # Per-task neck statistics helped synthetic faces at every seed and cost real faces 4 points.
    neck = _network(dataset).trunk(0).neck
    assert isinstance(neck, TaskNeck if dataset == "synthfaces" else BatchNeck)
    cfg = TrainConfig(**compare_budget(dataset).train_options())  # every budget field is a training option
    every = ["1", "2", "3", "4", "emb"] if dataset not in FACE_DATASETS else ["3", "emb"]  # SFace: 3 stages
    assert cfg.modulate == every and cfg.modulation_init == "routing"


def test_real_faces_train_over_frozen_sface_unless_another_backbone_is_asked_for():
    assert compare_budget("celeba") is compare_budget("celeba", "sface") is FACE_BUDGET
    assert compare_budget("folder", "sface") is compare_budget("synthfaces", "sface") is FACE_BUDGET
    assert compare_budget("celeba", "resnet18") is compare_budget("folder") is REAL_DATA_BUDGET
    real, face = asdict(REAL_DATA_BUDGET), asdict(FACE_BUDGET)
    changed = {k: (real[k], face[k]) for k in real if real[k] != face[k]}
    assert changed == {
        "backbone": ("resnet18", "sface"),
        "pretrained": (None, "package"),
        "freeze_backbone": (False, True),  # the head trains from pooled features computed once
        "image_size": (64, 112),  # the aligned face size SFace was trained at
        "center_crop": (1.0, 0.7),  # the face, not the background, fills the frame as SFace expects
        "width": (32, None),  # the weights' own width
        "modulate": (("1", "2", "3", "4", "emb"), ("3", "emb")),  # what a frozen backbone can train
        "augment": (True, False),  # features computed once: no flips
        "lr": (None, 0.1),  # only the head trains: it takes a large step
        "steps": (2400, 6000),
        "pool_grid": (1, 3),  # a cell of an aligned face is a region: where a feature is tells what it is
    }


def test_the_real_data_budget_differs_from_the_synthetic_one_only_where_real_faces_were_measured():
    synthetic = asdict(compare_budget("synthfaces"))
    real = asdict(compare_budget("folder"))
    changed = {k: (synthetic[k], real[k]) for k in synthetic if synthetic[k] != real[k]}
    assert changed == {
        "neck": ("task", "batch"),  # per-task statistics cost real faces 4 points
        "loss": ("triplet", "proxy"),
        "width": (16, 32),
        "steps": (800, 2400),
        "augment": (False, True),
        "ema": (0.0, 0.998),  # the weights' moving average: +0.8 points over two seeds
    }
    # Same module layout at either width: the real network is the synthetic one's shape, twice as wide.
    a, b = _network("synthfaces"), _network("folder")
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert {n for n, _ in a.named_buffers()} != {n for n, _ in b.named_buffers()}  # the per-task neck's


def test_markdown_table_has_one_row_per_architecture():
    result = {
        "tasks": {"Smiling": {"triplet_accuracy": 0.9, "map": 0.8, "precision_at_10": 0.7}},
        "mean": {"triplet_accuracy": 0.9, "map": 0.8, "precision_at_10": 0.7, "leakage": 0.0712},
        "params": {"total": 1000, "per_task_extra": 10},
        "train_seconds": 12.3,
    }
    older = {**result, "mean": {k: v for k, v in result["mean"].items() if k != "leakage"}}
    table = markdown_table({"shared": older, "modulated": result}).splitlines()
    assert table[0].startswith("| arch | Smiling | mean acc")
    assert "| mean P@10 | mean leak | params |" in table[0]
    assert table[2].startswith("| shared | 0.900 |") and table[3].startswith("| modulated | 0.900 |")
    assert table[2].endswith("| 0.700 | - | 1,000 | 10 | 12 |")  # compared before leakage was measured
    assert table[3].endswith("| 0.700 | 0.071 | 1,000 | 10 | 12 |")


TASKS = ["Pale_Skin", "Wearing_Hat"]


def _counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every synthetic face the datasets decode (the real renderer still draws each)."""
    decoded: list[int] = []
    render = SynthFaces.load_image

    def counted(self: SynthFaces, index: int) -> Image.Image:
        decoded.append(index)
        return render(self, index)

    monkeypatch.setattr(SynthFaces, "load_image", counted)
    return decoded


def test_compare_decodes_the_dataset_once_for_every_run(tmp_path, monkeypatch):
    decoded = _counting_decodes(monkeypatch)
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet("resnet18", width=4).state_dict(), path)
    base = tiny_train_config(data=DataConfig(tasks=TASKS, num_images=60))
    results = compare(base, ["shared", "modulated"], tmp_path / "cmp", progress=False, pretrained=str(path))
    # four trainings and their evaluations (train, val and test splits) read one decode of each image
    assert sorted(decoded) == list(range(60))
    assert list(results) == ["shared", "shared pretrained", "modulated", "modulated pretrained"]
    for folder, weights in (("modulated", None), ("modulated-pretrained", str(path.resolve()))):
        config = json.loads((tmp_path / "cmp" / folder / "config.json").read_text())
        assert (config["pretrained"] or {}).get("path") == weights, folder
    table = markdown_table(results).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| {name}" for name in results]


def test_every_architecture_over_one_frozen_backbone_reads_its_features_computed_once(tmp_path, monkeypatch):
    decoded = _counting_decodes(monkeypatch)
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet("resnet18", width=4).state_dict(), path)
    base = tiny_train_config(data=DataConfig(tasks=TASKS, num_images=60), pretrained=str(path),
                             freeze_backbone=True, modulate=["4", "emb"])  # fmt: skip
    results = compare(base, ["shared", "mask", "modulated"], tmp_path / "cmp", progress=False)
    assert sorted(decoded) == list(range(60))
    first, *others = (r["features_seconds"] for r in results.values())
    assert first > 0 and others == [0, 0], "the first run computes the features; the others read them"
    for arch in results:  # each stored run is an ordinary one over the same untouched backbone
        config = json.loads((tmp_path / "cmp" / arch / "config.json").read_text())
        assert config["train"]["freeze_backbone"] and config["pretrained"]["path"] == str(path.resolve())


def test_training_on_decoded_data_is_training_on_the_dataset(tmp_path):
    cfg = tiny_train_config(data=DataConfig(tasks=TASKS, num_images=60))
    alone = train(cfg, tmp_path / "alone", progress=False)
    decoded = DecodedData.load(cfg.data, cfg.image_size, progress=False)
    shared = train(cfg, tmp_path / "shared", progress=False, decoded=decoded)
    assert shared["test"] == alone["test"] and shared["history"][-1]["loss"] == alone["history"][-1]["loss"]
    with pytest.raises(ValueError, match="this run wants"):
        train(
            replace(cfg, image_size=cfg.image_size * 2), tmp_path / "other", progress=False, decoded=decoded
        )
