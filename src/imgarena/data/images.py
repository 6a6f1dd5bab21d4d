"""Decode one image file the way users really have them, into a uint8 (C, H, W) array.

Pure Pillow + numpy (no torch): the ONNX predict path and the cache-building worker processes
import this module. Every way a file can be unusable becomes `BadImage(reason)` so callers can list
the file and carry on.
"""

from __future__ import annotations

import math
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

# Letterbox (resize="pad") fill: Ultralytics' 114 gray. 114/255 = 0.447 sits at the ImageNet mean
# (0.485, 0.456, 0.406), so the bars normalise to about 0 for pretrained weights, carry no edge at
# the image border the way black or white bars would, and match what detection-style letterboxes do.
PAD_FILL = 114

from imgarena.config import INTERPOLATIONS, RESIZE_MODES  # noqa: E402,F401  (one copy of the choice lists)
_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
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


def store_size(img_size: int, crop_pct: float | None = 1.0) -> int:
    """The side images are stored (cached, decoded) at so that their centre img_size crop is the
    eval view: floor(img_size / crop_pct), timm's scale_size rule (224 at 0.875 -> 256)."""
    crop_pct = 1.0 if crop_pct is None else float(crop_pct)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return max(int(img_size), math.floor(int(img_size) / crop_pct))


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size of uint8 (C, H, W) or (N, C, H, W) images (a view; offsets floor((H - size) / 2),
    as resize="crop" does). Images already at `size` come back as they are."""
    h, w = arr.shape[-2:]
    if (h, w) == (size, size):
        return arr
    if size > min(h, w):
        raise ValueError(f"cannot centre-crop {h}x{w} images to {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return arr[..., top:top + size, left:left + size]


def _filter(interpolation: str | None):
    name = interpolation or "bilinear"
    if name not in _FILTERS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return _FILTERS[name]


def _scaled(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """(width, height) an image is resized to before resize `mode` crops (crop) or pads (pad) it to size x size."""
    if mode == "squash":
        return size, size
    if mode == "crop":
        scale = size / min(w, h)
        return max(size, round(w * scale)), max(size, round(h * scale))
    scale = size / max(w, h)
    return min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))


def resize_image(img: Image.Image, img_size: int, mode: str = "squash", interpolation: str = "bilinear") -> Image.Image:
    """squash: resize to img_size x img_size; crop: shorter side to img_size, then centre crop;
    pad (letterbox): longer side to img_size, centred on a PAD_FILL square. `interpolation`:
    bilinear | bicubic | nearest (Pillow's filters)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    resample = _filter(interpolation)
    w, h = img.size
    if (w, h) == (img_size, img_size):
        return img
    nw, nh = _scaled(w, h, img_size, mode)
    img = img if (nw, nh) == (w, h) else img.resize((nw, nh), resample)
    if mode == "squash":
        return img
    if mode == "crop":
        left, top = (nw - img_size) // 2, (nh - img_size) // 2
        return img.crop((left, top, left + img_size, top + img_size))
    canvas = Image.new(img.mode, (img_size, img_size), PAD_FILL if img.mode == "L" else (PAD_FILL,) * 3)
    canvas.paste(img, ((img_size - nw) // 2, (img_size - nh) // 2))
    return canvas


def view_box(orig_wh: tuple[int, int], img_size: int, resize: str = "squash", crop_pct: float | None = 1.0):
    """Where the model's img_size x img_size input lies on the original (EXIF-rotated) image:
    (x0, y0, x1, y1) in its pixels (float; may reach past the image where pad bars are seen)."""
    w, h = orig_wh
    s = store_size(img_size, crop_pct)
    nw, nh = _scaled(w, h, s, resize)
    # stored pixel = original pixel * (nw / w) + offset: crop shifts left/up, pad right/down
    sign = -1 if resize == "crop" else 1
    ox, oy = (0, 0) if resize == "squash" else (sign * (abs(nw - s) // 2), sign * (abs(nh - s) // 2))
    o = (s - img_size) // 2  # the centre crop of the stored image
    return ((o - ox) * w / nw, (o - oy) * h / nh, (o + img_size - ox) * w / nw, (o + img_size - oy) * h / nh)


def prepare_pil(img: Image.Image, *, channels: int, img_size: int, resize: str = "squash", crop_pct: float = 1.0,
                interpolation: str = "bilinear") -> np.ndarray:
    """In-memory Pillow image -> uint8 (C, img_size, img_size): EXIF orientation, mode conversion,
    resize to the store size (`store_size(img_size, crop_pct)`), then the centre img_size crop.

    The cache stores what this gives with crop_pct=1 at the store size, and the loader's eval view
    is its centre crop (`center_crop`): the same function composed the same way, so a predicted
    file gets bitwise the pixels training evaluated on."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    img = ImageOps.exif_transpose(img) if _orientation(img) != 1 else img
    img = resize_image(to_mode(img, channels), store_size(img_size, crop_pct), resize, interpolation)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(center_crop(arr, img_size))


def load_image(path, *, channels: int, img_size: int, resize: str = "squash", crop_pct: float = 1.0,
               interpolation: str = "bilinear") -> np.ndarray:
    """Decode `path` fully into uint8 (C, H, W); raises BadImage with the reason on any failure."""
    return decode_image(path, channels=channels, img_size=img_size, resize=resize, crop_pct=crop_pct,
                        interpolation=interpolation)[0]


def decode_image(path, *, channels: int, img_size: int, resize: str = "squash", crop_pct: float = 1.0,
                 interpolation: str = "bilinear", max_pixels: int | None = None) -> tuple[np.ndarray, tuple]:
    """load_image plus what the file was: (array, (width, height, gray)) with EXIF rotation applied."""
    img = open_image(path, max_pixels=max_pixels)
    try:
        with img:
            img.load()  # Image.open is positioned on the first frame of a GIF / multi-page TIFF
            w, h = img.size
            if _orientation(img) in (5, 6, 7, 8):
                w, h = h, w
            info = (w, h, is_gray(img))
            return prepare_pil(img, channels=channels, img_size=img_size, resize=resize, crop_pct=crop_pct,
                               interpolation=interpolation), info
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb (too many pixels)") from None
    except DECODE_ERRORS as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise BadImage(f"truncated file ({msg})") from None
        raise BadImage(f"corrupt image ({msg})") from None


def decode_settings(preprocessing: dict) -> dict:
    """The keyword arguments of load_image / decode_image / prepare_pil that reproduce a checkpoint's
    (or export sidecar's) preprocessing; keys older checkpoints lack get the values they were made
    with (resize squash, crop_pct 1, bilinear). ValueError for a value no version writes."""
    out = {"channels": int(preprocessing["channels"]), "img_size": int(preprocessing["img_size"]),
           "resize": preprocessing.get("resize") or "squash",
           "crop_pct": float(preprocessing.get("crop_pct") or 1.0),
           "interpolation": preprocessing.get("interpolation") or "bilinear"}
    if out["resize"] not in RESIZE_MODES:
        raise ValueError(f"preprocessing resize {out['resize']!r} is not one of {', '.join(RESIZE_MODES)}")
    if out["interpolation"] not in _FILTERS:
        raise ValueError(f"preprocessing interpolation {out['interpolation']!r} is not one of {', '.join(_FILTERS)}")
    if not 0 < out["crop_pct"] <= 1 or out["channels"] not in (1, 3) or out["img_size"] < 1:
        raise ValueError(f"preprocessing crop_pct {out['crop_pct']}, channels {out['channels']}, img_size "
                         f"{out['img_size']}: crop_pct must be in (0, 1], channels 1 or 3, img_size >= 1")
    return out


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, C, H, W) or (C, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    shape = (-1, 1, 1)
    m = np.asarray(mean, dtype=np.float32).reshape(shape)
    s = np.asarray(std, dtype=np.float32).reshape(shape)
    return (x - m) / s
