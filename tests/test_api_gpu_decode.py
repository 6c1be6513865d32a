"""The GPU (nvjpeg) decoding path: what it accepts and hands back to the CPU decoder, and that its tensor
resize matches the PIL path. The logic runs here with torchvision's CPU decoder standing in for nvjpeg
(same call, device="cpu"); the real GPU run is marked `gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from supmae_serve.api.gpu_decode import decode_jpeg_gpu
from supmae_serve.model import Preprocessing
from supmae_serve.preprocess import ImageLimits, decode_image, to_tensor, uint8_to_input

from .conftest import encode, synthetic_image

LIMITS = ImageLimits()


def smooth(size=(300, 200), seed=0) -> Image.Image:
    """A natural-looking image (smooth shading + mild texture): resampling filters agree on such content."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 220
    arr = np.clip(base + rng.normal(0, 4, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("prep", [Preprocessing(image_size=224, crop_pct=0.875), Preprocessing.for_size(32)])
def test_tensor_resize_matches_pil(prep):
    img = smooth()
    ref = to_tensor(img, prep)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    got = uint8_to_input(x, prep)
    assert got.shape == ref.shape == (3, prep.image_size, prep.image_size)
    grey_levels = (got - ref).abs() * torch.tensor(prep.std).view(3, 1, 1) * 255
    assert grey_levels.mean() < 1.0 and grey_levels.max() < 12  # "about one grey level"


def test_jpeg_decoded_by_torchvision_matches_the_cpu_path():
    prep = Preprocessing(image_size=224, crop_pct=0.875)
    data = encode(smooth(), "JPEG", quality=95)
    got = decode_jpeg_gpu(data, LIMITS, prep, torch.device("cpu"))
    ref = to_tensor(decode_image(data), prep)
    assert got is not None and got.shape == ref.shape
    assert ((got - ref).abs() * 255 * torch.tensor(prep.std).view(3, 1, 1)).mean() < 2.0


@pytest.mark.parametrize(
    "data",
    [
        encode(synthetic_image((64, 64)), "PNG"),  # not a JPEG
        encode(Image.new("CMYK", (32, 32), (0, 255, 0, 0)), "JPEG"),  # CMYK: PIL converts it properly
        encode(synthetic_image((4, 4)), "JPEG"),  # under min_side: the CPU path gives the error
        encode(
            synthetic_image((40, 24)),
            "JPEG",
            exif=(lambda e: (e.__setitem__(0x0112, 6), e.tobytes())[1])(Image.Exif()),
        ),
        encode(synthetic_image((64, 64)), "JPEG")[:200],  # truncated
        b"",
    ],
    ids=["png", "cmyk", "tiny", "exif-rotated", "truncated", "empty"],
)
def test_everything_else_goes_back_to_the_cpu_decoder(data):
    assert decode_jpeg_gpu(data, LIMITS, Preprocessing.for_size(32), torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg)")
def test_nvjpeg_on_gpu():  # pragma: no cover - no GPU on the development machines
    prep = Preprocessing(image_size=224, crop_pct=0.875)
    data = encode(smooth(), "JPEG", quality=95)
    got = decode_jpeg_gpu(data, LIMITS, prep, torch.device("cuda"))
    ref = to_tensor(decode_image(data), prep)
    assert got is not None and got.device.type == "cuda"
    assert ((got.cpu() - ref).abs() * 255 * torch.tensor(prep.std).view(3, 1, 1)).mean() < 2.0
