"""JPEG decoding on the GPU with nvjpeg (torchvision.io.decode_jpeg(device="cuda")) when serving on CUDA.

The header is read by PIL first, so the same limits apply as on the CPU path (size, pixels, smallest side).
Anything nvjpeg does not cover the same way as `decode_image` (CMYK/YCCK, EXIF rotation, non-JPEG formats)
or cannot decode goes back to the CPU path (which then gives the proper error for a bad file): the result of
this function is either the model input or None ("use the CPU").

Tested only on a GPU (tests marked `gpu`).
"""

from __future__ import annotations

import io
import threading

import torch
from PIL import Image

from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import ImageError, ImageLimits, uint8_to_input

_EXIF_ORIENTATION = 0x0112
# torchvision's CUDA decoder shares one nvjpeg handle and writes on its own stream (pytorch/vision#8587,
# #9606): decode one image at a time and wait for it before the tensor is used elsewhere.
_LOCK = threading.Lock()


def decode_jpeg_gpu(
    data: bytes, limits: ImageLimits, prep: Preprocessing, device: torch.device
) -> torch.Tensor | None:
    """JPEG bytes -> normalised (3, S, S) float32 on `device`, or None to fall back to the CPU decoder."""
    if not data.startswith(b"\xff\xd8") or len(data) > limits.max_bytes:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:  # header only
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            w, h = img.size
            if w * h > limits.max_pixels or min(w, h) < limits.min_side:
                return None  # the CPU path raises the limit's error with its message
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with _LOCK:
            x = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)  # (3, H, W) uint8 on the GPU
            if x.device.type == "cuda":
                torch.cuda.synchronize(device)
    except (RuntimeError, ImageError):
        return None
    if tuple(x.shape[1:]) != (h, w):
        return None
    return uint8_to_input(x, prep)
