"""The network: modulation semantics, seams, mixed-task batches, ``embed_tasks``, parameter accounting."""

from __future__ import annotations

import pytest
import torch

from model.network import (
    ARCHS,
    BACKBONES,
    MODULATION_INITS,
    MODULATION_MODULES,
    MODULATIONS,
    NECKS,
    NUM_STAGES,
    BatchNeck,
    MatrixModulation,
    ModelConfig,
    TaskNeck,
    VectorModulation,
)
from tests.factories import tiny_model

TASKS = ["Smiling", "Eyeglasses", "Bald", "Big_Nose"]
ATOL = 1e-5


def tiny(arch: str = "modulated", modulation: str = "vector", backbone: str = "resnet18", **kw: object):
    """The factory's tiny model at width 4 with 8-dimensional embeddings over ``TASKS``."""
    return tiny_model(
        task_names=TASKS,
        arch=arch,
        modulation=modulation,
        backbone=backbone,
        width=4,
        embedding_dim=8,
        **kw,
    )


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(7, 3, 32, 32), torch.tensor([0, 3, 1, 1, 2, 0, 3])


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("places", [None, "every", ["emb"]])
def test_initial_modules_compute_the_unmodulated_network(backbone, modulation, places, batch):
    images, tasks = batch
    if places == "every":  # every stage the backbone has, and the embedding
        places = [str(i + 1) for i in range(NUM_STAGES[backbone])] + ["emb"]
    modulated = tiny("modulated", modulation, backbone, modulate=places)
    shared = tiny("shared", modulation, backbone)
    missing, unexpected = shared.load_state_dict(modulated.state_dict(), strict=False)
    assert not missing and all("modulations" in k for k in unexpected)
    torch.testing.assert_close(modulated.embed(images, tasks), shared.embed(images, tasks), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("neck", NECKS)
def test_mixed_task_batch_equals_per_task_batches(arch, modulation, backbone, neck, batch):
    images, tasks = batch
    model = _perturbed(arch, modulation, backbone=backbone, neck=neck)
    with torch.no_grad():
        mixed = model.embed(images, tasks)
        for t in tasks.unique():
            rows = tasks == t
            torch.testing.assert_close(mixed[rows], model.embed(images[rows], tasks[rows]), atol=ATOL, rtol=0)
        every = model.embed_tasks(images)
    assert every.shape == (7, len(TASKS), 8)
    torch.testing.assert_close(every[torch.arange(7), tasks], mixed, atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed.norm(dim=1), torch.ones(7), atol=ATOL, rtol=0)
    if arch in ("modulated", "mask"):
        assert not torch.allclose(every[:, 0], every[:, 1], atol=1e-3), "tasks must embed differently"


@pytest.mark.parametrize("arch", ARCHS)
def test_seams_compose_to_embed(arch, batch):
    images, tasks = batch
    model = tiny(arch)
    features = model.forward_features(images, tasks)
    assert features.dim() == 4 and features.shape[0] == 7
    torch.testing.assert_close(
        model.forward_head(features, tasks), model.embed(images, tasks), atol=ATOL, rtol=0
    )


def _perturbed(arch: str, modulation: str = "vector", **kw: object):
    """A tiny model whose modules (and per-task statistics) are off their initial values."""
    model = tiny(arch, modulation, perturb=0.3, **kw)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.dim() == 2:  # TaskNeck's (T, D) running statistics
                buffer.add_(0.3 * torch.rand_like(buffer))
    return model


# Cheap placements: the default (stages 3, 4 + emb), all places (prefix = the stem alone), emb only
# (the whole backbone is task-independent).
PLACES = [None, ["1", "2", "3", "4", "emb"], ["emb"]]
SUBSETS = [None, [2], [1, 3], [3, 0, 2], [1, 1]]  # all, one, a subset, reordered, a repeat


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("neck", NECKS)
@pytest.mark.parametrize("subset", SUBSETS)
def test_embed_tasks_equals_embed_of_repeated_images(arch, modulation, places, neck, subset, batch):
    images, _ = batch
    model = _perturbed(arch, modulation, modulate=places, neck=neck)
    ids = list(range(len(TASKS))) if subset is None else subset
    with torch.no_grad():
        every = model.embed_tasks(images, subset)
        # Reference: one row per (image, task) pair, image-major, through the mixed-task ``embed``.
        rows = model.embed(images.repeat_interleave(len(ids), 0), torch.tensor(ids).repeat(len(images)))
    assert every.shape == (len(images), len(ids), 8)
    torch.testing.assert_close(every, rows.reshape(len(images), len(ids), 8), atol=ATOL, rtol=0)
    torch.testing.assert_close(every.norm(dim=2), torch.ones(len(images), len(ids)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("places", [*PLACES, ["4", "emb"]])
@pytest.mark.parametrize("neck", NECKS)
@pytest.mark.parametrize("pool_grid", [1, 2])
def test_embed_pairs_equals_embed_of_each_pair(arch, modulation, places, neck, pool_grid, batch):
    images, _ = batch
    model = _perturbed(arch, modulation, modulate=places, neck=neck, pool_grid=pool_grid)
    # Images used by several rows, by none (image 5), out of order; tasks mixed and repeated.
    image_index = [0, 0, 3, 1, 6, 2, 3, 4, 0, 6]
    tasks = [1, 2, 2, 0, 3, 3, 0, 1, 1, 3]
    with torch.no_grad():
        pairs = model.embed_pairs(images, image_index, tasks)
        reference = model.embed(images[image_index], torch.tensor(tasks))
        every = model.embed_tasks(images)
    assert pairs.shape == (len(tasks), 8)
    torch.testing.assert_close(pairs, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(pairs, every[image_index, tasks], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "image_index, tasks, error, message",
    [
        ([0, 1], [0], ValueError, "2 image indices for 1 task ids"),
        ([7], [0], IndexError, r"image indices must be in 0\.\.6"),
        ([-1], [0], IndexError, "image indices"),
        ([0], [4], IndexError, "task id 4 out of range"),
    ],
)
def test_embed_pairs_rejects_rows_that_do_not_match(image_index, tasks, error, message, batch):
    with pytest.raises(error, match=message):
        tiny().embed_pairs(batch[0], image_index, tasks)


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_tasks_takes_lists_tensors_and_none_alike(arch, batch):
    images, _ = batch
    model = _perturbed(arch)
    with torch.no_grad():
        every = model.embed_tasks(images)
        torch.testing.assert_close(model.embed_tasks(images, range(len(TASKS))), every, atol=0, rtol=0)
        torch.testing.assert_close(model.embed_tasks(images, torch.tensor([3, 1])), every[:, [3, 1]])
        torch.testing.assert_close(model.embed_tasks(images, torch.tensor(2)), every[:, [2]])
        assert model.embed_tasks(images.double()).dtype == torch.float32  # cast to the parameters'


def _count_rows(module: torch.nn.Module) -> list[int]:
    """Batch sizes of every call of ``module`` from now on."""
    calls: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("places", PLACES)
def test_embed_tasks_runs_the_unmodulated_prefix_once_per_image(arch, places, batch):
    images, _ = batch
    b, subset = len(images), [3, 0, 2]
    model = tiny(arch, modulate=places)
    trunks = [model.trunk(i) for i in range(len(model.trunks))]
    stems = [_count_rows(trunk.stem) for trunk in trunks]
    stages = [[_count_rows(stage) for stage in trunk.stages] for trunk in trunks]
    with torch.no_grad():
        model.embed_tasks(images, subset)
    if arch == "independent":  # one trunk per task, nothing shared: each requested one sees B rows
        for t, (stem, per_stage) in enumerate(zip(stems, stages, strict=True)):
            expected = [b] if t in subset else []
            assert stem == expected and all(calls == expected for calls in per_stage)
        return
    first = trunks[0].first_conditioned  # the stages up to the first modulated place: the prefix
    stage_places = (
        [] if arch != "modulated" else ["3"] if places is None else [p for p in places if p != "emb"]
    )
    assert first == min((int(p) for p in stage_places), default=len(trunks[0].stages))
    assert stems[0] == [b], "the stem runs once, on B rows, not B*K"
    for i, calls in enumerate(stages[0]):
        assert calls == ([b] if i < first else [b * len(subset)]), (i, first, calls)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "tasks, error, message",
    [
        ([4], IndexError, r"task id 4 out of range: valid ids are 0\.\.3"),
        ([0, -1], IndexError, r"task id -1 out of range: valid ids are 0\.\.3"),
        (torch.tensor([1, 9]), IndexError, r"valid ids are 0\.\.3 \(4 tasks\)"),
        ([], ValueError, "no task ids"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, "1-D"),
        ([0.5], TypeError, "integers"),
        (torch.tensor([1.0]), TypeError, "integers"),
    ],
)
def test_embed_tasks_rejects_bad_task_ids(arch, tasks, error, message, batch):
    with pytest.raises(error, match=message):
        tiny(arch).embed_tasks(batch[0], tasks)


def test_embed_tasks_rejects_images_that_are_not_normalised_float_batches(batch):
    model = tiny()
    with pytest.raises(TypeError, match=r"Preprocess\.normalize"):
        model.embed_tasks(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.embed_tasks(batch[0][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_embed_tasks_moves_cpu_input_to_a_cuda_model(arch, batch):
    images, _ = batch
    model = _perturbed(arch)
    with torch.no_grad():
        expected = model.embed_tasks(images, [2, 0])
        model.cuda()
        out = model.embed_tasks(images, torch.tensor([2, 0]))  # CPU images and ids, CUDA model
    assert out.device.type == "cuda" and model.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)


def test_vector_modulation_is_relu_gated_channel_scaling():
    module = VectorModulation(3, 5)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, -1, 2, 0.5, 3]] * 3) * torch.tensor([[1.0], [2.0], [0.0]]))
    x = torch.randn(4, 5, 2, 2)
    tasks = torch.tensor([0, 1, 2, 0])
    expected = x * torch.relu(module.weight)[tasks][:, :, None, None]
    torch.testing.assert_close(module(x, tasks), expected, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 2)])
