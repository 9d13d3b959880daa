"""Hardened image decoding: untrusted bytes in, an RGB ``PIL.Image`` out, or ``ImageRejected`` saying why.

- The type is decided from the bytes (magic numbers), never from a file name or a client's Content-Type,
  against an allowlist: JPEG, PNG, WebP, GIF (first frame), BMP. Anything else is ``UnsupportedImage``.
- Pillow's decompression-bomb warning is an error here, and the service's own pixel cap (well below
  Pillow's) is checked from the header before any pixel is decoded: ``ImageTooLarge``.
- Truncated or corrupt data is ``ImageRejected`` (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off).
- EXIF orientation is applied; every mode becomes 8-bit RGB the same way each time: alpha (and palette
  transparency) is composited over white, CMYK/YCbCr/LAB converted, 16-bit and float scaled to 8 bits
  (in row blocks, so a 16-bit image never exists as float64 in full).
- Memory is budgeted across requests: before any pixel is decoded, the decode's peak is estimated from the
  header and reserved from a ``DecodeBudget`` shared by every in-flight request. A decode that can never
  fit is ``ImageTooLarge``; one that does not fit now is ``Overloaded`` (503, retry). The caller releases
  the reservation once it has turned the image into pixels (``DecodedImage.release``).
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.runtime.errors import ImageRejected, ImageTooLarge, Overloaded, UnsupportedImage

log = logging.getLogger("service.images")

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


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_SCALE_BLOCK = 1 << 22  # pixels per block when scaling high-bit images to 8 bits (32 MB of float64)


class DecodeBudget:
    """Bytes of decoding memory shared by every request in flight; reservations never block."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._used

    def reserve(self, nbytes: int, retry_after_s: int = 1) -> Reservation:
        if nbytes > self.total:
            raise ImageTooLarge(
                f"decoding this image needs about {nbytes / 2**20:.0f} MiB, over the service's decode budget "
                f"of {self.total / 2**20:.0f} MiB; send a smaller image",
                {"needed_bytes": nbytes, "budget_bytes": self.total},
            )
        with self._lock:
            if self._used + nbytes > self.total:
                raise Overloaded(
                    "the decode memory budget is in use by other requests; retry shortly",
                    retry_after_s=retry_after_s,
                )
            self._used += nbytes
        return Reservation(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes


class Reservation:
    """Part of a ``DecodeBudget``; ``release`` (idempotent) gives it back."""

    def __init__(self, budget: DecodeBudget, nbytes: int) -> None:
        self.budget, self.nbytes = budget, nbytes
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.budget._give_back(self.nbytes)


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow stores per pixel of ``mode`` (RGB, CMYK, LA… take 4 bytes internally)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_cost(width: int, height: int, mode: str) -> int:
    """Peak bytes of decoding a ``width`` × ``height`` image of ``mode`` to RGB: the decoded frame, one
    transposed or converted copy, the RGB result, and a float64 block for high-bit modes."""
    pixels = width * height
    block = 8 * min(pixels, _SCALE_BLOCK) if mode in _HIGH_BIT_MODES else 0
    return pixels * (2 * _bytes_per_pixel(mode) + 4) + block


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, 8-bit, EXIF orientation applied
    format: str  # one of ALLOWED_FORMATS
    width: int
    height: int
    reservation: Reservation | None = None  # decode memory held until the caller releases it

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


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
    # The decoder's own words stay in the log: they name its internals (object addresses, limits).
    log.info("image rejected", extra={"fields": {"format": fmt, "reason": f"{type(exc).__name__}: {exc}"}})
    return ImageRejected(f"cannot decode the {fmt} image: it is truncated or corrupt")


def _bomb(fmt: str, exc: BaseException) -> ImageTooLarge:
    log.info("image rejected", extra={"fields": {"format": fmt, "reason": f"{type(exc).__name__}: {exc}"}})
    return ImageTooLarge(
        f"decompression bomb refused: the {fmt} image would decode to far more pixels than allowed"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, deterministically (see module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _HIGH_BIT_MODES:
        values = np.asarray(image)  # native uint16 / int32 / float32: no float64 copy of the whole frame
        peak = float(values.max(initial=0))
        scale = 65535.0 if mode.startswith("I;16") or (mode == "I" and peak > 255) else 255.0
        if mode == "F":
            scale = 1.0 if peak <= 1.0 else 255.0
        pixels = np.empty(values.shape, dtype=np.uint8)
        rows = max(1, _SCALE_BLOCK // max(1, values.shape[1]))
        for top in range(0, values.shape[0], rows):  # (rows, W) float64 at a time
            block = values[top : top + rows].astype(np.float64)
            pixels[top : top + rows] = np.clip(np.rint(block / scale * 255.0), 0, 255)
        del values, block
        return Image.fromarray(pixels, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, RGBX…


def decode_image(data: bytes, max_pixels: int, budget: DecodeBudget | None = None) -> DecodedImage:
    """Decode untrusted ``data`` into an RGB image or raise ``ImageRejected`` (or a subclass); with a
    ``budget``, the decode's memory is reserved first and held by the result until ``release``."""
    if not data:
        raise ImageRejected("the image is empty (0 bytes)", code="empty_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(fmt, exc) from exc
    except (UnidentifiedImageError, *_LOAD_ERRORS) as exc:
        raise _corrupt(fmt, exc) from exc
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise _too_many_pixels(width, height, max_pixels)
        reservation = budget.reserve(decode_cost(width, height, image.mode)) if budget else None
        try:
            rgb = _load_rgb(image, fmt)
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
    return DecodedImage(rgb, fmt, rgb.width, rgb.height, reservation)


def _load_rgb(image: Image.Image, fmt: str) -> Image.Image:
    """The first frame of an opened ``image``, EXIF-oriented, as 8-bit RGB detached from its file."""
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no full-size copy when nothing is to be turned
        rgb = to_rgb(image)
        rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(fmt, exc) from exc
    except _LOAD_ERRORS as exc:
        raise _corrupt(fmt, exc) from exc
    except MemoryError as exc:
        raise ImageTooLarge("image needs too much memory to decode") from exc
    return rgb.copy() if rgb is image else rgb  # a copy detaches it from the file closed by the caller
