"""SynthFaces: procedurally drawn cartoon faces labelled with CelebA attribute names.

The embedded default dataset: nothing to download, any size, and the same task names as CelebA so a
model or a script runs unchanged on real faces. Item ``i`` is a pure function of ``(seed, i, size)``:
its random stream is ``np.random.default_rng([seed, i])``, whose first draws are the attributes (so
labels are known without drawing) and whose later draws are nuisances (position, scale, rotation,
background gradient, skin tone, colours, pixel noise), so no single image feature answers every task.

Attributes are independent fair coins, except hair colour: one categorical factor
{black, blond, brown, gray} drawn once. ``Bald`` faces have no hair drawn anywhere, so their hair-colour
labels are all 0 (nothing visible to label). A hat covers only the top of the head; the hair at the
sides stays visible, so hair labels stand under a hat.

Faces are drawn at 2x with polygons in a face-centred coordinate frame (one unit = the face's
half-width) mapped to pixels by a similarity transform — rotation comes free, with no image resampling —
then reduced 2x (a box filter: anti-aliasing at a fraction of LANCZOS's cost).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageDraw

from model.data.base import AttributeDataset, TaskSpec
from model.data.reading import select_tasks
from model.durable import atomic_write

DEFAULT_TASKS: Final = (
    "Smiling",
    "Mouth_Slightly_Open",
    "Eyeglasses",
    "Wearing_Hat",
    "Bald",
    "Black_Hair",
    "Blond_Hair",
    "Mustache",
    "Pale_Skin",
    "Oval_Face",
    "Arched_Eyebrows",
    "Big_Nose",
)
ALL_TASKS: Final = (*DEFAULT_TASKS, "Brown_Hair", "Gray_Hair")
DEFAULT_NUM_IMAGES: Final = 4000

# The independent coins, in draw order; changing the order changes every face.
_COINS: Final = (
    "Smiling",
    "Mouth_Slightly_Open",
    "Eyeglasses",
    "Wearing_Hat",
    "Bald",
    "Mustache",
    "Pale_Skin",
    "Oval_Face",
    "Arched_Eyebrows",
    "Big_Nose",
)
# The hair-colour factor: each value's label and colour.
_HAIR: Final = {
    "Black_Hair": (25, 20, 20),
    "Blond_Hair": (235, 205, 110),
    "Brown_Hair": (115, 70, 35),
    "Gray_Hair": (165, 165, 170),
}
_HAIR_FACTOR: Final = tuple(_HAIR)
_PALE_SKIN: Final = (250, 238, 230)
_OTHER_SKINS: Final = ((232, 186, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36), (100, 62, 38))
_SUPERSAMPLE: Final = 2
_CIRCLE: Final = np.exp(1j * np.linspace(0.0, 2 * math.pi, 24, endpoint=False))
_RAMP_DIRECTIONS: Final = 24
_BROW_X: Final = np.array([0.16, 0.27, 0.38, 0.49, 0.6])
_MOUSTACHE_X: Final = np.linspace(-0.38, 0.38, 7)
_MOUTH_X: Final = np.linspace(-0.38, 0.38, 9)


def sample_labels(seed: int, index: int) -> dict[str, int]:
    """The face's labels for every task in ``ALL_TASKS``, without drawing it."""
    return _labels(np.random.default_rng([seed, index]))


def _labels(rng: np.random.Generator) -> dict[str, int]:
    coins = rng.random(len(_COINS)) < 0.5
    labels = {name: int(flag) for name, flag in zip(_COINS, coins, strict=True)}
    hair = _HAIR_FACTOR[int(rng.integers(len(_HAIR_FACTOR)))]
    for name in _HAIR_FACTOR:
        labels[name] = int(name == hair and not labels["Bald"])
    return labels


