"""Datasets by name: ``load_dataset("synthfaces")`` (the embedded default), ``"celeba"``,
``"utzappos"`` and ``"folder"`` (your own images and a labels CSV)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

from model.data.base import AttributeDataset
from model.data.celeba import ALL_BUT_BLURRY, OFFICIAL_7, CelebA
from model.data.folder import ImageFolder
from model.data.synthfaces import DEFAULT_NUM_IMAGES, SynthFaces
from model.data.utzappos import UTZappos


class Loader(Protocol):
    def __call__(
        self,
        data_dir: Path | None,
        tasks: Sequence[str] | None,
        *,
        image_size: int,
        num_images: int | None,
        seed: int,
    ) -> AttributeDataset: ...


def _synthfaces(
    data_dir: Path | None, tasks: Sequence[str] | None, *, image_size: int, num_images: int | None, seed: int
) -> AttributeDataset:
    # Generated, so a data_dir is only somewhere to keep the rendered faces between runs.
    count = DEFAULT_NUM_IMAGES if num_images is None else num_images
    return SynthFaces(count, image_size=image_size, seed=seed, tasks=tasks, cache_dir=data_dir)


def _needs_dir(name: str, data_dir: Path | None) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} reads files: give its data_dir")
    return Path(data_dir)


def _celeba(
    data_dir: Path | None, tasks: Sequence[str] | None, *, image_size: int, num_images: int | None, seed: int
) -> AttributeDataset:
    return CelebA(_needs_dir("celeba", data_dir), tasks, num_images=num_images, seed=seed)


def _utzappos(
    data_dir: Path | None, tasks: Sequence[str] | None, *, image_size: int, num_images: int | None, seed: int
) -> AttributeDataset:
    return UTZappos(_needs_dir("utzappos", data_dir), tasks, num_images=num_images, seed=seed)


def _folder(
    data_dir: Path | None, tasks: Sequence[str] | None, *, image_size: int, num_images: int | None, seed: int
) -> AttributeDataset:
    return ImageFolder(_needs_dir("folder", data_dir), tasks, num_images=num_images, seed=seed)


# Named task lists: the official code's 7 CelebA attributes and the 39 without Blurry.
TASK_PRESETS: Final[dict[str, tuple[str, ...]]] = {"official7": OFFICIAL_7, "all39": ALL_BUT_BLURRY}

DATASETS: Final[dict[str, Loader]] = {
    "synthfaces": _synthfaces,
    "celeba": _celeba,
    "utzappos": _utzappos,
    "folder": _folder,
}


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    tasks: Sequence[str] | None = None,
    *,
    image_size: int = 64,
    num_images: int | None = None,
    seed: int = 0,
) -> AttributeDataset:
    """The dataset ``name`` with the named ``tasks`` (case-insensitive; None = its default list).

    ``image_size`` is the size synthfaces are drawn at (real images load at their stored size);
    ``num_images`` is synthfaces' count (default 4000) or a seeded subsample of a real dataset;
    ``seed`` picks the synthfaces family or that subsample.
    """
    loader = DATASETS.get(name.lower())
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return loader(data_dir, tasks, image_size=image_size, num_images=num_images, seed=seed)
