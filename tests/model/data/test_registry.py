"""load_dataset: names, task selection, data_dir requirements, subsampling."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from model.data import DATASETS, load_dataset
from model.data.base import AttributeDataset, DataFormatError
from model.data.synthfaces import DEFAULT_TASKS


def test_registry_names() -> None:
    assert set(DATASETS) == {"synthfaces", "celeba", "utzappos", "folder"}


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=f"valid datasets: {', '.join(DATASETS)}"):
        load_dataset("imagenet")


def test_synthfaces_by_default_settings_and_tasks() -> None:
    data = load_dataset("synthfaces", num_images=10, image_size=32, seed=1)
    assert isinstance(data, AttributeDataset)
    assert len(data) == 10 and data.task_names == list(DEFAULT_TASKS)
    assert data.load_image(0).size == (32, 32)
    picked = load_dataset("SynthFaces", tasks=["bald", "eyeglasses"], num_images=4, image_size=16)
    assert picked.task_names == ["Bald", "Eyeglasses"]
    with pytest.raises(DataFormatError, match="valid tasks"):
        load_dataset("synthfaces", tasks=["Sunburn"], num_images=4, image_size=16)


def test_synthfaces_data_dir_is_a_render_cache(tmp_path: Path) -> None:
    load_dataset("synthfaces", tmp_path, num_images=3, image_size=16)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]


# Every dataset but the generated one reads files.
@pytest.mark.parametrize("name", [name for name in DATASETS if name != "synthfaces"])
def test_file_datasets_need_a_data_dir(name: str) -> None:
    with pytest.raises(ValueError, match="give its data_dir"):
        load_dataset(name)


def test_real_dataset_subsample_is_seeded(tmp_path: Path) -> None:
    rows = ["filename,smiling"]
    for i in range(12):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg,{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    one = load_dataset("folder", tmp_path, num_images=5, seed=2)
    assert len(one) == 5
    assert one.sources == load_dataset("folder", tmp_path, num_images=5, seed=2).sources
    assert len(load_dataset("folder", tmp_path)) == 12
