"""Tasks as separable rows (model.tasks) and training one new task on a frozen model (model.task_runs)."""

from __future__ import annotations

import pytest
import torch

from model.data import load_dataset
from model.network import MultiTaskEmbedder, TaskNeck
from model.preprocess import Preprocess
from model.task_runs import (
    POOLED_SEAM_SCHEDULE,
    THROUGH_TRUNK_SCHEDULE,
    TaskTrainConfig,
    train_new_task,
)
from model.tasks import (
    TaskError,
    added_parameters,
    append_tasks,
    assert_extends,
    fingerprints,
    new_task,
    per_task_keys,
    remove_task,
    select_tasks,
)
from model.train import LOSSES, Loss
from tests.factories import IMAGE_SIZE, TASKS, tiny_model

# The compare budget's layout (routes after every stage and on the embedding, per-task neck), the
# official one (ones at stages 3, 4 and emb, batch neck), the paper's matrices, and the CSN-style mask.
LAYOUTS = {
    "budget": {"modulate": ["1", "2", "3", "4", "emb"], "modulation_init": "routing", "neck": "task"},
    "official": {},
    "matrix": {"modulation": "matrix", "neck": "task"},
    "mask": {"arch": "mask"},
    # nothing before the last stage modulated (pooled over a grid, as the face recipe): the new rows train
    # from pooled features computed once
    "pooled": {"modulate": ["4", "emb"], "modulation_init": "routing", "neck": "task", "pool_grid": 2},
}
NEW = "Bald"


def bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {
        k: v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for k, v in state.items()
    }


@pytest.fixture(params=list(LAYOUTS), scope="module")
def layout(request: pytest.FixtureRequest) -> dict:
    return LAYOUTS[request.param]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE)  # (B, 3, S, S)


