"""Training pixels: random resized crops and flips on the uint8 batch."""

from __future__ import annotations

import pytest
import torch

from model.pixels import random_crops


def _images(n: int = 6, size: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_a_full_size_crop_without_flips_is_the_image_itself():
    images = _images()
    out = random_crops(images, 1.0, flip=False)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, images)


def test_a_full_size_crop_with_flips_mirrors_some_images_exactly_and_leaves_the_rest():
    images = _images(n=64)
    out = random_crops(images, 1.0, flip=True)
    same = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 8 < sum(mirrored) < 56  # about half, with probability 1 - 1e-6


def test_smaller_crops_zoom_in_and_stay_inside_the_image():
    # a left-dark, right-bright image: a crop that zooms in shows more of each half's flat area, and
    # never a value outside the image's own range (no padding is sampled)
    size = 32
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    image[..., size // 2 :] = 200
    images = image.repeat(50, 1, 1, 1)
    out = random_crops(images, 0.5, flip=False)
    assert int(out.min()) >= 0 and int(out.max()) <= 200
    assert not torch.equal(out, images)
    # the crops' sizes and positions vary: so does where the edge falls along a row
    dark = (out[:, 0, size // 2] == 0).sum(dim=1)  # (B,) dark pixels along the middle row
    assert len(set(dark.tolist())) > 5
    flat_rows = (out[:, :, :, 0] == out[:, :, :, 0][:, :, :1]).all(dim=(1, 2))
    assert bool(flat_rows.all())  # columns stay columns: the crop neither rotates nor shears


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5])
def test_a_crop_scale_outside_0_to_1_is_a_clear_error(scale):
    with pytest.raises(ValueError, match="min_scale"):
        random_crops(_images(), scale, flip=False)
