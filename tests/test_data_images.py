"""Decoding images as users have them: formats, EXIF, alpha, palette, 16-bit, broken files."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from _data_files import write_bad_files
from imgarena.data.images import BadImage, is_image_file, load_image, normalize, prepare_pil, probe


def test_png_rgb_pixels_and_layout(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 0], arr[..., 2] = 200, 50
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", channels=3, img_size=8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    assert (out[0] == 200).all() and (out[1] == 0).all() and (out[2] == 50).all()


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # 20x10, left half white; orientation 6 = rotate 90° clockwise to display: white ends up on top.
    arr = np.zeros((10, 20), np.uint8)
    arr[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert probe(tmp_path / "r.jpg")[:2] == (10, 20)
    out = load_image(tmp_path / "r.jpg", channels=1, img_size=20)[0]
    assert out[:8].mean() > 200 and out[12:].mean() < 50


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[:2, :, 0], arr[:2, :, 3] = 255, 255  # top: opaque red; bottom: fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png", channels=3, img_size=4)
    assert out[:, :2].tolist() == np.array([255, 0, 0]).reshape(3, 1, 1).repeat(2, 1).repeat(4, 2).tolist()
    assert (out[:, 2:] == 255).all()


def test_grayscale_palette_16bit_cmyk(tmp_path):
    Image.fromarray(np.full((6, 6), 90, np.uint8)).save(tmp_path / "g.png")
    assert probe(tmp_path / "g.png")[3] is True
    assert load_image(tmp_path / "g.png", channels=1, img_size=6).shape == (1, 6, 6)
    assert (load_image(tmp_path / "g.png", channels=3, img_size=6) == 90).all()

    pal = Image.new("P", (6, 6))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putdata([1] * 36)
    pal.save(tmp_path / "p.png")
    assert probe(tmp_path / "p.png")[3] is False
    assert load_image(tmp_path / "p.png", channels=3, img_size=6)[:, 0, 0].tolist() == [10, 200, 30]

    a16 = np.array([[0, 32896, 65535, 65535]], np.uint16).repeat(4, 0)
    Image.fromarray(a16).save(tmp_path / "d.png")  # 16-bit grayscale PNG
    out = load_image(tmp_path / "d.png", channels=1, img_size=4)[0, 0]
    assert out.tolist() == [0, 128, 255, 255]

    Image.new("CMYK", (5, 5), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    rgb = load_image(tmp_path / "c.jpg", channels=3, img_size=5)[:, 2, 2]
    assert rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60


@pytest.mark.parametrize("ext", ["bmp", "webp", "tiff"])
def test_other_formats_roundtrip(tmp_path, ext):
    arr = np.full((6, 6, 3), (30, 120, 210), np.uint8)
    Image.fromarray(arr).save(tmp_path / f"x.{ext}", **({"lossless": True} if ext == "webp" else {}))
    assert load_image(tmp_path / f"x.{ext}", channels=3, img_size=6)[:, 3, 3].tolist() == [30, 120, 210]


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "a.gif", channels=3, img_size=6)
    assert out[0].min() > 200 and out[2].max() < 50


def test_broken_files_raise_badimage_with_reason(tmp_path):
    paths = write_bad_files(tmp_path)
    expected = {"truncated": "truncated", "empty": "empty", "text": "not an image"}
    for kind, path in paths.items():
        with pytest.raises(BadImage, match=expected[kind]):
            load_image(path, channels=3, img_size=8)


def test_decompression_bomb_is_rejected_without_decoding(tmp_path):
    # A PNG header claiming 40000 x 40000 pixels (1.6 Gpx): must be refused before any decoding.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                        + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(tmp_path / "bomb.png", channels=1, img_size=8)


def test_resize_modes():
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 10:30] = 255  # bright centre, dark sides
    img = Image.fromarray(arr)
    crop = prepare_pil(img, channels=1, img_size=10, resize="crop")[0]
    squash = prepare_pil(img, channels=1, img_size=10, resize="squash")[0]
    assert crop.min() > 200  # centre crop of the 20x20 middle: all bright
    assert squash[:, 0].max() < 30 and squash[:, 5].min() > 200
    with pytest.raises(ValueError):
        prepare_pil(img, channels=1, img_size=10, resize="stretch")


def test_hidden_and_non_image_names():
    assert is_image_file("a/b/cat.JPG") and is_image_file("x.webp")
    assert not is_image_file("a/._cat.jpg") and not is_image_file("notes.txt")


def test_normalize_numpy():
    x = np.full((2, 1, 2, 2), 255, np.uint8)
    out = normalize(x, (0.5,), (0.25,))
    assert out.dtype == np.float32 and np.allclose(out, 2.0)


def test_images_module_does_not_import_torch():
    code = "import sys, imgarena.data.images, imgarena.data; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
