"""ImageNet-C-style corruptions: identity at severity 0, determinism per seed, pixel statistics that
move the right way with severity, and the numerical helpers against direct computations."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from training import corruptions as C
from training.corruptions import CORRUPTIONS, SEVERITIES, CorruptionError, corrupt, item_rng, table_for_size

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "elastic_transform")


def natural_image(size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus a little texture: an image where blur, contrast and colour
    changes all have something to act on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    r = 0.5 + 0.35 * np.sin(2 * np.pi * (xx + 0.3 * yy))
    g = 0.4 + 0.3 * np.cos(2 * np.pi * yy)
    b = 0.3 + 0.2 * xx
    img = np.stack([r, g, b], -1) + rng.normal(0, 0.06, (size, size, 3))
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def high_freq(img: np.ndarray) -> float:
    """Mean absolute difference between horizontal and vertical neighbours."""
    x = img.astype(np.float64)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def mean_saturation(img: np.ndarray) -> float:
    return float(C.rgb_to_hsv(img / 255.0)[..., 1].mean())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_changes_nothing(name, size):
    img = natural_image(size)
    out = corrupt(img, name, 0, rng=123)
    assert out.dtype == np.uint8 and np.array_equal(out, img)
    assert out is not img


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_changes_the_image_and_keeps_shape(name):
    img = natural_image(32)
    for s in SEVERITIES:
        out = corrupt(img, name, s, rng=0)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(out, img), f"{name} severity {s} left the image unchanged"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_for_a_seed(name):
    img = natural_image(48)
    a = corrupt(img, name, 3, rng=np.random.default_rng(7))
    b = corrupt(img, name, 3, rng=np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert np.array_equal(
        corrupt(img, name, 3, item_rng(1, name, 3, 5)), corrupt(img, name, 3, item_rng(1, name, 3, 5))
    )
    if name in RANDOM:  # another seed, another draw
        assert not np.array_equal(a, corrupt(img, name, 3, rng=np.random.default_rng(8)))


def test_item_rng_streams_differ_by_item_severity_corruption_and_seed():
    draws = {
        key: item_rng(*key).random(4).tolist()
        for key in [
            (0, "gaussian_noise", 1, 0),
            (0, "gaussian_noise", 1, 1),
            (0, "gaussian_noise", 2, 0),
            (0, "shot_noise", 1, 0),
            (1, "gaussian_noise", 1, 0),
        ]
    }
    assert len({tuple(v) for v in draws.values()}) == len(draws)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_std_grows_with_severity(name):
    grey = np.full((64, 64, 3), 128, np.uint8)
    stds = [float((corrupt(grey, name, s, rng=0).astype(float) - 128).std()) for s in SEVERITIES]
    assert all(a < b for a, b in zip(stds, stds[1:], strict=False)), stds


def test_gaussian_noise_std_matches_the_table():
    grey = np.full((128, 128, 3), 128, np.uint8)  # 64 px -> ... 128 px uses the tinyimagenet table
    for s, c in zip(SEVERITIES, C.PARAMS["gaussian_noise"]["tinyimagenet"], strict=True):
        noise = corrupt(grey, "gaussian_noise", s, rng=s, table="tinyimagenet").astype(float) - 128
        assert abs(noise.std() - c * 255) < 0.05 * c * 255 + 0.5  # clipping is negligible at +-0.18


def test_impulse_noise_replaces_the_table_fraction_with_black_or_white():
    grey = np.full((64, 64, 3), 128, np.uint8)
    out = corrupt(grey, "impulse_noise", 5, rng=0, table="cifar")
    changed = out != 128
    assert set(np.unique(out[changed])) <= {0, 255}
    assert abs(changed.mean() - 0.07) < 0.01  # 7% of values at CIFAR severity 5


def test_contrast_lowers_std_and_keeps_the_mean():
    img = natural_image(32)
    stds = [float(img.std())] + [float(corrupt(img, "contrast", s).std()) for s in SEVERITIES]
    assert all(a > b for a, b in zip(stds, stds[1:], strict=False)), stds
    for s in SEVERITIES:
        assert np.allclose(corrupt(img, "contrast", s).mean((0, 1)), img.mean((0, 1)), atol=1.0)


def test_brightness_raises_the_mean():
    img = natural_image(32)
    means = [float(img.mean())] + [float(corrupt(img, "brightness", s).mean()) for s in SEVERITIES]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means


def test_saturate_first_desaturates_then_saturates():
    img = natural_image(32)
    sat = {s: mean_saturation(corrupt(img, "saturate", s)) for s in SEVERITIES}
    base = mean_saturation(img)
    assert sat[2] < sat[1] < base < sat[3] < sat[4] < sat[5]  # CIFAR table: x0.3, x0.1, x1.5, x2+.1, x2.5+.2


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "pixelate"])
def test_blur_and_pixelate_remove_high_frequencies(name):
    img = natural_image(64, seed=3)
    hf = [high_freq(img)] + [high_freq(corrupt(img, name, s)) for s in SEVERITIES]
    assert hf[-1] < hf[1] < hf[0], hf
    if name == "gaussian_blur":
        assert all(a > b for a, b in zip(hf, hf[1:], strict=False)), hf


def test_jpeg_error_grows_with_severity():
    img = natural_image(64, seed=1)
    err = [np.abs(corrupt(img, "jpeg_compression", s).astype(float) - img).mean() for s in SEVERITIES]
    assert 0 < err[0] < err[-1]


def test_elastic_moves_pixels_but_keeps_the_colours():
    img = natural_image(64)
    out = corrupt(img, "elastic_transform", 5, rng=0)
    assert np.abs(out.astype(float) - img).mean() > 1
    assert np.allclose(out.mean((0, 1)), img.mean((0, 1)), atol=6)


def test_table_for_size_and_spatial_scaling():
    assert [table_for_size(s) for s in (16, 32, 40, 64, 100, 160, 224, 512)] == [
        "cifar",
        "cifar",
        "cifar",
        "tinyimagenet",
        "tinyimagenet",
        "imagenet",
        "imagenet",
        "imagenet",
    ]
    # the same blur at twice the image size removes the same share of detail when scaled
    small, large = natural_image(32), np.kron(natural_image(32), np.ones((2, 2, 1), np.uint8))
    a = high_freq(corrupt(small, "gaussian_blur", 5, table="cifar")) / high_freq(small)
    b = high_freq(corrupt(large, "gaussian_blur", 5, table="cifar")) / high_freq(large)
    assert abs(a - b) < 0.15


def test_gaussian_filter_matches_direct_convolution():
    rng = np.random.default_rng(0)
    x = rng.random((9, 11))
    for sigma, mode, pad_mode in [
        (0.8, "nearest", "edge"),
        (1.5, "symmetric", "symmetric"),
        (7.0, "symmetric", "symmetric"),
    ]:
        k = C._gaussian_kernel_1d(sigma, 4.0)
        r = len(k) // 2
        padded = np.pad(x, r, mode=pad_mode)  # NumPy repeats the reflection for pads wider than x
        direct = np.zeros_like(x)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                direct[i, j] = k @ padded[i : i + 2 * r + 1, j : j + 2 * r + 1] @ k
        assert np.allclose(C._gaussian_filter(x, sigma, mode), direct), (sigma, mode)


def test_correlate2d_matches_direct_sum():
    rng = np.random.default_rng(1)
    x = rng.random((7, 8, 3))
    k = rng.random((5, 5))
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    direct = np.zeros_like(x)
    for i in range(7):
        for j in range(8):
            direct[i, j] = np.einsum("ijc,ij->c", padded[i : i + 5, j : j + 5], k)
    assert np.allclose(C._correlate2d(x, k), direct)


def test_disk_kernel_is_normalised_and_symmetric():
    for radius, alias in [(0.3, 0.4), (1.5, 0.1), (10, 0.5)]:
        k = C._disk_kernel(radius, alias)
        assert abs(k.sum() - 1) < 1e-9 and np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])


def test_hsv_matches_colorsys_and_round_trips():
    rgb = np.random.default_rng(2).random((50, 3))
    hsv = C.rgb_to_hsv(rgb)
    assert np.allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb])
    assert np.allclose(C.hsv_to_rgb(hsv), rgb)


def test_bad_input_is_rejected_with_the_allowed_values():
    img = natural_image(32)
    with pytest.raises(CorruptionError, match="available: gaussian_noise"):
        corrupt(img, "fog", 1)
    for bad in (6, -1, 2.5, True):
        with pytest.raises(CorruptionError, match="0-5"):
            corrupt(img, "contrast", bad)
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt(img.astype(np.float32), "contrast", 1)
    with pytest.raises(CorruptionError, match="auto, cifar"):
        corrupt(img, "contrast", 1, table="mnist")
    assert C.check_corruptions(["all"]) == CORRUPTIONS
