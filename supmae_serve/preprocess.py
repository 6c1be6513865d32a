"""The one place images become model input.

Decode and validate (bytes -> RGB PIL image), then resize + centre-crop + normalise as the model card's
`Preprocessing` says. Training evaluation, export parity checks and every serving backend call these
functions, so the three can never drift apart.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from supmae_serve.model.checkpoint import Preprocessing

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An input image that cannot be used. `status` is the HTTP status a server should answer with:
    413 (over a size limit), 415 (not an image format we decode), 422 (decodable but unusable)."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_image"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024  # per image
    max_pixels: int = 40_000_000  # decompression-bomb guard (width x height, checked before decoding)
    min_side: int = 8  # smaller images carry too little to classify


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        lo = 0.0 if img.mode.startswith("I;16") else min(float(arr.min()), 0.0)
        arr = np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes -> fully decoded RGB image with EXIF orientation applied (first frame if animated).

    Raises ImageError with the status and a message naming the limit and the allowed value."""
    if len(data) == 0:
        raise ImageError("empty image (0 bytes)", 422, "empty_image")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes per image",
            413,
            "image_too_large",
        )
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageError(
            "not a recognised image format (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)",
            415,
            "unsupported_format",
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"image dimensions exceed the limit of {limits.max_pixels} pixels", 413, "too_many_pixels"
        ) from e
    except Exception as e:  # noqa: BLE001 - malformed headers raise many types
        raise ImageError(f"cannot read image header: {e}", 422, "corrupt_image") from e
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels} pixels",
            413,
            "too_many_pixels",
        )
    if min(w, h) < limits.min_side:
        raise ImageError(
            f"image is {w}x{h}; each side must be at least {limits.min_side} pixels", 422, "image_too_small"
        )
    try:
        img.seek(0)
        img.load()  # full decode now: truncated or corrupt data fails here, not later in a batch
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"image dimensions exceed the limit of {limits.max_pixels} pixels", 413, "too_many_pixels"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
        raise ImageError(f"corrupt or truncated image data: {e}", 422, "corrupt_image") from e


def resize_plan(w: int, h: int, prep: Preprocessing) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) that `resize_crop` uses for a w x h image."""
    size = prep.image_size
    scale_size = int(round(size / prep.crop_pct))
    if w <= h:
        nw, nh = scale_size, max(scale_size, int(round(h * scale_size / w)))
    else:
        nw, nh = max(scale_size, int(round(w * scale_size / h))), scale_size
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side to image_size / crop_pct, then centre-crop image_size x image_size."""
    size = prep.image_size
    w, h = img.size
    nw, nh, left, top = resize_plan(w, h, prep)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[prep.interpolation])
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def uint8_to_input(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (3, H, W) on any device (e.g. a JPEG decoded on the GPU by nvjpeg) -> normalised (3, S, S) float32
    on that device, with the same resize plan as `resize_crop`. torch's antialiased bicubic/bilinear follows
    PIL's filters closely but not bit-exactly (differences of about one grey level)."""
    size = prep.image_size
    _, h, w = x.shape
    nw, nh, left, top = resize_plan(w, h, prep)
    y = x.unsqueeze(0).float()  # (1, 3, H, W) in [0, 255]
    if (nw, nh) != (w, h):
        mode = prep.interpolation
        y = torch.nn.functional.interpolate(
            y,
            size=(nh, nw),
            mode=mode,
            antialias=mode != "nearest",
            align_corners=False if mode != "nearest" else None,
        ).clamp_(0, 255)
    y = y[:, :, top : top + size, left : left + size]  # (1, 3, S, S)
    return normalize(y.round_() / 255.0, prep)[0]


def _stats(prep: Preprocessing, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(prep.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=dtype, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] (N, 3, H, W) -> normalised float32 (works on any device)."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean, std = _stats(prep, x.device)
    return (x - mean) / std


def to_tensor(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> normalised (3, S, S) float32."""
    arr = np.asarray(resize_crop(img, prep), dtype=np.uint8)  # (S, S, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
    mean, std = _stats(prep)
    return (x - mean[0]) / std[0]


def batch(images: Iterable[Image.Image], prep: Preprocessing) -> torch.Tensor:
    """Images -> normalised (N, 3, S, S)."""
    tensors = [to_tensor(img, prep) for img in images]
    if not tensors:
        raise ValueError("no images")
    return torch.stack(tensors)


def load_images(
    data: Iterable[bytes], prep: Preprocessing, limits: ImageLimits = ImageLimits()
) -> torch.Tensor:
    """Encoded images -> normalised (N, 3, S, S); raises ImageError on the first bad one."""
    return batch((decode_image(d, limits) for d in data), prep)


def denormalize(x: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """Normalised (N, 3, H, W) -> uint8 (N, H, W, 3) for display."""
    mean, std = _stats(prep, x.device)
    img = (x.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(x: torch.Tensor, prep: Preprocessing, upscale: int = 1) -> list[Image.Image]:
    """Normalised (N, 3, H, W) -> PIL images, optionally upscaled (nearest) for display."""
    out = []
    for arr in denormalize(x, prep):
        img = Image.fromarray(arr)
        if upscale > 1:
            img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
        out.append(img)
    return out
