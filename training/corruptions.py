"""ImageNet-C-style common corruptions, applied on the fly to any evaluation set.

Each corruption maps an (H, W, 3) uint8 image, a severity (0-5) and a numpy `Generator` to a new
(H, W, 3) uint8 image. Severity 0 returns the image unchanged; 1-5 are the benchmark's levels.

The parameter tables are those of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations" (ICLR 2019), as released for three image sizes: ImageNet-C
(224 px), Tiny-ImageNet-C (64 px) and CIFAR-10-C (32 px). `table="auto"` picks the one nearest to the
image size; spatial parameters (blur radii and sigmas, elastic displacement) are given in pixels at
the table's reference size and scaled to the actual image, so a 48-px or 384-px evaluation set is
corrupted in proportion. Differences from the released scripts, all deliberate:

- written with numpy and PIL only (no OpenCV, scikit-image, SciPy or ImageMagick);
- the result is rounded to uint8 (the scripts truncate), so a no-op corruption is exactly a no-op;
- the defocus kernel always sums to 1 (see `_disk_kernel`);
- every random draw comes from the generator passed in, so a (seed, corruption, severity, item)
  tuple always gives the same image, whatever the batch, worker or process (`item_rng`).

The corruptions act on the image as the model sees it: after the model card's resize and centre crop,
before normalisation (ImageNet-C corrupts the 224-px centre crops too).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "gaussian_blur",
    "contrast",
    "brightness",
    "saturate",
    "jpeg_compression",
    "pixelate",
    "elastic_transform",
)
SEVERITIES = (1, 2, 3, 4, 5)

# reference image size of each table (the elastic ImageNet parameters were written for 244 px, a
# typo in the release kept here: it is what ImageNet-C's images were made with)
TABLE_SIZES = {"cifar": 32, "tinyimagenet": 64, "imagenet": 224}

# name -> table -> the five severities' parameters (make_cifar_c.py, make_tinyimagenet_c.py,
# make_imagenet_c.py). Pixel-valued entries are at TABLE_SIZES[table].
PARAMS: dict[str, dict[str, tuple]] = {
    # additive N(0, c) noise on [0, 1] pixels
    "gaussian_noise": {
        "cifar": (0.04, 0.06, 0.08, 0.09, 0.10),
        "tinyimagenet": (0.04, 0.08, 0.12, 0.15, 0.18),
        "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38),
    },
    # Poisson(x * c) / c: fewer photons, more noise
    "shot_noise": {
        "cifar": (500, 250, 100, 75, 50),
        "tinyimagenet": (250, 100, 50, 30, 15),
        "imagenet": (60, 25, 12, 5, 3),
    },
    # salt-and-pepper: this fraction of the values (per channel) set to 0 or 1
    "impulse_noise": {
        "cifar": (0.01, 0.02, 0.03, 0.05, 0.07),
        "tinyimagenet": (0.01, 0.02, 0.05, 0.08, 0.14),
        "imagenet": (0.03, 0.06, 0.09, 0.17, 0.27),
    },
    # (disk radius in px, anti-alias sigma of the disk kernel)
    "defocus_blur": {
        "cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "tinyimagenet": ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
        "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    },
    # Gaussian sigma in px
    "gaussian_blur": {
        "cifar": (0.4, 0.6, 0.7, 0.8, 1.0),
        "tinyimagenet": (0.5, 0.75, 1.0, 1.25, 1.5),
        "imagenet": (1, 2, 3, 4, 6),
    },
    # (x - per-channel mean) * c + mean
    "contrast": {
        "cifar": (0.75, 0.5, 0.4, 0.3, 0.15),
        "tinyimagenet": (0.4, 0.3, 0.2, 0.1, 0.05),
        "imagenet": (0.4, 0.3, 0.2, 0.1, 0.05),
    },
    # HSV value + c
    "brightness": {
        "cifar": (0.05, 0.1, 0.15, 0.2, 0.3),
        "tinyimagenet": (0.1, 0.2, 0.3, 0.4, 0.5),
        "imagenet": (0.1, 0.2, 0.3, 0.4, 0.5),
    },
    # HSV saturation * c0 + c1 (the first two levels desaturate)
    "saturate": {
        "cifar": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        "tinyimagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)),
        "imagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    },
    # JPEG quality
    "jpeg_compression": {
        "cifar": (80, 65, 58, 50, 40),
        "tinyimagenet": (65, 58, 50, 40, 25),
        "imagenet": (25, 18, 15, 10, 7),
    },
    # box-downsample to this fraction of the size, then back up
    "pixelate": {
        "cifar": (0.95, 0.9, 0.85, 0.75, 0.65),
        "tinyimagenet": (0.9, 0.8, 0.7, 0.6, 0.5),
        "imagenet": (0.6, 0.5, 0.4, 0.3, 0.25),
    },
    # (alpha, sigma, affine jitter) in px: a random affine warp, then a smooth random displacement
    # field (uniform noise blurred with sigma, times alpha)
    "elastic_transform": {
        "cifar": tuple(
            (32 * a, 32 * s, 32 * f)
            for a, s, f in (
                (0, 0, 0.08),
                (0.05, 0.2, 0.07),
                (0.08, 0.06, 0.06),
                (0.1, 0.04, 0.05),
                (0.1, 0.03, 0.03),
            )
        ),
        "tinyimagenet": tuple(
            (64 * a, 64 * s, 64 * f)
            for a, s, f in (
                (0, 0, 0.08),
                (0.05, 0.3, 0.06),
                (0.1, 0.08, 0.06),
                (0.1, 0.03, 0.03),
                (0.16, 0.03, 0.02),
            )
        ),
        "imagenet": tuple(
            (244 * a, 244 * s, 244 * f)
            for a, s, f in (
                (2, 0.7, 0.1),
                (2, 0.08, 0.2),
                (0.05, 0.01, 0.02),
                (0.07, 0.01, 0.02),
                (0.12, 0.01, 0.02),
            )
        ),
    },
}


class CorruptionError(ValueError):
    """An unknown corruption, a severity outside 0-5 or an image that is not (H, W, 3) uint8."""


def table_for_size(size: int) -> str:
    """The parameter table whose reference size is nearest (geometrically) to `size` pixels."""
    return min(TABLE_SIZES, key=lambda t: abs(np.log(size / TABLE_SIZES[t])))


def item_rng(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    """The generator for one (seed, corruption, severity, item): independent of batch and worker."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(severity), int(index)])