def test_matrix_modulation_matches_a_per_sample_projection(shape):
    torch.manual_seed(2)
    module = MatrixModulation(4, 5)
    with torch.no_grad():
        module.weight.add_(torch.randn_like(module.weight))
    x = torch.randn(*shape, requires_grad=True)
    tasks = torch.tensor([2, 0, 2, 3, 2, 0])
    out = module(x, tasks)
    # Reference: x' = x W_t at every position (feasible here, never done in the module itself).
    reference = torch.einsum("bc...,bcd->bd...", x, module.weight[tasks])
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and module.weight.grad is not None
    assert module.weight.grad[1].abs().sum() == 0, "a task absent from the batch gets no gradient"


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_routing_init_gives_each_task_a_fixed_random_half_of_the_channels(modulation):
    torch.manual_seed(3)
    module = MODULATION_MODULES[modulation](12, 256, "routing")
    factors = module.weight if modulation == "vector" else torch.diagonal(module.weight, dim1=1, dim2=2)
    if modulation == "matrix":  # off the diagonal: zero
        assert torch.count_nonzero(module.weight).item() == torch.count_nonzero(factors).item()
    assert set(factors.unique().tolist()) == {0.0, 1.0}
    share = factors.mean(dim=1)
    assert ((share > 0.35) & (share < 0.65)).all(), share
    overlap = (factors[0] * factors[1]).sum() / factors[0].sum()
    assert 0.25 < overlap.item() < 0.75, "routes are independent draws, not one shared mask"
    x = torch.randn(12, 256, requires_grad=True)
    module(x, torch.arange(12)).sum().backward()
    assert module.weight.grad is not None
    if modulation == "vector":  # a closed route gets no gradient through the ReLU: it stays closed
        assert (module.weight.grad[factors == 0] == 0).all()
        assert (module.weight.grad[factors == 1] != 0).all()


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_routing_init_embeds_tasks_differently_from_the_first_step(modulation, batch):
    images, _ = batch
    model = tiny("modulated", modulation, modulate=["1", "2", "3", "4", "emb"], modulation_init="routing")
    every = model.embed_tasks(images)  # (B, T, D)
    for a in range(len(TASKS)):
        for b in range(a + 1, len(TASKS)):
            assert not torch.allclose(every[:, a], every[:, b], atol=1e-3)
    again = tiny("modulated", modulation, modulate=["1", "2", "3", "4", "emb"], modulation_init="routing")
    torch.testing.assert_close(again.embed_tasks(images), every, atol=0, rtol=0)  # seeded