@pytest.fixture(params=LOSSES, scope="module")
def loss(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def trained(layout: dict, loss: Loss) -> tuple:
    """A parent, its state before anything ran, and the one-task model trained for ``NEW`` on it (with
    the proxy loss too: its proxies train beside the rows, and nothing else may move)."""
    parent = tiny_model(perturb=0.5, **layout)
    before = bits(parent.state_dict())
    dataset = load_dataset("synthfaces", None, [NEW], image_size=IMAGE_SIZE, num_images=120)
    cfg = TaskTrainConfig(steps=4, per_task=4, neck_images=50, loss=loss)
    single, history = train_new_task(parent, dataset, Preprocess(IMAGE_SIZE), cfg, progress=False)
    return parent, before, single, history


def test_training_a_task_leaves_every_parent_tensor_bit_identical(trained: tuple) -> None:
    parent, before, single, history = trained
    assert bits(parent.state_dict()) == before, "the parent itself was not touched"
    child = append_tasks(parent, single)  # refuses if any shared tensor moved while training
    assert_extends(parent, child)
    state = child.state_dict()
    rows = set(per_task_keys(child))
    for key, value in parent.state_dict().items():
        old = state[key][: parent.num_tasks] if key in rows else state[key]
        assert bits({key: old}) == bits({key: value}), key  # BN running statistics included
    assert child.config.task_names == [*TASKS, NEW]
    assert history and history[-1]["step"] == 4


def test_the_new_rows_learned_and_a_per_task_neck_got_statistics(trained: tuple, layout: dict) -> None:
    parent, _, single, _ = trained
    start = new_task(parent, NEW, seed=0, init=TaskTrainConfig().init)
    moved = [
        k for k in per_task_keys(single) if not torch.equal(single.state_dict()[k], start.state_dict()[k])
    ]
    assert any(".modulations." in k for k in moved), "training changed the new task's module rows"
    neck = single.trunk(0).neck
    if isinstance(neck, TaskNeck):
        assert {"trunks.0.neck.running_mean", "trunks.0.neck.running_var"} <= set(moved)
        assert torch.all(neck.running_var > 0)


@pytest.mark.parametrize("place, pooled", [("4", True), ("3", False)])
def test_over_a_pooled_seam_the_backbone_sees_each_training_image_once(place: str, pooled: bool) -> None:
    """Modules only at the last stage and the embedding: the frozen backbone's pooled output of each
    training image is computed once, not at every step (stage 3 modulated: every step runs it)."""
    parent = tiny_model(perturb=0.5, modulate=[place, "emb"], modulation_init="routing", neck="task")
    dataset = load_dataset("synthfaces", None, [NEW], image_size=IMAGE_SIZE, num_images=120)
    seen: list[int] = []
    original = new_task

    def counting(*args: object, **kwargs: object) -> MultiTaskEmbedder:
        model = original(*args, **kwargs)  # type: ignore[arg-type]
        model.trunk(0).stem.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
        return model

    cfg = TaskTrainConfig(steps=6, per_task=4, neck_images=50)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("model.task_runs.new_task", counting)
        single, _ = train_new_task(parent, dataset, Preprocess(IMAGE_SIZE), cfg, progress=False)
    train_images = len(dataset.split_indices("train", 0))
    if pooled:
        assert sum(seen) == train_images  # once each, before the first step; the neck reads them too
    else:
        assert len(seen) > cfg.steps  # every step's images, then the neck's
    assert isinstance(single.trunk(0).neck, TaskNeck) and torch.all(single.trunk(0).neck.running_var > 0)


def test_old_tasks_embed_bit_identically_in_the_child(trained: tuple, images: torch.Tensor) -> None:
    parent, _, single, _ = trained
    child = append_tasks(parent, single)
    old = list(range(parent.num_tasks))
    with torch.no_grad():
        assert torch.equal(child.embed_tasks(images, old), parent.embed_tasks(images, old))
        ids = torch.tensor([0, 3, 1, 2, 2, 0])  # mixed-task rows, as in training batches
        assert torch.equal(child.embed(images, ids), parent.embed(images, ids))
        # The new task in the child is the trained one-task model's embedding.
        assert torch.equal(
            child.embed_tasks(images, [parent.num_tasks])[:, 0], single.embed_tasks(images)[:, 0]
        )


def test_added_parameters_are_one_tasks_module_rows(trained: tuple, layout: dict) -> None:
    parent, _, single, _ = trained
    child = append_tasks(parent, single)
    per_task = parent.parameter_counts()["per_task_extra"]
    counts = added_parameters(parent, child)
    assert counts["parameters"] == per_task > 0
    assert child.parameter_counts()["total"] - parent.parameter_counts()["total"] == per_task
    neck_dim = parent.config.embedding_dim if isinstance(parent.trunk(0).neck, TaskNeck) else 0
    assert counts["buffers"] == 2 * neck_dim  # a per-task neck: the task's mean and variance


def test_fingerprints_accept_the_child_for_old_tasks_and_differ_for_an_unrelated_model(
    trained: tuple,
) -> None:
    parent, _, single, _ = trained
    child = append_tasks(parent, single)
    mine, theirs = fingerprints(child), fingerprints(parent)
    assert mine.shared == theirs.shared
    assert {t: mine.tasks[t] for t in TASKS} == theirs.tasks
    assert mine.tasks[NEW] not in theirs.tasks.values()
    assert len(set(mine.tasks.values())) == len(mine.tasks), "trained tasks have distinct fingerprints"
    unrelated = fingerprints(tiny_model(seed=1, perturb=0.5, **_layout_of(parent)))
    assert unrelated.shared != theirs.shared
    assert not set(unrelated.tasks.values()) & set(theirs.tasks.values())


def _layout_of(model: MultiTaskEmbedder) -> dict:
    config = model.config.to_dict()
    return {k: config[k] for k in ("arch", "modulation", "modulation_init", "neck", "modulate", "pool_grid")}


def test_remove_round_trip_restores_the_parent(trained: tuple, images: torch.Tensor) -> None:
    parent, _, single, _ = trained
    back = remove_task(append_tasks(parent, single), NEW)
    assert back.config == parent.config
    assert bits(back.state_dict()) == bits(parent.state_dict())
    assert fingerprints(back) == fingerprints(parent)
    with torch.no_grad():
        assert torch.equal(back.embed_tasks(images), parent.embed_tasks(images))


def test_select_tasks_reorders_and_embeds_exactly(images: torch.Tensor) -> None:
    parent = tiny_model(perturb=0.5, modulation="matrix")
    picked = select_tasks(parent, ["wearing_hat", "Smiling"])  # case-insensitive, in the given order
    assert picked.config.task_names == ["Wearing_Hat", "Smiling"]
    with torch.no_grad():
        assert torch.equal(picked.embed_tasks(images), parent.embed_tasks(images, [3, 0]))
    assert fingerprints(picked).tasks == {
        t: fingerprints(parent).tasks[t] for t in ("Wearing_Hat", "Smiling")
    }


def test_independent_networks_select_but_cannot_grow(images: torch.Tensor) -> None:
    parent = tiny_model(arch="independent", width=4)
    picked = select_tasks(parent, ["Black_Hair"])
    with torch.no_grad():
        assert torch.equal(picked.embed_tasks(images), parent.embed_tasks(images, [2]))
    assert fingerprints(picked).tasks["Black_Hair"] == fingerprints(parent).tasks["Black_Hair"]
    with pytest.raises(TaskError, match="independent network has no shared weights"):
        new_task(parent, NEW)
    with pytest.raises(TaskError, match="shared architecture has no per-task modules"):
        new_task(tiny_model(arch="shared"), NEW)


def test_task_operations_refuse_what_they_cannot_do() -> None:
    parent = tiny_model(perturb=0.5)
    with pytest.raises(TaskError, match=r"unknown task.*Nope.*the model's tasks: Smiling"):
        select_tasks(parent, ["Nope"])
    with pytest.raises(TaskError, match="named twice"):
        select_tasks(parent, ["Smiling", "smiling"])
    with pytest.raises(TaskError, match="only task"):
        remove_task(select_tasks(parent, ["Smiling"]), "Smiling")
    with pytest.raises(TaskError, match="already in the model"):
        append_tasks(parent, new_task(parent, "eyeglasses"))
    with pytest.raises(TaskError, match="shared weights differ"):
        append_tasks(parent, new_task(tiny_model(seed=1), NEW))
    with pytest.raises(TaskError, match="different architectures"):
        append_tasks(parent, new_task(tiny_model(modulation="matrix"), NEW))
    moved = append_tasks(parent, new_task(parent, NEW))
    with torch.no_grad():
        moved.trunk(0).fc.weight[0, 0] += 1e-6
    with pytest.raises(TaskError, match=r"changed from the parent model, first trunks\.0\.fc\.weight"):
        assert_extends(parent, moved)


def test_new_task_rows_start_at_the_modules_initialisation() -> None:
    parent = tiny_model(perturb=0.5, modulate=["3", "emb"], modulation_init="routing", neck="task")
    state = new_task(parent, NEW, seed=4).state_dict()
    assert torch.equal(
        new_task(parent, NEW, seed=4).state_dict()["trunks.0.modulations.3.weight"],
        state["trunks.0.modulations.3.weight"],
    )
    for key in ("trunks.0.modulations.3.weight", "trunks.0.modulations.emb.weight"):
        assert state[key].shape[0] == 1 and set(state[key].unique().tolist()) <= {0.0, 1.0}  # routes
    assert torch.equal(state["trunks.0.neck.running_mean"], torch.zeros(1, 16))
    assert torch.equal(state["trunks.0.neck.running_var"], torch.ones(1, 16))
    identity = new_task(tiny_model(modulation="matrix"), NEW).state_dict()["trunks.0.modulations.emb.weight"]
    assert torch.equal(identity, torch.eye(16).unsqueeze(0))


def test_mean_init_starts_at_the_mean_of_the_models_rows() -> None:
    parent = tiny_model(perturb=0.5, modulate=["3", "emb"], modulation_init="routing", neck="task")
    state, rows = new_task(parent, NEW, init="mean").state_dict(), parent.state_dict()
    for key in ("trunks.0.modulations.3.weight", "trunks.0.modulations.emb.weight"):
        torch.testing.assert_close(state[key][0], rows[key].mean(0), atol=0, rtol=0)
    assert torch.equal(state["trunks.0.neck.running_var"], torch.ones(1, 16))  # statistics start fresh
    assert new_task(parent, NEW, init="mean").config.modulation_init == "routing"
    with pytest.raises(TaskError, match="unknown init 'bogus'; choose one of identity, routing, mean"):
        new_task(parent, NEW, init="bogus")  # type: ignore[arg-type]


def test_over_a_pooled_seam_new_rows_take_more_and_larger_steps_unless_told() -> None:
    through = tiny_model(perturb=0.5, **LAYOUTS["budget"])  # a module before the last stage
    pooled = tiny_model(perturb=0.5, **LAYOUTS["pooled"])  # a step costs the head alone
    assert TaskTrainConfig().schedule(through) == THROUGH_TRUNK_SCHEDULE == (1000, 0.03)
    assert TaskTrainConfig().schedule(pooled) == POOLED_SEAM_SCHEDULE == (4000, 0.1)
    assert TaskTrainConfig(steps=7).schedule(pooled) == (7, 0.1)
    assert TaskTrainConfig(lr=0.5).schedule(through) == (1000, 0.5)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"loss": "hinge"}, "unknown loss 'hinge'"), ({"loss": "proxy", "proxy_temperature": 0}, "temperature")],
)
def test_a_task_training_config_that_cannot_train_is_a_clear_error(options: dict, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        TaskTrainConfig(**options)