class _Pen:
    """Draws shapes given in face units through a similarity transform onto a supersampled canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, centre: complex, unit: float, angle: float) -> None:
        self.draw = draw
        self.centre = centre
        self.rot = unit * np.exp(1j * angle)  # complex multiply = scale + rotate
        self.unit = unit

    def _xy(self, points: np.ndarray) -> list[float]:
        pix = self.centre + self.rot * np.asarray(points, dtype=np.complex128)
        return pix.view(np.float64).tolist()  # complex128 viewed as float64 is x0, y0, x1, y1, ...

    def polygon(self, points: np.ndarray, fill: tuple[int, ...]) -> None:
        self.draw.polygon(self._xy(points), fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple[int, ...]) -> None:
        self.polygon(complex(cx, cy) + rx * _CIRCLE.real + 1j * ry * _CIRCLE.imag, fill)

    def line(self, points: np.ndarray, width: float, fill: tuple[int, ...]) -> None:
        self.draw.line(self._xy(points), fill=fill, width=max(1, round(width * self.unit)), joint="curve")

    def ring(self, cx: float, cy: float, r: float, width: float, fill: tuple[int, ...]) -> None:
        circle = complex(cx, cy) + r * _CIRCLE
        self.line(np.append(circle, circle[:2]), width, fill)


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], amount: int) -> tuple[int, ...]:
    deltas = rng.integers(-amount, amount + 1, 3).tolist()
    return tuple(min(255, max(0, c + d)) for c, d in zip(colour, deltas, strict=True))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A linear gradient between two random colours in a random direction."""
    c0, c1 = rng.integers(30, 226, (2, 3)).tolist()
    ramp = _ramps(size)[int(rng.integers(_RAMP_DIRECTIONS))]
    return Image.composite(
        Image.new("RGB", ramp.size, tuple(c1)), Image.new("RGB", ramp.size, tuple(c0)), ramp
    )


@functools.cache
def _ramps(size: int) -> tuple[Image.Image, ...]:
    """0..255 ramps across a ``size`` square in evenly spaced directions: precomputed because per-face
    gradient arithmetic cost more than drawing the face."""
    ramp = Image.linear_gradient("L").resize((2 * size, 2 * size), Image.Resampling.BILINEAR)
    box = (size // 2, size // 2, size // 2 + size, size // 2 + size)
    turns = np.arange(_RAMP_DIRECTIONS) * 360 / _RAMP_DIRECTIONS
    return tuple(ramp.rotate(a, Image.Resampling.BILINEAR).crop(box) for a in turns)


def _draw_face(pen: _Pen, rng: np.random.Generator, labels: dict[str, int]) -> None:
    frx, fry = (0.8, 1.3) if labels["Oval_Face"] else (1.0, 1.0)
    skin = _jitter(rng, _PALE_SKIN if labels["Pale_Skin"] else _OTHER_SKINS[rng.integers(5)], 8)
    shade = tuple(int(c * 0.45) for c in skin)
    shown = [colour for name, colour in _HAIR.items() if labels[name]]  # empty when bald
    hair = _jitter(rng, shown[0], 12) if shown else None
    dark = _jitter(rng, (35, 25, 25), 15)

    if hair is not None:  # hair behind the head, showing above it and down its sides
        pen.ellipse(0.0, -0.12, frx + 0.2, fry + 0.12, hair)
    pen.ellipse(0.0, 0.0, frx, fry, skin)
    if hair is not None:  # the hair cap over the top of the head, above the eyebrows
        cap = _CIRCLE[_CIRCLE.imag < -0.55]
        pen.polygon(np.append(frx * 1.02 * cap.real + 1j * fry * 1.02 * cap.imag, -0.68j), hair)
    if labels["Wearing_Hat"]:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        top, brim, edge = -fry - 0.55, -0.76, -0.6
        pen.polygon(np.array([-0.8 + 1j * top, 0.8 + 1j * top, 0.85 + 1j * brim, -0.85 + 1j * brim]), colour)
        pen.polygon(np.array([-1.3 + 1j * brim, 1.3 + 1j * brim, 1.3 + 1j * edge, -1.3 + 1j * edge]), colour)

    for side in (-1.0, 1.0):
        pen.ellipse(side * 0.38, -0.12, 0.12, 0.08, dark)
        x = side * _BROW_X
        arched = labels["Arched_Eyebrows"]
        lift = 0.25 * (1 - ((x - side * 0.38) / 0.22) ** 2) if arched else np.zeros_like(x)
        pen.line(x + 1j * (-0.35 - lift), 0.11, dark)
    if labels["Eyeglasses"]:
        frame = _jitter(rng, (20, 20, 30), 20)
        pen.ring(-0.38, -0.12, 0.25, 0.08, frame)
        pen.ring(0.38, -0.12, 0.25, 0.08, frame)
        pen.line(np.array([-0.13 - 0.14j, 0.13 - 0.14j]), 0.08, frame)

    half, low = (0.34, 0.54) if labels["Big_Nose"] else (0.06, 0.18)
    pen.polygon(np.array([0.0 - 0.04j, half + 1j * low, -half + 1j * low]), shade)
    if labels["Mustache"]:
        x = _MOUSTACHE_X
        arch = 0.44 + 0.05 * (x / 0.38) ** 2
        pen.polygon(np.concatenate([x + 1j * arch, x[::-1] + 1j * (arch[::-1] + 0.13)]), dark)
    _draw_mouth(pen, labels, rng)


def _draw_mouth(pen: _Pen, labels: dict[str, int], rng: np.random.Generator) -> None:
    x = _MOUTH_X
    bend = 0.5 * (1 - (x / 0.38) ** 2)  # corners up (y grows downwards) when smiling
    lips = _jitter(rng, (150, 45, 55), 20)
    if labels["Mouth_Slightly_Open"]:
        inside = _jitter(rng, (70, 10, 20), 10)
        if labels["Smiling"]:
            pen.polygon(np.concatenate([x + 0.68j, x[::-1] + 1j * (0.68 + bend[::-1])]), inside)
        else:
            pen.ellipse(0.0, 0.76, 0.24, 0.16, inside)
    else:
        pen.line(x + 1j * (0.68 + (bend if labels["Smiling"] else np.zeros_like(x))), 0.13, lips)


def render_face(seed: int, index: int, image_size: int) -> tuple[Image.Image, dict[str, int]]:
    """Face ``index`` of the ``seed`` family at ``image_size`` pixels, with its labels for ``ALL_TASKS``."""
    rng = np.random.default_rng([seed, index])
    labels = _labels(rng)
    big = image_size * _SUPERSAMPLE
    canvas = _background(rng, big)
    unit = big * rng.uniform(0.28, 0.32)
    centre = complex(*(big * (0.5 + rng.uniform(-0.04, 0.04, 2))))
    centre += 0.3j * unit  # the hat and hair reach further above the face centre than the chin below
    pen = _Pen(ImageDraw.Draw(canvas), centre, unit, math.radians(rng.uniform(-12, 12)))
    _draw_face(pen, rng, labels)
    pixels = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.int16)
    amount = int(rng.integers(3, 12))  # uniform pixel noise: as good a nuisance as Gaussian, 3x cheaper
    pixels = pixels + rng.integers(-amount, amount + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), labels


