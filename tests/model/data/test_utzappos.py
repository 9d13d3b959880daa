"""UT-Zappos50K loader on fixtures in the official layout, with and without CSN's triplet lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data.base import DataFormatError
from model.data.utzappos import UTZappos

META_HEADER = "CID,Category,SubCategory,HeelHeight,Insole,Closure,Gender,Material,ToeStyle"
# (image path under the images dir, the meta-data.csv row)
SHOES = (
    (
        "Shoes/Oxfords/Bostonian/100627.72.jpg",
        "100627-72,Shoes,Oxfords,,Padded,Lace up,Men,Leather,Round Toe",
    ),
    ("Boots/Ankle/Clarks/7965307.5291.jpg", "7965307-5291,Boots,Ankle,1in - 1 3/4 in,,Zipper,Women,Suede,"),
    ("Sandals/Flat/Teva/8041930.38.jpg", "8041930-38,Sandals,Flat,Flat,,Buckle,Women,Synthetic,Open Toe"),
    ("Shoes/Heels/Nine West/7751331.3.jpg", "7751331-3,Shoes,Heels,High heel,,Slip-On,Women,Leather,Pointed"),
    ("Slippers/Slipper Heels/UGG/8090776.jpg", "8090776,Slippers,Slipper Heels,Flat,,Slip-On,Girls,,"),
)


def write_zappos(root: Path, meta_subdir: str = "ut-zap50k-data", newline: str = "\n") -> Path:
    for path, _ in SHOES:
        image = root / "ut-zap50k-images-square" / path
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (250, 250, 250)).save(image)
    (root / meta_subdir).mkdir(parents=True, exist_ok=True)
    lines = [META_HEADER, *(row for _, row in SHOES)]
    (root / meta_subdir / "meta-data.csv").write_text(newline.join(lines) + newline, newline="")
    return root


def write_csn(root: Path, lists: dict[str, list[str]], *, as_json: bool = False) -> None:
    """CSN's files: filenames.json, and per condition and split 'anchor far close' lines."""
    folder = root / "tripletlists"
    folder.mkdir()
    paths = [path for path, _ in SHOES]
    text = json.dumps(paths) if as_json else "\n".join(paths) + "\n"
    (root / "filenames.json").write_text(text)
    for name, lines in lists.items():
        (folder / name).write_text("\n".join(lines) + "\n")


def _all_lists(lines: list[str]) -> dict[str, list[str]]:
    return {
        f"{c}_tripletlist_{s}.txt": lines
        for c in ("class", "closure", "gender", "heel")
        for s in ("train", "val", "test")
    }


def test_items_from_meta_data(tmp_path: Path) -> None:
    data = UTZappos(write_zappos(tmp_path))
    assert data.task_names == ["class", "closure", "gender", "heel"]
    values = {t.name: t.values for t in data.tasks}
    assert values["class"] == ("Boots", "Sandals", "Shoes", "Slippers")
    assert values["gender"] == ("Girls", "Men", "Women")
    assert values["heel"] == ("1in - 1 3/4 in", "Flat", "High heel")
    assert data.labels.tolist() == [[2, 1, 1, -1], [0, 3, 2, 0], [1, 0, 2, 1], [2, 2, 2, 2], [3, 2, 0, 1]]
    assert data.sources[1] == "ut-zap50k-images-square/Boots/Ankle/Clarks/7965307.5291.jpg"
    assert data.load_image(4).size == (8, 8)
    assert data.official_triplets == {}
    splits = [data.split_indices(s) for s in ("train", "val", "test")]
    assert sorted(np.concatenate(splits).tolist()) == list(range(5))


def test_meta_beside_images_crlf_and_task_case(tmp_path: Path) -> None:
    data = UTZappos(write_zappos(tmp_path, meta_subdir=".", newline="\r\n"), ["HEEL", "Class"])
    assert data.task_names == ["heel", "class"]
    assert data.labels[0].tolist() == [-1, 2]
    with pytest.raises(DataFormatError, match="valid tasks: class, closure, gender, heel"):
        UTZappos(tmp_path, ["material"])


