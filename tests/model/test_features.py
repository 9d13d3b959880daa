"""Training over a frozen backbone (``model.features``): the pooled seam computes ``embed`` exactly, the
backbone does not move, and what cannot train from pooled features is refused up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.features import BACKBONE, FrozenFeatures, check_frozen
from model.network import ARCHS, BACKBONES, MODULATIONS, NUM_STAGES, create_model
from model.preprocess import Preprocess
from model.pretrained import load_pretrained
from model.run import load_run
from model.train import train
from tests.factories import tiny_model, tiny_train_config
from tests.model.test_pretrained import tv_resnet

TASKS = ["Smiling", "Eyeglasses", "Bald"]
ATOL = 1e-5


def _places(backbone: str) -> list[str]:
    return [str(NUM_STAGES[backbone]), "emb"]  # the places a frozen backbone can train


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("pool_grid", [1, 2])
def test_embed_pooled_of_pooled_features_is_embed(backbone, arch, modulation, pool_grid):
    """The last stage's modulation commutes with the pooling after it (over each cell of a grid): the
    seam training uses over a frozen backbone gives each (image, task) row exactly what serving computes
    from the pixels."""
    model = tiny_model(task_names=TASKS, arch=arch, modulation=modulation, backbone=backbone, width=4,
                       embedding_dim=8, modulate=_places(backbone), perturb=0.3,
                       pool_grid=pool_grid)  # fmt: skip
    torch.manual_seed(1)
    images, tasks = torch.randn(5, 3, 32, 32), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        pooled = model.trunk(0).pool_backbone(images)  # (5, C·g²)
        if arch == "independent":  # each trunk its own backbone here (random weights): compare per trunk
            rows = torch.stack(
                [model.trunk(int(t)).pool_backbone(images[i : i + 1])[0] for i, t in enumerate(tasks)]
            )
            pooled = rows
        torch.testing.assert_close(
            model.embed_pooled(pooled, tasks), model.embed(images, tasks), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("places", [["2", "emb"], ["1", "3"]])
def test_a_stage_before_the_last_cannot_be_modulated_over_a_frozen_backbone(places):
    model = tiny_model(task_names=TASKS, width=4, embedding_dim=8, modulate=places)
    assert not model.trunk(0).pooled_seam
    with pytest.raises(ValueError, match=r"only stage 4 \(the last\) and the embedding can be modulated"):
        check_frozen(model)


def test_independent_trunks_with_different_backbones_are_refused():
    model = tiny_model(task_names=TASKS, arch="independent", width=4, embedding_dim=8)  # random, unequal
    with pytest.raises(ValueError, match=r"same \(pretrained\) weights"):
        check_frozen(model)


@pytest.mark.parametrize(
    "changes, message",
    [({"pretrained": None}, "needs --pretrained"), ({"augment": True}, "no --augment"),
     ({"crop_scale": 0.8}, "--crop-scale")],
)  # fmt: skip
def test_a_frozen_backbone_needs_pretrained_weights_and_fixed_images(changes, message, tmp_path):
    cfg = tiny_train_config(**{"freeze_backbone": True, "pretrained": str(tmp_path / "w.pth"), **changes})
    with pytest.raises(ValueError, match=message):
        cfg.check()


def test_training_over_a_frozen_backbone_leaves_it_bit_for_bit_and_trains_the_rest(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(tv_resnet("resnet18", width=4).state_dict(), weights)
    cfg = tiny_train_config(freeze_backbone=True, pretrained=str(weights), modulate=["4", "emb"],
                            loss="proxy", mining="batch-all", ema=0.9, steps=8)  # fmt: skip
    metrics = train(cfg, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run").model
    before = create_model(run.config)
    load_pretrained(before, str(weights))
    after, initial = run.trunk(0).state_dict(), before.trunk(0).state_dict()
    assert all(torch.equal(after[k], initial[k]) for k in initial if k.startswith(BACKBONE))
    factors = [v for k, v in after.items() if k.startswith("modulations.")]
    assert factors and not all(torch.equal(f, torch.ones_like(f)) for f in factors)  # identity-initialised
    assert 0 <= metrics["test"]["mean"]["triplet_accuracy"] <= 1


def test_frozen_features_are_the_pooled_backbone_of_each_image_in_eval_mode():
    model = tiny_model(task_names=TASKS, width=4, embedding_dim=8, modulate=["4", "emb"]).train()

    class Pixels:
        pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)

        def __getitem__(self, items: np.ndarray) -> torch.Tensor:
            return self.pixels[torch.from_numpy(items)]

    preprocess = Preprocess(32)
    indices = np.array([5, 0, 3])
    features = FrozenFeatures(model, Pixels(), indices, preprocess, progress=False, batch_size=2)  # type: ignore[arg-type]
    assert model.training, "the model's mode is given back"
    model.eval()
    with torch.no_grad():
        expected = model.trunk(0).pool_backbone(preprocess.normalize(Pixels.pixels[[3, 5]]))
    torch.testing.assert_close(features[np.array([3, 5])], expected, atol=ATOL, rtol=0)
