"""Hardened image decoding: untrusted bytes in, an RGB ``PIL.Image`` out, or ``ImageRejected`` saying why.

- The type is decided from the bytes (magic numbers), never from a file name or a client's Content-Type,
  against an allowlist: JPEG, PNG, WebP, GIF (first frame), BMP. Anything else is ``UnsupportedImage``.
- Pillow's decompression-bomb warning is an error here, and the service's own pixel cap (well below
  Pillow's) is checked from the header before any pixel is decoded: ``ImageTooLarge``.
- Truncated or corrupt data is ``ImageRejected`` (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off).
- EXIF orientation is applied; every mode becomes 8-bit RGB the same way each time: alpha (and palette
  transparency) is composited over white, CMYK/YCbCr/LAB converted, 16-bit and float scaled to 8 bits.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.runtime.errors import ImageRejected, ImageTooLarge, UnsupportedImage

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
_KNOWN_OTHERS = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"SIMPLE  =", "FITS"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)
# Pillow's decompression-bomb *warning* becomes an error for the whole process. A filter installed once,
# rather than ``warnings.catch_warnings()`` around each decode, because that context manager swaps global
# state and is not safe with decodes running in several threads at once.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

_LOAD_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, 8-bit, EXIF orientation applied
    format: str  # one of ALLOWED_FORMATS
    width: int
    height: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def sniff_format(data: bytes) -> str | None:
    """The allowed format these bytes start with, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def describe_unknown(data: bytes) -> str:
    for magic, name in _KNOWN_OTHERS:
        if data.startswith(magic):
            return name
    head = data[:64]
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unrecognised data"


def _unsupported(data: bytes) -> UnsupportedImage:
    kind = describe_unknown(data)
    return UnsupportedImage(
        f"not an allowed image type (looks like {kind}); send JPEG, PNG, WebP, GIF or BMP",
        {"detected": kind, "allowed": list(ALLOWED_FORMATS)},
    )


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"image of {width}x{height} = {width * height} pixels exceeds the cap of {max_pixels} pixels",
        {"width": width, "height": height, "max_pixels": max_pixels},
    )


def _corrupt(fmt: str, exc: BaseException) -> ImageRejected:
    return ImageRejected(f"cannot decode the {fmt} image: it is truncated or corrupt ({exc})")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, deterministically (see module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255) else 255.0
        if mode == "F":
            scale = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        pixels = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, RGBX…


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode untrusted ``data`` into an RGB image or raise ``ImageRejected`` (or a subclass)."""
    if not data:
        raise ImageRejected("the image is empty (0 bytes)", code="empty_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"decompression bomb refused: {exc}") from exc
    except (UnidentifiedImageError, *_LOAD_ERRORS) as exc:
        raise _corrupt(fmt, exc) from exc
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise _too_many_pixels(width, height, max_pixels)
        try:
            if getattr(image, "is_animated", False):
                image.seek(0)
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image) or image)
            rgb.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"decompression bomb refused: {exc}") from exc
        except _LOAD_ERRORS as exc:
            raise _corrupt(fmt, exc) from exc
        except MemoryError as exc:
            raise ImageTooLarge("image needs too much memory to decode") from exc
        if rgb is image:
            rgb = rgb.copy()  # detach from the file object closed below
    return DecodedImage(image=rgb, format=fmt, width=rgb.width, height=rgb.height)
