"""CelebA loader on fixtures in the official formats, and on the real sample when it is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data.base import DataFormatError
from model.data.celeba import ALL_BUT_BLURRY, ATTRIBUTES, OFFICIAL_7, CelebA

REAL_SAMPLE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "celeba-10k"


def _names(n: int) -> list[str]:
    return [f"{i:06d}.jpg" for i in range(1, n + 1)]


def _values(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice([-1, 1], size=(n, len(ATTRIBUTES)))


def write_celeba(
    root: Path,
    values: np.ndarray,
    *,
    newline: str = "\n",
    count_line: str | None = None,
    extra_rows: tuple[str, ...] = (),
    partition: list[int] | None = None,
    identity: list[int] | None = None,
) -> Path:
    """The official layout: a stale-able count line, names with a trailing space, space-padded values."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    names = _names(len(values))
    for name in names:
        Image.new("RGB", (8, 10), (200, 150, 100)).save(images / name)
    lines = [count_line or str(len(values)), " ".join(ATTRIBUTES) + " "]
    lines += [name + " " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values, strict=True)]
    lines += list(extra_rows)
    (root / "list_attr_celeba.txt").write_text(newline.join(lines) + newline, newline="")
    if partition is not None:
        rows = [f"{n} {p}" for n, p in zip(names, partition, strict=True)]
        (root / "list_eval_partition.txt").write_text(newline.join(rows) + newline, newline="")
    if identity is not None:
        rows = [f"{n} {i}" for n, i in zip(names, identity, strict=True)]
        (root / "identity_CelebA.txt").write_text(newline.join(rows) + newline, newline="")
    return root


def test_parses_labels_names_and_sources(tmp_path: Path) -> None:
    values = _values(6)
    data = CelebA(write_celeba(tmp_path, values))
    assert len(data) == 6
    assert data.task_names == list(ATTRIBUTES)
    assert np.array_equal(data.labels, (values == 1).astype(np.int64))
    assert data.sources[0] == "img_align_celeba/000001.jpg"
    assert data.load_image(0).size == (8, 10)
    assert data.load_image(0).mode == "RGB"


def test_crlf_blank_trailing_lines_and_untrusted_count(tmp_path: Path) -> None:
    values = _values(5)
    write_celeba(tmp_path, values, newline="\r\n", count_line="202599", extra_rows=("", "   ", ""))
    data = CelebA(tmp_path)
    assert len(data) == 5
    assert np.array_equal(data.labels, (values == 1).astype(np.int64))


def test_tasks_selected_case_insensitively_in_requested_order(tmp_path: Path) -> None:
    values = _values(4)
    data = CelebA(write_celeba(tmp_path, values), ["big_NOSE", "smiling"])
    assert data.task_names == ["Big_Nose", "Smiling"]
    columns = [ATTRIBUTES.index("Big_Nose"), ATTRIBUTES.index("Smiling")]
    assert np.array_equal(data.labels, (values[:, columns] == 1).astype(np.int64))
    with pytest.raises(DataFormatError, match="valid tasks: 5_o_Clock_Shadow"):
        CelebA(tmp_path, ["Smiling", "Happy"])


def test_identity_disjoint_splits(tmp_path: Path) -> None:
    identity = [i % 13 for i in range(60)]
    data = CelebA(write_celeba(tmp_path, _values(60), identity=identity))
    splits = {s: data.split_indices(s, seed=3) for s in ("train", "val", "test")}
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(60))
    owners = {s: set(np.asarray(identity)[idx].tolist()) for s, idx in splits.items()}
    assert not owners["train"] & owners["val"]
    assert not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]


def test_official_partition_used_when_present(tmp_path: Path) -> None:
    partition = [0, 0, 1, 2, 0, 2, 1, 0]
    data = CelebA(write_celeba(tmp_path, _values(8), partition=partition, identity=list(range(8))))
    assert data.split_indices("train").tolist() == [0, 1, 4, 7]
    assert data.split_indices("val", seed=9).tolist() == [2, 6]
    assert data.split_indices("test").tolist() == [3, 5]


