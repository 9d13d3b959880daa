"""service.runtime.images: the type comes from the bytes, bombs and caps are 413, junk is 400/415, modes and
orientation are normalised."""

from __future__ import annotations

import pytest
from PIL import Image

from service.api.errors import status_of as http_status
from service.runtime.errors import ImageRejected
from service.runtime.images import decode_image, sniff_format, to_rgb
from service.settings import Settings
from tests.factories import encode
from tests.service import payloads

CAP = 1_000_000


def status_of(data: bytes, cap: int = CAP) -> int:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, cap)
    return http_status(info.value)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (b"just some text, named .jpg by a client", 415),
        (payloads.truncated_jpeg(), 400),
        (payloads.png_claiming(100_000, 100_000), 413),
        (payloads.tiff(), 415),
        (payloads.fits(), 415),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400),
    ],
    ids=["empty", "text", "truncated-jpeg", "png-bomb-header", "tiff", "fits", "png-garbage"],
)
def test_refused_inputs(data: bytes, status: int) -> None:
    assert status_of(data) == status


def test_pixel_cap_is_checked_before_decoding() -> None:
    assert status_of(payloads.blank_png(1001, 1000)) == 413
    assert decode_image(payloads.blank_png(1000, 1000), CAP).width == 1000


def test_pillow_bomb_range_is_refused_under_the_highest_allowed_cap() -> None:
    # 100M pixels: above Pillow's warning threshold (89M), below its error threshold (179M).
    assert Image.MAX_IMAGE_PIXELS is not None
    assert status_of(payloads.png_claiming(10_000, 10_000), cap=Image.MAX_IMAGE_PIXELS) == 413


def test_pixel_cap_setting_cannot_exceed_pillows() -> None:
    with pytest.raises(ValueError):
        Settings(_env_file=None, max_image_pixels=10**12)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (payloads.cmyk_jpeg(), "JPEG"),
        (payloads.palette_alpha_png(), "PNG"),
        (payloads.rgba_webp(), "WEBP"),
        (payloads.sixteen_bit_png(), "PNG"),
        (payloads.gif_animated(), "GIF"),
        (encode(Image.new("RGB", (9, 7)), "BMP"), "BMP"),
    ],
    ids=["cmyk", "palette-alpha", "rgba-webp", "16-bit", "animated-gif", "bmp"],
)
def test_any_mode_becomes_rgb(data: bytes, fmt: str) -> None:
    decoded = decode_image(data, CAP)
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    again = decode_image(data, CAP)
    assert again.image.tobytes() == decoded.image.tobytes()  # deterministic


def test_transparency_is_composited_over_white() -> None:
    decoded = decode_image(payloads.palette_alpha_png(), CAP)  # index 0 transparent, image filled with 1
    assert decoded.image.getpixel((0, 0)) == (0, 255, 0)
    clear = encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")
    assert decode_image(clear, CAP).image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_scales_to_eight() -> None:
    value = decode_image(payloads.sixteen_bit_png(), CAP).image.getpixel((0, 0))
    assert value == (round(50000 / 65535 * 255),) * 3


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(payloads.exif_rotated_jpeg(), CAP)
    assert decoded.image.size == (20, 40)


def test_sniffing_ignores_names_and_claims() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"II*\x00") is None


def test_to_rgb_handles_float_and_bilevel() -> None:
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
