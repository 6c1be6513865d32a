"""Peak memory of decoding untrusted images as the server does (issue 11): per image at the pixel limit, for
each advertised format and the modes that cost most, and for one request of many such images.

    python benchmarks/decode_memory.py                          # 4096 x 4096 (the default --max-pixels)
    python benchmarks/decode_memory.py --side 6320 --only png-i16   # the issue's 16-bit greyscale PNG

Each figure is the growth of the peak resident set (ru_maxrss) while one decode runs, in a child process
forked after the imports (Pillow's buffers are invisible to tracemalloc). Images are smooth gradients, so
they compress to well under --max-image-bytes: the cheapest files that make the server decode the most.
The request figures send one JSON request of up to `--request-images` such images (the worst kind, lossless
WebP, and RGBA PNG) through the API (fake backend, `--decode-threads` decoding at once) and report its peak.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supmae_serve.model import Preprocessing  # noqa: E402
from supmae_serve.preprocess import ImageLimits, decode_image, resize_side  # noqa: E402


def _gradient(side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    return np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) * 127 // side, 255 - xx * 200 // side], -1)


def images(side: int) -> dict[str, bytes]:
    """name -> encoded image of side x side pixels."""
    g = _gradient(side).astype(np.uint8)
    rgba = Image.fromarray(g, "RGBA")
    out = {}

    def save(name, img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()

    save("png-rgba", rgba, "PNG")
    save("png-rgb", rgba.convert("RGB"), "PNG")
    save("png-palette-transparent", rgba.convert("RGB").quantize(64), "PNG", transparency=0)
    save("png-i16", Image.fromarray(g[..., 0].astype(np.uint16) * 257), "PNG")
    save("png-la", rgba.convert("LA"), "PNG")
    save("jpeg-rgb", rgba.convert("RGB"), "JPEG", quality=90)
    save("jpeg-cmyk", rgba.convert("CMYK"), "JPEG", quality=90)
    # WebP pixels count 4x against the limit (supmae_serve.preprocess._PIXEL_COST): half the side
    save("webp-rgba-lossless", rgba.resize((side // 2, side // 2)), "WEBP", lossless=True)
    save("gif-palette", rgba.convert("RGB").quantize(64), "GIF")
    save("tiff-rgb-deflate", rgba.convert("RGB"), "TIFF", compression="tiff_adobe_deflate")
    save(
        "tiff-float32-deflate",
        Image.fromarray(g[..., 0].astype(np.float32)),
        "TIFF",
        compression="tiff_adobe_deflate",
    )
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_growth(fn, setup=None) -> tuple[int, float]:
    """(bytes the peak resident set grew by, seconds) while fn(setup()) runs in a forked child.

    The child hands the freed memory it inherited back to the system (glibc's malloc_trim) and resets its
    peak to its current size (/proc/self/clear_refs, Linux), so reused free heap cannot hide an allocation."""
    import ctypes
    import traceback

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ready = setup() if setup is not None else None
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_kib("VmRSS")
            t0 = time.perf_counter()
            fn(ready) if setup is not None else fn()
            dt = time.perf_counter() - t0
            os.write(write, f"{(_status_kib('VmHWM') - before) * 1024} {dt}".encode())
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        text = f.read()
    try:
        grown, dt = text.split()
        return int(grown), float(dt)
    except ValueError:
        raise RuntimeError(f"the measuring child failed:\n{text}") from None


def request_peak(data: bytes, n: int, decode_threads: int) -> tuple[int, float, int, int]:
    """(peak growth, seconds, body bytes, images) of one /v1/embed request of up to n copies of `data` (JSON,
    base64), as many as fit in the default request limit."""
    from fastapi.testclient import TestClient

    from supmae_serve.api.app import create_app
    from supmae_serve.backends.fake import FakeBackend, fake_card
    from supmae_serve.settings import Settings

    text = base64.b64encode(data).decode()
    n = min(n, (32 * 1024 * 1024 - 1024) // (len(text) + 3))  # what fits in the default --max-request-bytes
    body = {"images": [text] * n}

    def setup():
        settings = Settings(model="unused", demo=False, warmup=False, decode_threads=decode_threads)
        client = TestClient(create_app(settings, backend=FakeBackend(fake_card())))
        client.__enter__()
        small = base64.b64encode(_small_png()).decode()
        assert client.post("/v1/embed", json={"images": [small] * n}).status_code == 200  # warm
        return client

    def run(client):
        r = client.post("/v1/embed", json=body)
        assert r.status_code == 200, r.text[:300]

    grown, dt = peak_growth(run, setup)
    return grown, dt, len(text) * n, n


def _small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=4096, help="image side in pixels (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="model input side (default: %(default)s)")
    p.add_argument("--only", nargs="*", help="image names to measure")
    p.add_argument("--request-images", type=int, default=64)
    p.add_argument(
        "--request-image", nargs="*", default=["webp-rgba-lossless", "png-rgba"], help="image kinds to send"
    )
    p.add_argument("--decode-threads", type=int, default=4)
    args = p.parse_args(argv)
    prep = Preprocessing.for_size(args.image_size)
    pixels = args.side * args.side
    limits = ImageLimits(max_pixels=pixels, max_bytes=64 * 1024 * 1024)
    print(
        f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"Pillow {Image.__version__}; {args.side} x {args.side} = {pixels} pixels, {args.image_size}-px model"
    )
    print("| image | pixels | file bytes | peak growth (MiB) | bytes per pixel | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    encoded = images(args.side)
    for name, data in encoded.items():
        if args.only and name not in args.only:
            continue
        n = Image.open(io.BytesIO(data)).size
        n = n[0] * n[1]
        grown, dt = peak_growth(lambda d=data: decode_image(d, limits, resize_side(prep)))
        print(f"| {name} | {n} | {len(data)} | {grown / 2**20:.0f} | {grown / n:.2f} | {dt:.2f} |")
    for kind in args.request_image if args.request_images else []:
        grown, dt, size, n = request_peak(encoded[kind], args.request_images, args.decode_threads)
        print(
            f"\none request of {n} x {kind} ({size} bytes of JSON), {args.decode_threads} decode threads: "
            f"peak growth {grown / 2**20:.0f} MiB, {dt:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