def test_subsample_is_seeded(tmp_path: Path) -> None:
    values = _values(20)
    write_celeba(tmp_path, values, identity=list(range(20)))
    one, two = CelebA(tmp_path, num_images=7, seed=1), CelebA(tmp_path, num_images=7, seed=1)
    assert one.sources == two.sources and len(one) == 7
    rows = [int(s[-10:-4]) - 1 for s in one.sources]
    assert np.array_equal(one.labels, (values[rows] == 1).astype(np.int64))
    assert one.groups is not None and one.groups.tolist() == rows


def _one_bad_row(tmp_path: Path, row: str) -> Path:
    return write_celeba(tmp_path, _values(3), extra_rows=(row,))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("000004.jpg 1 -1 1", r"list_attr_celeba\.txt:6: expected 40 values after 000004\.jpg, found 3"),
        ("000004.jpg " + " ".join(["1"] * 39) + " 0", r"list_attr_celeba\.txt:6: Young is '0'"),
        (
            "000002.jpg " + " ".join(["1"] * 40),
            r"list_attr_celeba\.txt:6: 000002\.jpg already listed on line 4",
        ),
    ],
    ids=["short row", "bad value", "duplicate"],
)
def test_malformed_attribute_rows_name_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        CelebA(_one_bad_row(tmp_path, row))


def test_missing_images_are_named_not_dropped(tmp_path: Path) -> None:
    write_celeba(tmp_path, _values(5))
    (tmp_path / "img_align_celeba" / "000002.jpg").unlink()
    (tmp_path / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(
        DataFormatError, match=r"list_attr_celeba\.txt: 2 listed image.*000002\.jpg, 000004\.jpg"
    ):
        CelebA(tmp_path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"list_attr_celeba\.txt: file not found"):
        CelebA(tmp_path)
    write_celeba(tmp_path / "d", _values(2))
    for image in (tmp_path / "d" / "img_align_celeba").iterdir():
        image.unlink()
    (tmp_path / "d" / "img_align_celeba").rmdir()
    with pytest.raises(DataFormatError, match="img_align_celeba: image directory not found"):
        CelebA(tmp_path / "d")


def test_partition_or_identity_lacking_an_image(tmp_path: Path) -> None:
    write_celeba(tmp_path, _values(3), partition=[0, 1, 2])
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n")
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt: no partition for 1 image.*000003"):
        CelebA(tmp_path)
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg\n000003.jpg 2\n")
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt:2: expected"):
        CelebA(tmp_path)
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 3\n")
    with pytest.raises(DataFormatError, match=r"list_eval_partition\.txt:3: expected '<image> <0\|1\|2>'"):
        CelebA(tmp_path)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    write_celeba(tmp_path, _values(2))
    (tmp_path / "img_align_celeba" / "000002.jpg").write_bytes(b"not a jpeg")
    data = CelebA(tmp_path)
    data.load_image(0)
    with pytest.raises(DataFormatError, match=r"000002\.jpg: unreadable image"):
        data.load_image(1)


def test_attribute_sets() -> None:
    assert len(ATTRIBUTES) == 40 and len(set(ATTRIBUTES)) == 40
    assert set(OFFICIAL_7) <= set(ATTRIBUTES) and len(OFFICIAL_7) == 7
    assert len(ALL_BUT_BLURRY) == 39 and "Blurry" not in ALL_BUT_BLURRY


@pytest.mark.celeba
@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="real CelebA sample ../shared/data/celeba-10k absent")
def test_real_sample() -> None:
    data = CelebA(REAL_SAMPLE)
    assert data.labels.shape == (10_000, 40)
    assert set(np.unique(data.labels).tolist()) == {0, 1}
    assert data.groups is not None
    image = data.load_image(0)
    assert image.mode == "RGB" and image.size == (89, 109)
