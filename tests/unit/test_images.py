"""Safe decoding of awkward and broken image files."""

import io

import numpy as np
import pytest
from PIL import Image

from cliplab.data import load_image
from cliplab.errors import ImageDecodeError


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # round(v / 65535 * 255)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1  # palette index 1 (blue) is fully transparent
    path = _save(img, tmp_path / "pal.png", transparency=1)
    rgb = np.asarray(load_image(path))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [255, 255, 255]


def test_half_transparent_rgba_blends_with_white(tmp_path):
    path = _save(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), tmp_path / "alpha.png")
    value = np.asarray(load_image(path))[0, 0]
    assert np.all(np.abs(value.astype(int) - 127) <= 1)


def test_cmyk_jpeg_and_grayscale_become_rgb(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=100)
    gray = _save(Image.new("L", (8, 8), 100), tmp_path / "gray.png")
    cmyk_rgb = np.asarray(load_image(cmyk))
    assert cmyk_rgb.shape == (8, 8, 3) and cmyk_rgb.min() >= 250  # CMYK (0,0,0,0) is white
    assert np.asarray(load_image(gray)).reshape(-1, 3).tolist() == [[100, 100, 100]] * 64


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (2, 4)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "not an image"),
    ],
)
def test_unreadable_files_raise_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert reason in info.value.reason and info.value.path == str(path)


def test_truncated_jpeg_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path):
    path = _save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png")
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_unicode_file_name(tmp_path):
    path = _save(Image.new("RGB", (3, 3), (1, 2, 3)), tmp_path / "café_猫.png")
    assert np.asarray(load_image(path))[0, 0].tolist() == [1, 2, 3]