def test_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"meta-data\.csv not found"):
        UTZappos(tmp_path)
    write_zappos(tmp_path)
    meta = tmp_path / "ut-zap50k-data" / "meta-data.csv"
    meta.write_text("CID,Category,Gender\n1-1,Shoes,Men\n")
    with pytest.raises(DataFormatError, match=r"meta-data\.csv:1: missing column\(s\) Closure, HeelHeight"):
        UTZappos(tmp_path)
    meta.write_text("\n".join([META_HEADER, SHOES[0][1], "100627-72,Shoes"]) + "\n")
    with pytest.raises(DataFormatError, match=r"meta-data\.csv:3: expected 9 fields, found 2"):
        UTZappos(tmp_path)
    meta.write_text("\n".join([META_HEADER, SHOES[0][1], SHOES[1][1], SHOES[0][1]]) + "\n")
    with pytest.raises(DataFormatError, match=r"meta-data\.csv:4: CID 100627-72 already listed on line 2"):
        UTZappos(tmp_path)
    meta.write_text("\n".join([META_HEADER, SHOES[0][1], "555-5,Boots,Ankle,,,,Men,,"]) + "\n")
    with pytest.raises(DataFormatError, match=r"meta-data\.csv: no image .* 1 CID\(s\), first: 555-5"):
        UTZappos(tmp_path)


@pytest.mark.parametrize("as_json", [False, True], ids=["one path per line", "json list"])
def test_csn_triplets_anchor_far_close(tmp_path: Path, as_json: bool) -> None:
    write_zappos(tmp_path)
    lists = _all_lists(["0 1 2", "3  4 0"])
    lists["gender_tripletlist_test.txt"] = ["4 0 1"]
    write_csn(tmp_path, lists, as_json=as_json)
    data = UTZappos(tmp_path)
    assert data.sources[0] == "ut-zap50k-images-square/Shoes/Oxfords/Bostonian/100627.72.jpg"
    test = data.official_triplets["test"]
    assert len(test) == 7  # two lines in each of three conditions, one in gender
    assert test.anchor.tolist() == [0, 3, 0, 3, 4, 0, 3]
    assert test.positive.tolist() == [2, 0, 2, 0, 1, 2, 0]  # the third column: close
    assert test.negative.tolist() == [1, 4, 1, 4, 0, 1, 4]  # the second column: far
    assert test.task.tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert data.split_indices("train").tolist() == [0, 1, 2, 3, 4]


def test_csn_with_a_task_subset_and_subsample(tmp_path: Path) -> None:
    write_zappos(tmp_path)
    write_csn(tmp_path, _all_lists(["0 1 2", "3 4 0", "1 2 3"]))
    data = UTZappos(tmp_path, ["gender"])
    assert data.official_triplets["val"].task.tolist() == [0, 0, 0]
    small = UTZappos(tmp_path, num_images=3, seed=0)
    assert len(small) == 3
    for t in small.official_triplets.values():
        assert (np.concatenate([t.anchor, t.positive, t.negative]) < 3).all()


def test_image_without_meta_row_gets_unknown_labels(tmp_path: Path) -> None:
    write_zappos(tmp_path)
    meta = tmp_path / "ut-zap50k-data" / "meta-data.csv"
    meta.write_text("\n".join([META_HEADER, *(row for _, row in SHOES[1:])]) + "\n")
    write_csn(tmp_path, _all_lists(["1 2 3"]))
    assert UTZappos(tmp_path).labels[0].tolist() == [-1, -1, -1, -1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 1", "expected three indices"),
        ("0 1 x", "expected three indices"),
        ("0 1 9", "index 9 beyond the 5"),
    ],
)
def test_bad_triplet_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    write_zappos(tmp_path)
    lists = _all_lists(["0 1 2"])
    lists["heel_tripletlist_val.txt"] = ["0 1 2", "", line]
    write_csn(tmp_path, lists)
    with pytest.raises(DataFormatError, match=rf"heel_tripletlist_val\.txt:3: {message}"):
        UTZappos(tmp_path)


def test_incomplete_lists_and_missing_listed_image(tmp_path: Path) -> None:
    write_zappos(tmp_path)
    lists = _all_lists(["0 1 2"])
    del lists["closure_tripletlist_train.txt"]
    write_csn(tmp_path, lists)
    with pytest.raises(DataFormatError, match="train triplet lists incomplete, missing closure_tripletlist"):
        UTZappos(tmp_path)
    (tmp_path / "ut-zap50k-images-square" / SHOES[2][0]).unlink()
    with pytest.raises(DataFormatError, match=r"filenames\.json: 1 listed image.*8041930\.38\.jpg"):
        UTZappos(tmp_path, ["class"])
