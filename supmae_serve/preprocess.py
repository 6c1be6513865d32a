"""The one place images become model input.

Decode and validate (bytes -> RGB PIL image), then resize + centre-crop + normalise as the model card's
`Preprocessing` says. Training evaluation, export parity checks and every serving backend call these
functions, so the three can never drift apart.

Decoding is bounded for untrusted input: only the advertised formats are opened (`FORMATS`; Pillow's other
plugins, EPS and its Ghostscript call among them, are never reached), the header's size is checked against
`ImageLimits` before any pixel is decoded, and a caller that says how large its model input is
(`decode_image(..., shrink_to=resize_side(prep))`) gets large images decoded small: JPEGs through the
decoder's DCT scaling (`draft`), other formats reduced right after decoding (`reduce`), before any mode
conversion, and no float64 copies. The peak is then about one decoded full-size image, at most about 5 bytes
per pixel; WebP, which Pillow decodes at about 16, may have a quarter of the pixels (docs/deployment.md,
"Security", has the measured figures).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from supmae_serve.model.checkpoint import Preprocessing

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded

# The formats the server advertises, as Pillow names them (MPO, the multi-picture JPEG of some cameras, opens
# through the JPEG entry). Nothing else is ever handed to Pillow's other plugins.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF"

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# A decoded image is shrunk only down to this many times the size the model resizes to, so the final
# antialiased resize still has the pixels it needs (Pillow's `reducing_gap` advice: from 3 on the result is
# indistinguishable from resampling the full image in most cases).
REDUCING_GAP = 3
_STRIP_PIXELS = 1 << 20  # pixels converted at a time where a whole-image conversion would copy it
# `info` key of a shrunk image: the (width, height) it had upright at full size. `resize_crop` plans the
# resize and crop from it, so a shrunk image is resized to exactly the size the full one would be.
SOURCE_SIZE = "supmae.source_size"


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
    # decompression-bomb guard (width x height, checked before decoding) for training and evaluation data;
    # the server, decoding untrusted input on several threads, defaults to 4096 x 4096 (settings.py)
    max_pixels: int = 40_000_000
    min_side: int = 8  # smaller images carry too little to classify


# Pillow decodes WebP through libwebp's animation decoder: two full-size canvases and a copy besides the
# image, about 16 bytes per pixel where the other formats take at most 5 (benchmarks/decode_memory.py). Its
# pixels count this many times against ImageLimits.max_pixels, so every format's worst case is alike.
_PIXEL_COST = {"WEBP": 4}


def _too_many_pixels(w: int, h: int, limit: int, fmt: str | None = None) -> ImageError:
    where = f" for {fmt} images (they take {_PIXEL_COST[fmt]}x the memory to decode)" if fmt else ""
    return ImageError(
        f"image is {w}x{h} = {w * h} pixels; the limit is {limit} pixels{where}", 413, "too_many_pixels"
    )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, for an image Pillow's own bomb check refused before it said
    its size: the format's image class reads the header without that check (what `Image.open` calls)."""
    Image.init()
    for fmt in FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        ok = factory is not None and (accept is None or accept(data[:16]))
        if ok and not isinstance(ok, str):
            try:
                return factory(io.BytesIO(data), "").size
            except Exception:  # noqa: BLE001 - not this format; try the next
                continue
    return None