def test_task_neck_normalises_each_task_by_its_own_statistics():
    torch.manual_seed(4)
    tasks = torch.arange(3).repeat_interleave(10)  # (30,)
    z = torch.randn(30, 5) * torch.tensor([1.0, 5.0, 0.2]).repeat_interleave(10).unsqueeze(1)
    z = z + torch.tensor([3.0, -2.0, 0.0]).repeat_interleave(10).unsqueeze(1)  # per-task offset and scale
    out = TaskNeck(4, 5).train()(z, tasks)
    for t in range(3):
        rows = out[tasks == t]
        torch.testing.assert_close(rows.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.var(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    whole = BatchNeck(5).train()(z)
    assert whole[tasks == 0].mean(0).gt(0.5).all(), "whole-batch statistics leave the task offsets in"


def test_task_neck_keeps_a_collapsing_task_spread():
    # Task 1's inputs are almost identical (a collapsing embedding); the others spread them out.
    torch.manual_seed(5)
    tasks = torch.arange(3).repeat_interleave(12)
    z = torch.randn(36, 6)
    z[tasks == 1] = 1.0 + 0.01 * torch.randn(12, 6)
    by_task = TaskNeck(3, 6).train()(z, tasks)[tasks == 1]
    by_batch = BatchNeck(6).train()(z)[tasks == 1]
    assert by_task.std(0).min() > 0.9, "per-task statistics rescale the task to unit variance"
    assert by_batch.std(0).max() < 0.05, "whole-batch statistics let it collapse"


def test_task_neck_running_statistics_follow_only_the_tasks_in_the_batch():
    torch.manual_seed(6)
    neck = TaskNeck(4, 3, momentum=0.1).train()
    tasks = torch.tensor([0, 0, 0, 2, 2, 3])  # task 1 absent, task 3 a single row
    z = torch.randn(6, 3)
    neck(z, tasks)
    torch.testing.assert_close(neck.running_mean[0], 0.1 * z[:3].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(neck.running_var[2], 0.9 + 0.1 * z[3:5].var(0), atol=1e-6, rtol=0)
    for t in (1, 3):
        assert (neck.running_mean[t] == 0).all() and (neck.running_var[t] == 1).all()
    neck.eval()
    expected = (z - neck.running_mean[tasks]) / torch.sqrt(neck.running_var[tasks] + neck.eps)
    torch.testing.assert_close(neck(z, tasks), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_task_neck_at_initial_values_computes_the_batch_neck(modulation, batch):
    images, tasks = batch
    by_task, by_batch = tiny(modulation=modulation, neck="task"), tiny(modulation=modulation, neck="batch")
    assert isinstance(by_task.trunk(0).neck, TaskNeck) and isinstance(by_batch.trunk(0).neck, BatchNeck)
    torch.testing.assert_close(by_task.embed(images, tasks), by_batch.embed(images, tasks), atol=1e-6, rtol=0)
    # Nothing conditions the embedding of shared networks on the task: their neck stays a batch norm.
    assert isinstance(tiny("shared", neck="task").trunk(0).neck, BatchNeck)
    assert isinstance(tiny("mask", neck="task").trunk(0).neck, TaskNeck)


def test_unknown_modulation_init_is_rejected():
    with pytest.raises(ValueError, match="routing"):
        ModelConfig(task_names=TASKS, modulation_init="zeros")  # type: ignore[arg-type]
    assert MODULATION_INITS == ("identity", "routing")


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_parameter_accounting(modulation):
    t = len(TASKS)
    shared = tiny("shared").parameter_counts()
    assert shared["per_task_extra"] == 0 and shared["shared"] == shared["total"]
    modulated = tiny("modulated", modulation).parameter_counts()
    channels = [16, 32, 8]  # resnet18 width 4: stage 3 = 16, stage 4 = 32 channels; embedding 8
    per_task = sum(channels) if modulation == "vector" else sum(c * c for c in channels)
    assert modulated["per_task_extra"] == per_task
    assert modulated["total"] == shared["total"] + t * per_task
    mask = tiny("mask", modulation).parameter_counts()
    assert mask["per_task_extra"] == (8 if modulation == "vector" else 64)
    independent = tiny("independent").parameter_counts()
    assert independent == {"total": t * shared["total"], "shared": 0, "per_task_extra": shared["total"]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_names": []}, "at least one task"),
        ({"task_names": ["a"], "arch": "nope"}, "unknown arch"),
        ({"task_names": ["a"], "backbone": "vgg"}, "unknown backbone"),
        ({"task_names": ["a"], "modulation": "scalar"}, "unknown modulation"),
        ({"task_names": ["a"], "modulate": ["5"]}, "bad modulation place"),
        ({"task_names": ["a"], "neck": "layer"}, "unknown neck"),
        ({"task_names": ["a"], "pool_grid": 0}, "pool_grid must be an integer from 1 to 8"),
        ({"task_names": ["a"], "pool_grid": 9}, "pool_grid must be an integer from 1 to 8"),
        ({"task_names": ["a"], "pool_grid": 2.0}, "pool_grid must be an integer from 1 to 8"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_default_placement_follows_the_official_code():
    assert ModelConfig(task_names=["a"]).resolved_modulate == ["3", "4", "emb"]
    assert ModelConfig(task_names=["a"], arch="mask").resolved_modulate == ["emb"]
    assert ModelConfig(task_names=["a"], arch="shared").resolved_modulate == []


def test_a_pooling_grid_tells_where_in_the_image_a_feature_is():
    """Mean pooling over the whole map cannot tell a feature on the left from the same one on the right; a
    2 × 2 grid's cells can, so the head weighs regions (on aligned faces: eyes, mouth) apart."""
    features = torch.zeros(2, 3, 4, 4)  # (B, C, h, w) after the last stage
    features[0, :, :, :2], features[1, :, :, 2:] = 1.0, 1.0  # the same activation, left half or right
    whole, grid = tiny(pool_grid=1).trunk(0), tiny(pool_grid=2).trunk(0)
    assert torch.equal(whole.pool(features)[0], whole.pool(features)[1])
    cells = grid.pool(features)  # (2, 3 * 4): per channel, the cells top-left, top-right, bottom-...
    assert cells.shape == (2, 12) and not torch.equal(cells[0], cells[1])
    assert cells[0].view(3, 2, 2)[:, :, 0].eq(1).all() and cells[0].view(3, 2, 2)[:, :, 1].eq(0).all()
    assert grid.fc.in_features == 4 * tiny().trunk(0).fc.in_features  # the head reads every cell