# ---------------------------------------------------------------------------- helpers
def _to_float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 255.0  # (H, W, 3) in [0, 1]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _fold(idx: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map any integer index into [0, n) the way a border mode extends a signal of length n.

    nearest:   a a a | a b c d | d d d
    symmetric: b a | a b c d | d c      (SciPy's "reflect": half-sample symmetric)
    reflect:   c b | a b c d | c b      (OpenCV's BORDER_REFLECT_101, NumPy's "reflect")
    """
    if mode == "nearest" or n == 1:
        return np.clip(idx, 0, n - 1)
    if mode == "symmetric":
        i = np.mod(idx, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)
    if mode == "reflect":
        i = np.mod(idx, 2 * (n - 1))
        return np.where(i >= n, 2 * (n - 1) - i, i)
    raise ValueError(mode)


def _gaussian_kernel_1d(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)  # SciPy's kernel extent
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_matrix(n: int, kernel: np.ndarray, mode: str) -> np.ndarray:
    """(n, n) matrix M with M @ signal = the signal correlated with `kernel`, borders per `mode`.

    Exact for any kernel width, even one wider than the image (a large elastic sigma)."""
    radius = len(kernel) // 2
    m = np.zeros((n, n))
    rows = np.arange(n)[:, None]  # (n, 1)
    cols = _fold(rows + np.arange(-radius, radius + 1)[None, :], n, mode)  # (n, K)
    np.add.at(m, (np.broadcast_to(rows, cols.shape), cols), np.broadcast_to(kernel, cols.shape))
    return m


def _gaussian_filter(x: np.ndarray, sigma: float, mode: str, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian blur of (H, W) or (H, W, C) over the first two axes."""
    if sigma <= 0:
        return x.copy()
    k = _gaussian_kernel_1d(sigma, truncate)
    mh = _filter_matrix(x.shape[0], k, mode)  # (H, H)
    mw = _filter_matrix(x.shape[1], k, mode)  # (W, W)
    y = np.tensordot(mh, x, axes=(1, 0))  # rows: (H, W, ...)
    y = np.tensordot(mw, y, axes=(1, 1))  # columns: (W, H, ...)
    return np.swapaxes(y, 0, 1)


def _correlate2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(H, W, C) correlated with a (kh, kw) kernel, borders reflected (OpenCV's filter2D default)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")  # (P, Q, C) = (H+2ph, W+2pw, C)
    # correlation = convolution with the flipped kernel, done as a product of FFTs sized for the full
    # linear convolution (no wrap-around); the valid part starts at (kh-1, kw-1)
    shape = (padded.shape[0] + kh - 1, padded.shape[1] + kw - 1)
    spec = np.fft.rfft2(padded, s=shape, axes=(0, 1)) * np.fft.rfft2(kernel[::-1, ::-1], s=shape)[..., None]
    full = np.fft.irfft2(spec, s=shape, axes=(0, 1))  # (P+kh-1, Q+kw-1, C)
    h, w = x.shape[:2]
    return full[kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


def _bilinear(x: np.ndarray, ys: np.ndarray, xs: np.ndarray, mode: str) -> np.ndarray:
    """Sample (H, W, C) at float coordinates (H', W') with bilinear weights, borders per `mode`."""
    h, w = x.shape[:2]
    y0, x0 = np.floor(ys), np.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]  # (H', W', 1)
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    ya, yb = _fold(y0, h, mode), _fold(y0 + 1, h, mode)
    xa, xb = _fold(x0, w, mode), _fold(x0 + 1, w, mode)
    top = x[ya, xa] * (1 - wx) + x[ya, xb] * wx
    bottom = x[yb, xa] * (1 - wx) + x[yb, xb] * wx
    return top * (1 - wy) + bottom * wy


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0.0)
    d = np.where(delta > 0, delta, 1)
    h = np.where(v == r, (g - b) / d, np.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    i = i.astype(np.int64) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [np.select([i == k for k in range(6)], [c[ch] for c in choices]) for ch in range(3)]
    return np.stack(out, -1)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: a disk of `radius` px, anti-aliased by a small Gaussian (ImageNet-C `disk`:
    17x17 support up to radius 8, a 3x3 Gaussian; 5x5 beyond), trimmed to its support.

    The released code blurs the disk inside its own frame with reflected borders, which folds mass
    back in once the disk touches the frame (radius 8 and 10: the kernel then sums to ~1.01 and
    brightens the image); here the frame is padded first, so the kernel always sums to 1."""
    half = 8 if radius <= 8 else int(np.ceil(radius))
    ksize = 3 if radius <= 8 else 5
    pad = ksize // 2
    ax = np.arange(-half - pad, half + pad + 1)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)  # (2(h+p)+1, 2(h+p)+1)
    disk /= disk.sum()
    g = np.arange(ksize) - (ksize - 1) / 2  # OpenCV's Gaussian taps for (ksize, sigma)
    g = np.exp(-(g**2) / (2 * alias_blur**2))
    g /= g.sum()
    m = _filter_matrix(disk.shape[0], g, "nearest")  # the padding is zero, so the border mode is moot
    kernel = m @ disk @ m.T
    centre = half + pad
    support = np.flatnonzero(kernel.sum(0) > 1e-12)
    r = int(max(centre - support[0], support[-1] - centre))
    kernel = kernel[centre - r : centre + r + 1, centre - r : centre + r + 1]
    return kernel / kernel.sum()


# ---------------------------------------------------------------------------- the corruptions
# Each takes (image float64 (H, W, 3) in [0, 1], parameter, scale, rng) -> float image in any range;
# `scale` = image size / the table's reference size (for pixel-valued parameters).
def _gaussian_noise(x, c, scale, rng):
    return x + rng.normal(0.0, c, size=x.shape)


def _shot_noise(x, c, scale, rng):
    return rng.poisson(x * c) / float(c)


def _impulse_noise(x, c, scale, rng):
    flip = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(flip, salt.astype(np.float64), x)


def _defocus_blur(x, c, scale, rng):
    radius, alias_blur = c
    return _correlate2d(x, _disk_kernel(radius * scale, alias_blur * scale))


def _gaussian_blur(x, c, scale, rng):
    return _gaussian_filter(x, c * scale, mode="nearest")  # scikit-image's default border


def _contrast(x, c, scale, rng):
    means = x.mean(axis=(0, 1), keepdims=True)  # (1, 1, 3)
    return (x - means) * c + means


def _brightness(x, c, scale, rng):
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


def _saturate(x, c, scale, rng):
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return hsv_to_rgb(hsv)


def _jpeg(x, c, scale, rng):
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=int(c))
    return _to_float(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def _pixelate(x, c, scale, rng):
    h, w = x.shape[:2]
    img = Image.fromarray(_to_uint8(x))
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return _to_float(np.asarray(small.resize((w, h), Image.Resampling.BOX)))


def _elastic(x, c, scale, rng):
    alpha, sigma, jitter = c[0] * scale * scale, c[1] * scale, c[2] * scale
    h, w = x.shape[:2]
    # 1. random affine: three points around the centre each moved by up to `jitter` px
    centre = np.array([w, h], dtype=np.float64) // 2
    half = min(h, w) // 3
    src = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])  # (3, 2) as (x, y)
    dst = src + rng.uniform(-jitter, jitter, size=src.shape)
    fwd = np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # (2, 3): dst = fwd @ [x, y, 1]
    inv = np.linalg.inv(np.vstack([fwd, [0, 0, 1]]))  # each output pixel samples the input here
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    x = _bilinear(x, sy, sx, mode="reflect")
    # 2. smooth random displacement field (SciPy gaussian, truncate 3, half-sample reflection)
    dx = _gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, "symmetric", truncate=3.0) * alpha
    dy = _gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, "symmetric", truncate=3.0) * alpha
    return _bilinear(x, yy + dy, xx + dx, mode="symmetric")


_FUNCS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
    "jpeg_compression": _jpeg,
    "pixelate": _pixelate,
    "elastic_transform": _elastic,
}


def check_corruptions(names) -> tuple[str, ...]:
    """Validate corruption names ("all" expands to every one); returns them as a tuple."""
    names = tuple(names)
    if names in (("all",), ()):
        return CORRUPTIONS
    unknown = [n for n in names if n not in _FUNCS]
    if unknown:
        raise CorruptionError(f"unknown corruption(s) {unknown}; available: {', '.join(CORRUPTIONS)}")
    return names


def check_table(table: str) -> str:
    if table != "auto" and table not in TABLE_SIZES:
        raise CorruptionError(f"unknown parameter table {table!r}; use auto, {', '.join(TABLE_SIZES)}")
    return table


def corrupt(
    image: np.ndarray,
    name: str,
    severity: int,
    rng: np.random.Generator | int | None = 0,
    table: str = "auto",
) -> np.ndarray:
    """Apply one corruption: (H, W, 3) uint8 -> (H, W, 3) uint8. Severity 0 returns a copy.

    `rng` is a numpy Generator or an int seed; `table` is auto | cifar | tinyimagenet | imagenet."""
    check_corruptions([name])
    check_table(table)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 0 <= severity <= 5:
        raise CorruptionError(f"severity must be an integer 0-5 (0 = no corruption), got {severity!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptionError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    if severity == 0:
        return image.copy()
    size = min(image.shape[:2])
    table = table_for_size(size) if table == "auto" else table
    param = PARAMS[name][table][severity - 1]
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    out = _FUNCS[name](_to_float(image), param, size / TABLE_SIZES[table], rng)
    return _to_uint8(out)
