"""A user's own labelled folder, as the README's own-data section describes it: ``shirt-001.jpg`` … and
a ``labels.csv`` with a ``filename`` column and one column per attribute (``colour``, ``sleeves``).

Each image draws its labels (a shirt of that colour, with long or short sleeves, on a grey background), so
a model can learn them; seeded, so every call with the same arguments writes the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HEADER = "filename,colour,sleeves"
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200)}
SLEEVES = ("long", "short")


def shirt_name(index: int) -> str:
    return f"shirt-{index + 1:03d}.jpg"


def write_shirts(root: Path, count: int = 60, seed: int = 0, size: int = 64) -> Path:
    """``count`` shirt images and their ``labels.csv`` in ``root`` (created); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = [HEADER]
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        sleeves = SLEEVES[i % len(SLEEVES)]
        grey = int(rng.integers(150, 230))
        image = Image.new("RGB", (size, size), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        jitter = int(rng.integers(-4, 5))
        body = (size * 0.3 + jitter, size * 0.2, size * 0.7 + jitter, size * 0.9)
        arm = size * (0.75 if sleeves == "long" else 0.4)
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
        draw.rectangle(body, fill=fill)
        draw.rectangle((body[0] - size * 0.15, body[1], body[0], body[1] + arm * 0.8), fill=fill)
        draw.rectangle((body[2], body[1], body[2] + size * 0.15, body[1] + arm * 0.8), fill=fill)
        image.save(root / shirt_name(i), quality=90)
        lines.append(f"{shirt_name(i)},{colour},{sleeves}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root
