"""``Preprocess``: the centre square resized to the model's input, bounded by the source and the output
whatever the aspect ratio, and the normalisation every caller shares."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

SIZE = 64


@pytest.fixture
def resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every output size Pillow's ``Image.resize`` is asked for while the test runs."""
    seen: list[tuple[int, int]] = []
    original = Image.Image.resize

    def spy(self: Image.Image, size: Any, *args: Any, **kwargs: Any) -> Image.Image:
        seen.append((int(size[0]), int(size[1])))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return seen


@pytest.mark.parametrize("shape", [(1, 200_000), (200_000, 1), (3, 90_001), (5_000, 7)])
def test_extreme_aspect_ratios_never_build_a_large_intermediate(
    shape: tuple[int, int], resizes: list[tuple[int, int]]
) -> None:
    image = Image.new("RGB", shape, (10, 200, 30))
    pixels = Preprocess(SIZE).to_uint8(image)
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == np.uint8
    assert (pixels == np.array([10, 200, 30], dtype=np.uint8)[:, None, None]).all()
    # Resizing the shorter side first would ask for SIZE x (SIZE * long / short) pixels (gigabytes here).
    assert resizes == [(SIZE, SIZE)]


def test_the_centre_square_is_kept() -> None:
    bands = Image.new("RGB", (300, 100), (255, 0, 0))  # red | green | blue, 100 columns each
    bands.paste((0, 255, 0), (100, 0, 200, 100))
    bands.paste((0, 0, 255), (200, 0, 300, 100))
    for image in (bands, bands.transpose(Image.Transpose.ROTATE_90)):
        inner = Preprocess(SIZE).to_uint8(image)[:, 2:-2, 2:-2]  # the rim may blend with the neighbours
        assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()


@pytest.mark.parametrize("size", [SIZE, 100])  # resized, and the input size already (cropped all the same)
def test_a_centre_crop_keeps_that_fraction_of_the_shorter_side(size: int) -> None:
    framed = Image.new(
        "RGB", (size, size), (0, 0, 255)
    )  # a blue frame around a green centre of half the side
    framed.paste((0, 255, 0), (size // 4, size // 4, size - size // 4, size - size // 4))
    inner = Preprocess(SIZE, crop=0.5).to_uint8(framed)[:, 2:-2, 2:-2]
    assert (inner[1] == 255).all() and (inner[2] == 0).all(), "only the centre is kept, filling the input"
    assert (Preprocess(SIZE).to_uint8(framed)[2] == 255).any(), "without a crop the frame is there"
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction of the shorter side"):
            Preprocess(SIZE, crop=bad)


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (1, 1), (13, 13), (640, 640), (178, 218), (218, 178)])
def test_any_size_gives_the_model_input(shape: tuple[int, int]) -> None:
    image = Image.effect_noise(shape, 40).convert("RGB")
    pixels = Preprocess(SIZE).to_uint8(image)
    assert pixels.shape == (3, SIZE, SIZE)
    if shape == (SIZE, SIZE):  # already the input size: passed through untouched
        assert np.array_equal(pixels, np.asarray(image).transpose(2, 0, 1))


def test_modes_other_than_rgb_are_converted() -> None:
    pixels = Preprocess(SIZE).to_uint8(Image.new("L", (80, 120), 77))
    assert (pixels == 77).all()


@pytest.mark.parametrize(
    ("preprocess", "low", "high"),
    [
        (Preprocess(SIZE), (-1.0,) * 3, (1.0,) * 3),
        (
            Preprocess.for_backbone(SIZE, pretrained=True),
            tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)),
            tuple((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)),
        ),
    ],
    ids=["from-scratch", "imagenet"],
)
def test_normalize_maps_the_byte_range(
    preprocess: Preprocess, low: tuple[float, ...], high: tuple[float, ...]
) -> None:
    black = preprocess.normalize(torch.zeros((1, 3, 2, 2), dtype=torch.uint8))
    white = preprocess.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(black[0, :, 0, 0], torch.tensor(low), atol=1e-5, rtol=0)
    torch.testing.assert_close(white[0, :, 0, 0], torch.tensor(high), atol=1e-5, rtol=0)