def open_image(data: bytes, limits: ImageLimits = ImageLimits()) -> ImageFile.ImageFile:
    """Bytes -> a Pillow image whose header is read and checked against `limits`, nothing decoded yet.

    Raises ImageError: 413 over `max_bytes` or `max_pixels`, 415 not one of `FORMATS`, 422 empty, corrupt
    header or a side under `min_side`."""
    if len(data) == 0:
        raise ImageError("empty image (0 bytes)", 422, "empty_image")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes per image",
            413,
            "image_too_large",
        )
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        raise ImageError(
            f"not a recognised image format (supported: {FORMATS_TEXT})", 415, "unsupported_format"
        ) from e
    except Image.DecompressionBombError as e:  # over Pillow's own limit, far over any sensible one of ours
        size = _header_size(data)
        if size is None:
            raise ImageError(
                f"image dimensions exceed the limit of {limits.max_pixels} pixels", 413, "too_many_pixels"
            ) from e
        raise _too_many_pixels(*size, limits.max_pixels) from e
    except Exception as e:  # noqa: BLE001 - malformed headers raise many types
        raise ImageError(f"cannot read image header: {e}", 422, "corrupt_image") from e
    w, h = img.size
    cost = _PIXEL_COST.get(img.format or "", 1)
    if w * h > limits.max_pixels // cost:
        raise _too_many_pixels(w, h, limits.max_pixels // cost, img.format if cost > 1 else None)
    if min(w, h) < limits.min_side:
        raise ImageError(
            f"image is {w}x{h}; each side must be at least {limits.min_side} pixels", 422, "image_too_small"
        )
    return img


def _i16_to_l(img: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit L (0..65535 -> 0..255, rounded), a strip of rows at a time so no full-size
    wide temporary exists (Pillow's own convert("L") would clip at 255 instead of scaling)."""
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    step = max(1, _STRIP_PIXELS // w)
    for y in range(0, h, step):
        strip = np.asarray(img.crop((0, y, w, min(h, y + step))), dtype=np.uint32)  # (rows, w)
        out[y : y + strip.shape[0]] = (strip * 255 + 32767) // 65535
    return Image.fromarray(out, mode="L")


def _reducible(img: Image.Image) -> Image.Image:
    """Modes Pillow's `reduce` cannot average (palette indices, 1-bit, 16-bit) -> one it can."""
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):
        return _i16_to_l(img)
    return img


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """`img.reduce(factor)` (box averaging) of the centred part whose sides are multiples of `factor` (at most
    factor - 1 edge pixels go, so no output pixel averages a partial block and the image keeps its centre),
    a strip of rows at a time: only a strip is ever converted to a mode `reduce` takes (RGBA premultiplied,
    a palette expanded), never a second full-size copy."""
    w, h = img.size
    left, top = (w % factor) // 2, (h % factor) // 2
    width, height = w - w % factor, h - h % factor
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))
    out = None
    for y in range(0, height, rows):
        strip = img.crop((left, top + y, left + width, top + min(height, y + rows)))
        part = _reducible(strip).reduce(factor)
        if out is None:
            out = Image.new(part.mode, (width // factor, height // factor))
        out.paste(part, (0, y // factor))
    return out


def _to_rgb(img: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Every mode to 8-bit RGB; transparency is composited onto white. `extrema` are the (min, max) of a 32-bit
    integer or float image before it was reduced (its values are scaled to 0..255 by them)."""
    if img.mode.startswith("I;16"):
        img = _i16_to_l(img)
    if img.mode in ("I", "F"):
        lo, hi = extrema if extrema is not None else img.getextrema()
        lo, hi = min(float(lo), 0.0), max(float(hi), 1.0)
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip((arr - np.float32(lo)) * np.float32(255.0 / (hi - lo)) + np.float32(0.5), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # alpha blend onto white, without another full RGBA copy
        return out
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), shrink_to: int | None = None
) -> Image.Image:
    """Bytes -> fully decoded RGB image with EXIF orientation applied (first frame if animated).

    `shrink_to`: the short side the caller will resize to (`resize_side(prep)`); an image more than
    `REDUCING_GAP` times larger is decoded smaller, never below that. None keeps the full size.
    Raises ImageError with the status and a message naming the limit and the allowed value."""
    img = open_image(data, limits)
    try:
        img.seek(0)
        w, h = img.size
        need = REDUCING_GAP * shrink_to if shrink_to else 0
        if need and img.format in ("JPEG", "MPO") and min(w, h) >= 2 * need:
            # the decoder's DCT scaling (1/2, 1/4, 1/8): the full-size image is never allocated
            m = min(w, h)
            drafted = img.draft(None, (-(-w * need // m), -(-h * need // m)))
        else:
            drafted = None
        img.load()  # full decode now: truncated or corrupt data fails here, not later in a batch
        if drafted is not None and img.size != (w, h):  # drop the partial block at the right and bottom
            scale = round(w / drafted[1][2])
            img = img.crop((0, 0, w // scale, h // scale))
        orientation = img.getexif().get(0x0112, 1)
        extrema = img.getextrema() if img.mode in ("I", "F") else None
        shrunk = img.size != (w, h)
        if need and min(img.size) >= 2 * need:
            img, shrunk = _reduce(img, min(img.size) // need), True
        if orientation in _ORIENTATION:
            img = img.transpose(_ORIENTATION[orientation])
            w, h = (h, w) if orientation >= 5 else (w, h)
        img = _to_rgb(img, extrema)
        if shrunk:
            img.info[SOURCE_SIZE] = (w, h)
        return img
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(*img.size, limits.max_pixels) from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
        raise ImageError(f"corrupt or truncated image data: {e}", 422, "corrupt_image") from e


def resize_side(prep: Preprocessing) -> int:
    """The short side an image is resized to before the centre crop: image_size / crop_pct."""
    return int(round(prep.image_size / prep.crop_pct))


def resize_plan(w: int, h: int, prep: Preprocessing) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) that `resize_crop` uses for a w x h image."""
    size = prep.image_size
    scale_size = resize_side(prep)
    if w <= h:
        nw, nh = scale_size, max(scale_size, int(round(h * scale_size / w)))
    else:
        nw, nh = max(scale_size, int(round(w * scale_size / h))), scale_size
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side to image_size / crop_pct, then centre-crop image_size x image_size (planned on
    the full size for an image `decode_image` decoded smaller)."""
    size = prep.image_size
    w, h = img.size
    nw, nh, left, top = resize_plan(*img.info.get(SOURCE_SIZE, img.size), prep)
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


def normalize_image(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """RGB PIL image, already at its final size, -> normalised (3, H, W) float32: no resize (for training
    pipelines whose random crop has sized the image; `to_tensor` resizes first)."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    mean, std = _stats(prep)
    return (x - mean[0]) / std[0]


def to_tensor(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> normalised (3, S, S) float32."""
    return normalize_image(resize_crop(img, prep), prep)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """A uint8 (N, 3, H, W) stack -> (N, 3, size, size) uint8, bicubic and antialiased, `chunk` images at a
    time (a whole dataset in float32 at once would need 4x its memory). The trainer's in-memory validation
    images take this path when they are stored at another size than the model's (CIFAR at 32 px for a
    larger model); a stack already at `size` is returned as is."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for part in images.split(chunk):
        x = torch.nn.functional.interpolate(
            part.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )  # (n, 3, size, size) float in about [0, 255]
        out.append(x.clamp(0, 255).round().to(torch.uint8))
    return torch.cat(out)


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
    return batch((decode_image(d, limits, resize_side(prep)) for d in data), prep)


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
