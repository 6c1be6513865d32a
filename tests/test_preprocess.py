import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from supmae_serve.model import Preprocessing
from supmae_serve.preprocess import (
    ImageError,
    ImageLimits,
    batch,
    decode_image,
    denormalize,
    load_images,
    resize_crop,
    to_tensor,
)

from .conftest import encode, synthetic_image

PREP32 = Preprocessing.for_size(32)


def test_to_tensor_normalises_with_card_stats():
    img = Image.new("RGB", (32, 32), (255, 0, 128))
    x = to_tensor(img, PREP32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expect = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(x[:, 5, 5], torch.tensor(expect), rtol=1e-5, atol=1e-5)


def test_resize_then_centre_crop():
    prep = Preprocessing(image_size=224, crop_pct=0.875)
    out = resize_crop(synthetic_image((400, 300)), prep)
    assert out.size == (224, 224)
    # the short side is resized to 256 = 224 / 0.875 first: a 256x256 input is only cropped
    arr = np.asarray(synthetic_image((256, 256), seed=3))
    cropped = np.asarray(resize_crop(Image.fromarray(arr), prep))
    assert np.array_equal(cropped, arr[16:240, 16:240])


def test_denormalize_inverts():
    img = synthetic_image((32, 32), seed=4)
    x = batch([img], PREP32)
    assert np.array_equal(denormalize(x, PREP32)[0], np.asarray(img))


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red -> white
    assert decode_image(encode(rgba)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    assert decode_image(encode(pal, transparency=0)).getpixel((0, 0)) == (10, 200, 30)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 0, 0))
    assert decode_image(encode(cmyk, "JPEG")).mode == "RGB"
    i16 = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    assert decode_image(encode(i16)).getpixel((3, 3)) == (255, 255, 255)
    la = Image.new("LA", (16, 16), (0, 255))
    assert decode_image(encode(la)).getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white left strip
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    assert np.asarray(out)[2, 10].mean() > 200  # the white strip is now at the top


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buf.getvalue()).getpixel((4, 4))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "data,status,code",
    [
        (b"", 422, "empty_image"),
        (b"hello, not an image", 415, "unsupported_format"),
        (encode(synthetic_image((64, 64)), "JPEG")[:300], 422, "corrupt_image"),
        (encode(synthetic_image((64, 64)), "PNG")[:400], 422, "corrupt_image"),
        (encode(Image.new("RGB", (1, 1))), 422, "image_too_small"),
    ],
)
def test_bad_images(data, status, code):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert (e.value.status, e.value.code) == (status, code)


def test_limits_name_the_allowed_value():
    data = encode(synthetic_image((64, 64)))
    with pytest.raises(ImageError, match="limit is 100 bytes") as e:
        decode_image(data, ImageLimits(max_bytes=100))
    assert e.value.status == 413
    with pytest.raises(ImageError, match="limit is 1000 pixels") as e:
        decode_image(data, ImageLimits(max_pixels=1000))
    assert e.value.status == 413


def _png_claiming(width: int, height: int) -> bytes:
    """A real small PNG whose header claims width x height (CRC fixed): a decompression bomb's shape."""
    data = bytearray(encode(Image.new("L", (64, 64))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_rejected_before_decoding():
    with pytest.raises(ImageError) as e:
        decode_image(_png_claiming(30000, 30000))
    assert e.value.status == 413 and "pixels" in str(e.value)
    # a genuinely large image (a bomb in miniature) under a small limit: same answer
    with pytest.raises(ImageError) as e:
        decode_image(encode(Image.new("L", (3000, 3000))), ImageLimits(max_pixels=1_000_000))
    assert e.value.status == 413


def test_load_images_batch():
    x = load_images([encode(synthetic_image((50, 40), seed=i)) for i in range(3)], PREP32)
    assert x.shape == (3, 3, 32, 32)
