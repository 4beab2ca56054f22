"""ImageNet-C-style corruptions (paper 11): closed forms, severity order, seeding and cache identities."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
from PIL import Image

from cliplab.data.base import ArrayImageDataset, Subset
from cliplab.data.corruptions import CORRUPTIONS, CorruptedDataset, corrupt
from cliplab.errors import CliplabError


def _textured(size=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(30, 220, size)[None, :, None] * np.ones((size, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_parameters_are_imagenet_c():
    # make_imagenet_c.py, github.com/hendrycks/robustness
    assert CORRUPTIONS["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert CORRUPTIONS["gaussian_blur"] == (1, 2, 3, 4, 6)
    assert CORRUPTIONS["jpeg_compression"] == (25, 18, 15, 10, 7)
    assert CORRUPTIONS["contrast"] == (0.4, 0.3, 0.2, 0.1, 0.05)
    assert CORRUPTIONS["brightness"] == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert CORRUPTIONS["pixelate"] == (0.6, 0.5, 0.4, 0.3, 0.25)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_contrast_closed_form(severity):
    image = _textured()
    x = _array(image) / 255
    c = CORRUPTIONS["contrast"][severity - 1]
    mean = x.mean(axis=(0, 1))
    expected = np.rint(np.clip((x - mean) * c + mean, 0, 1) * 255)
    np.testing.assert_array_equal(_array(corrupt(image, "contrast", severity)), expected)


@pytest.mark.parametrize("severity", [1, 4])
def test_brightness_matches_an_hsv_round_trip(severity):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    pixels[0, 0] = 0  # black: hue and saturation 0, becomes grey c
    c = CORRUPTIONS["brightness"][severity - 1]
    expected = np.empty(pixels.shape)
    for i in range(6):
        for j in range(7):
            h, s, v = colorsys.rgb_to_hsv(*(pixels[i, j] / 255))
            expected[i, j] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
    out = _array(corrupt(Image.fromarray(pixels), "brightness", severity))
    np.testing.assert_allclose(out, np.rint(expected * 255), atol=1)  # atol: float rounding at .5
    assert np.abs(out - np.rint(expected * 255)).mean() < 0.05
    np.testing.assert_array_equal(out[0, 0], np.rint([c * 255] * 3))


def test_pixelate_is_block_means_for_an_integer_factor():
    image = _textured(20)
    out = _array(corrupt(image, "pixelate", 2))  # c = 0.5: 20 -> 10 -> 20
    x = _array(image)
    blocks = x.reshape(10, 2, 10, 2, 3).mean(axis=(1, 3))
    expected = blocks.repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_allclose(out, expected, atol=1)
    reference = image.resize((10, 10), Image.Resampling.BOX).resize((20, 20), Image.Resampling.BOX)
    np.testing.assert_array_equal(out, _array(reference))


def test_pixelate_scales_each_side():
    image = _textured(40).crop((0, 0, 40, 30))
    out = corrupt(image, "pixelate", 5)  # c = 0.25: 40 x 30 -> 10 x 7 -> back
    assert out.size == (40, 30)
    expected = image.resize((10, 7), Image.Resampling.BOX).resize((40, 30), Image.Resampling.BOX)
    np.testing.assert_array_equal(_array(out), _array(expected))


@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_uses_the_quality(severity):
    image = _textured()
    quality = CORRUPTIONS["jpeg_compression"][severity - 1]
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    expected = _array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(_array(corrupt(image, "jpeg_compression", severity)), expected)
    other = io.BytesIO()
    image.save(other, "JPEG", quality=quality + 10)
    assert not np.array_equal(_array(Image.open(other).convert("RGB")), expected)


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_noise_std_is_the_parameter(severity):
    image = Image.new("RGB", (200, 200), (128, 128, 128))  # no clipping within 4 std at severities 1-3
    diff = _array(corrupt(image, "gaussian_noise", severity, seed=3)) - 128
    c = CORRUPTIONS["gaussian_noise"][severity - 1]
    assert diff.std() == pytest.approx(255 * c, rel=0.02)
    assert abs(diff.mean()) < 0.5


@pytest.mark.parametrize(("size", "severity"), [(224, 1), (112, 2), (224, 3)])
def test_blur_of_a_delta_is_the_scaled_gaussian_kernel(size, severity):
    pixels = np.zeros((size, size, 3), np.uint8)
    centre = size // 2
    pixels[centre, centre] = 255
    sigma = CORRUPTIONS["gaussian_blur"][severity - 1] * size / 224
    radius = int(4 * sigma + 0.5)
    k = np.arange(-radius, radius + 1)
    g = np.exp(-(k ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    expected = np.zeros((size, size))
    expected[centre - radius:centre + radius + 1, centre - radius:centre + radius + 1] = np.outer(g, g)
    out = _array(corrupt(Image.fromarray(pixels), "gaussian_blur", severity))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], np.rint(255 * expected))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_more_severe_is_farther_from_clean(name):
    image = _textured(96)
    distances = [np.abs(_array(corrupt(image, name, s, seed=0)) - _array(image)).mean() for s in range(1, 6)]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[0] > 0


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_seeded_repeatability(name):
    image = _textured(48)
    first, again = corrupt(image, name, 3, seed=7), corrupt(image, name, 3, seed=7)
    np.testing.assert_array_equal(_array(first), _array(again))
    other = corrupt(image, name, 3, seed=8)
    assert np.array_equal(_array(first), _array(other)) == (name != "gaussian_noise")


def test_bad_names_and_severities():
    image = _textured(8)
    with pytest.raises(CliplabError, match="unknown corruption"):
        corrupt(image, "fog", 1)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(CliplabError, match="severity"):
            corrupt(image, "contrast", severity)


def _dataset(n=5):
    images = np.stack([np.asarray(_textured(16, seed=i)) for i in range(n)])
    return ArrayImageDataset(images, np.arange(n) % 2, ["a", "b"], source=__import__("pathlib").Path("x.npy"),
                             name="synthetic")


def test_corrupted_dataset_identities_differ_per_corruption():
    base = _dataset()
    variants = [base] + [CorruptedDataset(base, name, s, seed) for name in CORRUPTIONS for s in (1, 5)
                         for seed in (0, 1)]
    keys = [tuple(v.identities()) for v in variants]
    assert len(set(keys)) == len(keys)
    assert len({k for row in keys for k in row}) == len(keys) * len(base)
    for v in variants:
        assert v.item_ids() == base.item_ids()
        np.testing.assert_array_equal(v.labels, base.labels)
        assert v.class_names == base.class_names and v.name == base.name


def test_corrupted_dataset_loads_corrupted_images_consistently_with_identity():
    base = _dataset()
    full = CorruptedDataset(base, "gaussian_noise", 2, seed=4)
    part = CorruptedDataset(Subset(base, [3, 1]), "gaussian_noise", 2, seed=4)
    assert part.identities() == [full.identity(3), full.identity(1)]
    np.testing.assert_array_equal(_array(part.load_image(0)), _array(full.load_image(3)))  # same identity, same image
    assert not np.array_equal(_array(full.load_image(0)), _array(base.load_image(0)))
    assert not np.array_equal(_array(full.load_image(0)) - _array(base.load_image(0)),
                              _array(full.load_image(1)) - _array(base.load_image(1)))  # independent noise per item
    contrast = CorruptedDataset(base, "contrast", 5)
    np.testing.assert_array_equal(_array(contrast.load_image(2)), _array(corrupt(base.load_image(2), "contrast", 5)))