class SynthFaces(AttributeDataset):
    """``num_images`` faces; images are rendered once each, on first use, and kept in memory. With
    ``cache_dir`` every face is rendered up front and kept in one ``.npy`` file reused across runs."""

    def __init__(
        self,
        num_images: int = DEFAULT_NUM_IMAGES,
        image_size: int = 64,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if num_images < 1 or image_size < 8:
            raise ValueError(f"need num_images >= 1 and image_size >= 8, got {num_images}, {image_size}")
        self.name = "synthfaces"
        self.seed, self.image_size = seed, image_size
        chosen = [ALL_TASKS[i] for i in select_tasks(ALL_TASKS, tasks or DEFAULT_TASKS, self.name)]
        self.tasks = tuple(TaskSpec(name, ("0", "1")) for name in chosen)
        rows = [sample_labels(seed, i) for i in range(num_images)]
        self.labels = np.array([[row[name] for name in chosen] for row in rows], dtype=np.int64)
        self.sources = [f"synthfaces/{seed}/{i:06d}" for i in range(num_images)]
        self.groups = None
        self._cache: dict[int, np.ndarray] = {}
        self._array: np.ndarray | None = None
        if cache_dir is not None:
            self._array = self._load_or_render(Path(cache_dir))

    def pixels(self, index: int) -> np.ndarray:
        """The face as an (H, W, 3) uint8 array."""
        if self._array is not None:
            return np.asarray(self._array[index])
        if index not in self._cache:
            if not 0 <= index < len(self):
                raise IndexError(f"synthfaces index {index} out of range for {len(self)} faces")
            self._cache[index] = np.asarray(render_face(self.seed, index, self.image_size)[0])
        return self._cache[index]

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels(index))

    def _load_or_render(self, cache_dir: Path) -> np.ndarray:
        path = cache_dir / f"synthfaces-seed{self.seed}-n{len(self)}-{self.image_size}px.npy"
        shape = (len(self), self.image_size, self.image_size, 3)
        if path.exists():
            array = np.load(path, mmap_mode="r")
            if array.shape == shape and array.dtype == np.uint8:
                return array
        array = np.stack([self.pixels(i) for i in range(len(self))])
        self._cache.clear()
        # Written to a temporary file, fsynced and renamed (creating cache_dir if needed), so a concurrent or
        # interrupted run never sees half a file.
        atomic_write(path, lambda tmp: _save_npy(tmp, array))
        return array


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: given a name, np.save would append ".npy" to it
        np.save(f, array)
