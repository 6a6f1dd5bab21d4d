"""Decode one image file the way users really have them, into a uint8 (C, H, W) array.

Pure Pillow + numpy (no torch): the ONNX predict path and the cache-building worker processes
import this module. Every way a file can be unusable becomes `BadImage(reason)` so callers can list
the file and carry on.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Anything bigger is treated as a decompression bomb (Pillow's own default limit is ~89 Mpx).
MAX_PIXELS = 89_478_485
BACKGROUND = 255  # transparent pixels are composited onto white, as image viewers show them

from imgarena.config import RESIZE_MODES  # noqa: E402,F401  (one copy of the choice list)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class BadImage(Exception):
    """A file that cannot be used as an image; str(e) is the reason shown to the user."""


# What Pillow raises for bytes it cannot decode (UnidentifiedImageError and "image file is
# truncated" are OSErrors; plugins raise SyntaxError/ValueError/EOFError/struct.error on malformed
# headers and chunks). Anything else (TypeError, IndexError, ...) is a bug and must surface as one.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

_SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
            (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"))


def _check_regular(path) -> None:
    """Reject anything but a regular file by stat alone: opening a FIFO blocks forever, a device
    never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise BadImage(f"cannot read file ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL if test(mode)), "a special file")
        raise BadImage(f"not a regular file ({kind})")


def is_image_file(name: str) -> bool:
    """True for visible files with an image extension (hidden files such as ._x.jpg are skipped)."""
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _why_unopenable(path, e: Exception) -> str:
    try:
        if isinstance(path, (str, bytes, os.PathLike)):
            empty = os.path.getsize(path) == 0
        else:  # a file-like object (an upload, BytesIO): its length is where its end is
            empty = path.seek(0, os.SEEK_END) == 0
        if empty:
            return "empty file (0 bytes)"
    except OSError as err:
        return f"cannot read file ({err.strerror or err})"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unrecognised content)"
    return f"cannot open ({e})"


def open_image(path, *, max_pixels: int | None = None) -> Image.Image:
    """Open `path` (a file path or a file-like object) lazily, header only, rejecting special files
    (FIFOs, devices), empty files, non-images and decompression bombs; `max_pixels` lowers the
    bomb limit (a server's --max-pixels)."""
    if isinstance(path, (str, bytes, os.PathLike)):
        _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb (too many pixels)") from None
    except DECODE_ERRORS as e:  # UnidentifiedImageError is an OSError
        raise BadImage(_why_unopenable(path, e)) from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise BadImage(f"decompression bomb ({w}x{h} pixels exceeds {MAX_PIXELS})")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise BadImage(f"too many pixels ({w}x{h} exceeds the limit of {max_pixels}, --max-pixels; "
                       "a decompression bomb or a photo to shrink first)")
    if w < 1 or h < 1:
        img.close()
        raise BadImage(f"invalid size {w}x{h}")
    return img


def is_gray(img: Image.Image) -> bool:
    """Grayscale by mode; a palette image counts as gray when its palette is."""
    if img.mode in _GRAY_MODES:
        return True
    if img.mode == "P":
        pal = img.getpalette() or []
        rgb = np.asarray(pal[: len(pal) // 3 * 3], dtype=np.int16).reshape(-1, 3)
        return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())
    return False


def _orientation(img: Image.Image) -> int:
    if "exif" not in img.info and img.format not in ("TIFF", "MPO"):
        return 1  # no EXIF block: skip building an Exif object (and, for PNG, a full decode)
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not make an otherwise fine image unusable
        return 1


def probe(path) -> tuple[int, int, str, bool]:
    """(width, height, mode, gray) from the header; width/height after EXIF rotation."""
    with open_image(path) as img:
        w, h = img.size
        if _orientation(img) in (5, 6, 7, 8):
            w, h = h, w
        return w, h, img.mode, is_gray(img)


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit L, keeping the full range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
        arr = arr.astype(np.float32) / 257.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _composite(img: Image.Image, channels: int) -> Image.Image:
    """Flatten alpha onto BACKGROUND and return an L or RGB image."""
    base_mode = "L" if channels == 1 else "RGB"
    rgba = img.convert("LA" if channels == 1 else "RGBA")
    bg = Image.new(base_mode, img.size, BACKGROUND if channels == 1 else (BACKGROUND,) * 3)
    bg.paste(rgba.convert(base_mode), mask=rgba.getchannel("A"))
    return bg


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to L (channels=1) or RGB (channels=3)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _composite(img, channels)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def resize_image(img: Image.Image, img_size: int, mode: str = "squash") -> Image.Image:
    """squash: resize to img_size x img_size; crop: shorter side to img_size, then centre crop."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    w, h = img.size
    if (w, h) == (img_size, img_size):
        return img
    if mode == "squash":
        return img.resize((img_size, img_size), Image.BILINEAR)
    scale = img_size / min(w, h)
    nw, nh = max(img_size, round(w * scale)), max(img_size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - img_size) // 2, (nh - img_size) // 2
    return img.crop((left, top, left + img_size, top + img_size))


def prepare_pil(img: Image.Image, *, channels: int, img_size: int, resize: str = "squash") -> np.ndarray:
    """In-memory Pillow image -> uint8 (C, H, W): EXIF orientation, mode conversion, resize."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    img = ImageOps.exif_transpose(img) if _orientation(img) != 1 else img
    img = resize_image(to_mode(img, channels), img_size, resize)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_image(path, *, channels: int, img_size: int, resize: str = "squash") -> np.ndarray:
    """Decode `path` fully into uint8 (C, H, W); raises BadImage with the reason on any failure."""
    return decode_image(path, channels=channels, img_size=img_size, resize=resize)[0]


def decode_image(path, *, channels: int, img_size: int, resize: str = "squash",
                 max_pixels: int | None = None) -> tuple[np.ndarray, tuple]:
    """load_image plus what the file was: (array, (width, height, gray)) with EXIF rotation applied."""
    img = open_image(path, max_pixels=max_pixels)
    try:
        with img:
            img.load()  # Image.open is positioned on the first frame of a GIF / multi-page TIFF
            w, h = img.size
            if _orientation(img) in (5, 6, 7, 8):
                w, h = h, w
            info = (w, h, is_gray(img))
            return prepare_pil(img, channels=channels, img_size=img_size, resize=resize), info
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb (too many pixels)") from None
    except DECODE_ERRORS as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise BadImage(f"truncated file ({msg})") from None
        raise BadImage(f"corrupt image ({msg})") from None


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, C, H, W) or (C, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    shape = (-1, 1, 1)
    m = np.asarray(mean, dtype=np.float32).reshape(shape)
    s = np.asarray(std, dtype=np.float32).reshape(shape)
    return (x - m) / s
