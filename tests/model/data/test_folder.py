"""Image folder + labels CSV: binary spellings, categorical values, unknowns, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data.base import DataFormatError
from model.data.folder import ImageFolder, read_labels

HEADER = "filename,smiling,glasses,hat,mood,colour"
ROWS = (
    "a.jpg,1,-1,true,happy,red",
    "sub/b.png,0,1,FALSE,sad,",
    "c.jpg,,1,yes,calm,blue",
    "d.jpg,1,-1,No,happy,red",
)


def write_folder(root: Path, lines: tuple[str, ...] = (HEADER, *ROWS), newline: str = "\n") -> Path:
    for line in lines[1:]:
        name = line.split(",")[0]
        if name:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), (10, 20, 30)).save(root / name)
    (root / "labels.csv").write_text(newline.join(lines) + newline, newline="")
    return root


def test_binary_spellings_categorical_and_blank(tmp_path: Path) -> None:
    data = ImageFolder(write_folder(tmp_path))
    assert data.task_names == ["smiling", "glasses", "hat", "mood", "colour"]
    values = {task.name: task.values for task in data.tasks}
    assert values["smiling"] == values["glasses"] == values["hat"] == ("0", "1")
    assert values["mood"] == ("calm", "happy", "sad")
    assert values["colour"] == ("blue", "red")
    assert data.labels.tolist() == [
        [1, 0, 1, 1, 1],
        [0, 1, 0, 2, -1],
        [-1, 1, 1, 0, 0],
        [1, 0, 0, 1, 1],
    ]
    assert data.sources == ["a.jpg", "sub/b.png", "c.jpg", "d.jpg"]
    assert data.load_image(1).mode == "RGB"
    assert data.groups is None


def test_read_labels_by_name_as_a_gallery_stores_them(tmp_path: Path) -> None:
    labels = read_labels(write_folder(tmp_path) / "labels.csv")
    assert labels["a.jpg"] == {"smiling": 1, "glasses": 0, "hat": 1, "mood": "happy", "colour": "red"}
    assert labels["sub/b.png"] == {"smiling": 0, "glasses": 1, "hat": 0, "mood": "sad"}  # blank: unknown
    assert labels["c.jpg"] == {"glasses": 1, "hat": 1, "mood": "calm", "colour": "blue"}


def test_crlf_and_csv_path_override(tmp_path: Path) -> None:
    write_folder(tmp_path, newline="\r\n")
    (tmp_path / "labels.csv").rename(tmp_path / "mine.csv")
    data = ImageFolder(tmp_path, csv_path=tmp_path / "mine.csv")
    assert len(data) == 4 and data.labels[1, 3] == 2


def test_tasks_case_insensitive_and_subsample(tmp_path: Path) -> None:
    data = ImageFolder(write_folder(tmp_path), ["MOOD", "Smiling"])
    assert data.task_names == ["mood", "smiling"]
    with pytest.raises(DataFormatError, match="valid tasks: smiling, glasses, hat, mood, colour"):
        ImageFolder(tmp_path, ["age"])
    small = ImageFolder(tmp_path, ["mood"], num_images=2, seed=3)
    assert small.sources == ImageFolder(tmp_path, ["mood"], num_images=2, seed=3).sources
    assert small.tasks == data.tasks[:1]  # value ids do not depend on the subsample


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (("name,smiling", "a.jpg,1"), r"labels\.csv:1: no 'filename' column"),
        ((HEADER, ROWS[0], "sub/b.png,0,1"), r"labels\.csv:3: expected 6 fields, found 3"),
        ((HEADER, ROWS[0], ROWS[2], ROWS[0]), r"labels\.csv:4: a\.jpg already listed on line 2"),
        ((HEADER, ",1,1,1,x,y"), r"labels\.csv:2: blank filename"),
    ],
    ids=["no filename column", "short row", "duplicate", "blank filename"],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, lines: tuple[str, ...], message: str) -> None:
    with pytest.raises(DataFormatError, match=message):
        ImageFolder(write_folder(tmp_path, lines))


def test_missing_csv_missing_image_unreadable_image(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"labels\.csv: file not found"):
        ImageFolder(tmp_path)
    write_folder(tmp_path)
    (tmp_path / "c.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"labels\.csv: 1 listed image.*c\.jpg"):
        ImageFolder(tmp_path)
    Image.new("RGB", (6, 6)).save(tmp_path / "c.jpg")
    (tmp_path / "d.jpg").write_bytes(b"\x00garbage")
    data = ImageFolder(tmp_path)
    with pytest.raises(DataFormatError, match=r"d\.jpg: unreadable image"):
        data.load_image(3)
    assert np.asarray(data.load_image(0)).shape == (6, 6, 3)
