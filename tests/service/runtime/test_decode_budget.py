"""Decode memory: one budget shared by every request in flight, estimated from the header before any pixel
is decoded; high-bit images scaled to 8 bits in blocks, equal to the whole-frame formula."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.runtime.errors import ImageTooLarge, Overloaded
from service.runtime.images import DecodeBudget, decode_cost, decode_image, to_rgb

ROOT = Path(__file__).resolve().parents[3]


def png16(width: int, height: int, seed: int = 0) -> bytes:
    values = np.random.default_rng(seed).integers(0, 65536, size=(height, width), dtype=np.uint16)
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG")
    return out.getvalue()


def test_reservations_add_up_and_are_given_back() -> None:
    budget = DecodeBudget(1000)
    first = budget.reserve(600)
    with pytest.raises(Overloaded) as refused:
        budget.reserve(500)  # would pass the budget while the first is held: 503, retry
    assert refused.value.retry_after_s == 1 and budget.in_use == 600
    first.release()
    first.release()  # idempotent: given back once
    assert budget.in_use == 0
    budget.reserve(1000).release()


def test_a_decode_that_can_never_fit_is_too_large() -> None:
    with pytest.raises(ImageTooLarge) as info:
        DecodeBudget(1000).reserve(1001)
    assert info.value.details == {"needed_bytes": 1001, "budget_bytes": 1000}


def test_decode_holds_its_reservation_until_released() -> None:
    data = png16(64, 48)
    budget = DecodeBudget(10**9)
    decoded = decode_image(data, 10**6, budget)
    assert budget.in_use == decode_cost(64, 48, "I;16") > 0
    decoded.release()
    assert budget.in_use == 0


def test_a_failed_decode_gives_its_reservation_back() -> None:
    data = png16(64, 48)
    budget = DecodeBudget(10**9)
    with pytest.raises(Exception, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], 10**6, budget)
    assert budget.in_use == 0


def test_busy_budget_refuses_before_decoding() -> None:
    budget = DecodeBudget(decode_cost(64, 48, "I;16") + 10)
    held = decode_image(png16(64, 48), 10**6, budget)
    with pytest.raises(Overloaded):
        decode_image(png16(64, 48, seed=1), 10**6, budget)
    held.release()
    decode_image(png16(64, 48, seed=1), 10**6, budget).release()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_block_scaling_equals_the_whole_frame_formula(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(37, 53), dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(0, 70000, size=(37, 53)).astype(np.int32), "I")
    else:
        image = Image.fromarray(rng.random((37, 53), dtype=np.float32) * 200, "F")
    assert image.mode == mode
    values = np.asarray(image, dtype=np.float64)
    scale = 65535.0 if mode == "I;16" or (mode == "I" and values.max() > 255) else 255.0
    if mode == "F":
        scale = 1.0 if values.max() <= 1.0 else 255.0
    expected = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
    monkeypatch.setattr("service.runtime.images._SCALE_BLOCK", 100)  # many blocks of 1-2 rows
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (37, 53, 3)
    np.testing.assert_array_equal(rgb[..., 0], expected)


def test_a_large_16_bit_image_decodes_within_its_estimate(tmp_path: Path) -> None:
    # A 4,890 x 4,890 16-bit PNG (a few KB on the wire): measured in a fresh process, its peak memory stays
    # within the estimate the budget reserves (whole-frame float64 scaling took about three times more).
    path = tmp_path / "big.png"
    values = np.zeros((4890, 4890), dtype=np.uint16)
    values[::7, ::3] = 40000
    Image.fromarray(values).save(path)
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from service.runtime.images import decode_cost, decode_image
        data = open({str(path)!r}, "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        decode_image(data, 24_000_000).release()
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(grew, decode_cost(4890, 4890, "I;16"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grew, estimate = map(int, done.stdout.split())
    assert grew <= 1.1 * estimate, (grew, estimate)
