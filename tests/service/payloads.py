"""Hostile and unusual request payloads, built in memory."""

from __future__ import annotations

import struct
import zlib

from PIL import Image

from tests.factories import encode


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` RGB pixels (a decompression-bomb header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def blank_png(width: int, height: int) -> bytes:
    return encode(Image.new("L", (width, height), 128), "PNG", optimize=True)


def truncated_jpeg() -> bytes:
    data = encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG", quality=90)
    return data[: len(data) // 2]


def tiff() -> bytes:
    return encode(Image.new("RGB", (16, 16), "blue"), "TIFF")


def fits() -> bytes:
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    0",
        "END",
    ]
    header = "".join(card.ljust(80) for card in cards).ljust(2880)
    return header.encode("ascii")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (0, 120, 200, 10)), "JPEG")


def palette_alpha_png() -> bytes:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    return encode(image, "PNG", transparency=0)


def rgba_webp() -> bytes:
    return encode(Image.new("RGBA", (40, 40), (10, 200, 30, 90)), "WEBP", lossless=True)


def sixteen_bit_png() -> bytes:
    return encode(Image.new("I;16", (40, 40), 50000), "PNG")


def gif_animated() -> bytes:
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says 'rotate 90°': decoded, it must be 20x40."""
    image = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes())


def empty_parts_multipart(parts: int, boundary: str = "xyzBOUNDARYzyx") -> tuple[bytes, str]:
    """``parts`` empty form parts: a cheap body that is expensive to parse without a part cap."""
    one = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\n\r\n'.encode()
    body = one * parts + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
