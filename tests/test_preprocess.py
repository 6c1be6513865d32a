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
    resize_side,
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


# ---------------------------------------------------------------------------- hardening (issue 11, 14)
@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "SGI", "PPM", "DDS", "IM"])
def test_only_the_advertised_formats_are_decoded(fmt):
    data = encode(synthetic_image((32, 32)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would decode it
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert (e.value.status, e.value.code) == (415, "unsupported_format")
    assert "JPEG, PNG, WebP, GIF, BMP, TIFF" in str(e.value)


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*args, **kwargs):  # what would run the file's PostScript where Ghostscript is installed
        calls.append(args)
        raise OSError("ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    data = encode(synthetic_image((32, 32)), "EPS")
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.code == "unsupported_format" and calls == []


@pytest.mark.parametrize(("w", "h"), [(30000, 30000), (20000, 3000), (7000, 7000)])
def test_too_many_pixels_names_the_size_even_past_pillows_own_check(w, h):
    # 30000 x 30000 is over twice Pillow's MAX_IMAGE_PIXELS: Pillow refuses it before saying its size
    with pytest.raises(ImageError) as e:
        decode_image(_png_claiming(w, h))
    assert (e.value.status, e.value.code) == (413, "too_many_pixels")
    assert str(e.value) == f"image is {w}x{h} = {w * h} pixels; the limit is 40000000 pixels"


def test_webp_counts_four_times_against_the_pixel_limit():
    """Pillow decodes WebP at about 16 bytes per pixel (libwebp's animation decoder), 4x the other formats."""
    img = synthetic_image((100, 100))
    limits = ImageLimits(max_pixels=30_000)
    assert decode_image(encode(img, "PNG"), limits).size == (100, 100)
    with pytest.raises(ImageError) as e:
        decode_image(encode(img, "WEBP"), limits)
    assert e.value.code == "too_many_pixels"
    assert str(e.value).startswith(
        "image is 100x100 = 10000 pixels; the limit is 7500 pixels for WEBP images"
    )


def test_large_images_are_shrunk_while_decoding_to_what_the_model_needs():
    prep = Preprocessing(image_size=32, crop_pct=1.0)
    big = synthetic_image((1000, 600), seed=7)
    for fmt in ("PNG", "JPEG"):
        img = decode_image(encode(big, fmt), shrink_to=resize_side(prep))
        assert img.mode == "RGB" and 96 <= min(img.size) < 192  # >= 3 x the resize side, never less
        assert abs(img.size[0] / img.size[1] - 1000 / 600) < 0.02
    assert decode_image(encode(big)).size == (1000, 600)  # no shrink_to: the full image
    # the model input barely changes: the resize of the shrunk image vs of the full one (grey levels)
    yy, xx = np.mgrid[0:1201, 0:3003]
    grey = (xx * 200 // 3002 + 40 * np.sin(xx / 60.0) + yy * 15 // 1200).astype(np.uint8)
    smooth = Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    for fmt in ("PNG", "JPEG"):
        data = encode(smooth, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        full = to_tensor(decode_image(data), prep)
        shrunk = load_images([data], prep)[0]
        assert (full - shrunk).abs().max() * 0.229 * 255 <= 4, fmt


def test_every_mode_survives_shrinking():
    prep = Preprocessing(image_size=32, crop_pct=1.0)
    i16 = Image.fromarray(np.full((300, 400), 65535, dtype=np.uint16))
    pal = Image.new("P", (400, 300), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    for img, kw, pixel in [
        (Image.new("RGBA", (400, 300), (255, 0, 0, 0)), {}, (255, 255, 255)),  # transparent -> white
        (pal, {"transparency": 0}, (10, 200, 30)),
        (i16, {}, (255, 255, 255)),
        (Image.new("LA", (400, 300), (0, 255)), {}, (0, 0, 0)),
        (Image.new("1", (400, 300), 1), {}, (255, 255, 255)),
        (Image.new("CMYK", (400, 300), (0, 0, 0, 0)), {}, (255, 255, 255)),
    ]:
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        out = decode_image(encode(img, fmt, **kw), shrink_to=resize_side(prep))
        assert out.mode == "RGB" and out.size[0] < 400, img.mode
        assert all(abs(a - b) <= 2 for a, b in zip(out.getpixel((5, 5)), pixel, strict=True)), img.mode


def test_exif_orientation_survives_shrinking():
    img = Image.new("RGB", (400, 200), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 200))  # white left quarter
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    for fmt in ("JPEG", "PNG"):
        out = decode_image(encode(img, fmt, exif=exif.tobytes()), shrink_to=32)
        assert out.size[0] < out.size[1]  # portrait after rotation
        assert np.asarray(out)[2, out.size[0] // 2].mean() > 200, fmt  # the white strip is now at the top


def _peak_rss_of(fn, timeout_s: float = 60.0) -> int:
    """Bytes the resident set grows by while `fn()` runs, measured in a forked child (which starts with this
    process's memory mapped, so only what `fn` allocates counts; Pillow's buffers are invisible to
    tracemalloc)."""
    import os
    import resource
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running any cleanup of the parent's
        try:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            fn()
            os.write(
                write, str((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024).encode()
            )
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"decoding took more than {timeout_s} s")
        time.sleep(0.02)
    with os.fdopen(read) as f:
        return int(f.read() or -1)


@pytest.mark.slow
def test_decode_memory_of_a_tiny_16_bit_png_of_40_megapixels():
    """Issue 11: a 77 KB 16-bit greyscale PNG of 6320 x 6320 pixels cost a gigabyte (float64 copies); now the
    peak is the decoded image itself (2 bytes per pixel) and a 1-byte-per-pixel 8-bit copy."""
    arr = np.zeros((6320, 6320), dtype=np.uint16)
    arr[::7] = 40000
    data = encode(Image.fromarray(arr), compress_level=9)
    del arr
    assert len(data) < 100_000
    pixels = 6320 * 6320
    limits = ImageLimits(max_pixels=40_000_000)
    peak = _peak_rss_of(lambda: load_images([data], PREP32, limits))
    assert 0 < peak < 3.5 * pixels, (
        f"decoding took {peak / 2**20:.0f} MiB ({peak / pixels:.1f} bytes per pixel)"
    )
    with pytest.raises(ImageError, match="image is 6320x6320 = 39942400 pixels; the limit is 16777216"):
        decode_image(data, ImageLimits(max_pixels=16_777_216))  # the server's default refuses it unread
