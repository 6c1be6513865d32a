"""The REST API through FastAPI's TestClient: every endpoint and input form, per-item errors, each limit and
status code, the bad-input corpus, queue-full, timeouts, readiness, API keys, CORS, URL fetching, metrics."""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.demo import DemoConfig
from supmae_serve.api.app import create_app
from supmae_serve.backends.fake import FakeBackend, fake_card
from supmae_serve.model import save_checkpoint
from supmae_serve.preprocess import decode_image, to_tensor
from supmae_serve.settings import Settings

from .conftest import encode, synthetic_image, tiny_model

CLASSES = [f"class{i}" for i in range(10)]
PNG = encode(synthetic_image((40, 36), seed=1))
JPEG = encode(synthetic_image((48, 48), seed=2), "JPEG", quality=90)
LIMITS = dict(
    max_image_bytes=300_000, max_request_bytes=1_000_000, max_images_per_request=8, max_pixels=4_000_000
)


def tiny_checkpoint(path: Path, framework: str = "supmae") -> Path:
    model = tiny_model(framework)
    save_checkpoint(
        model, path, variant="micro_patch4_32", class_names=CLASSES if model.config.has_head else None
    )
    return path


def settings(model: Path | str = "unused", **kw) -> Settings:
    # torch on the CPU, as these tests were written for (the default graph cache: tests/test_graph_cache.py)
    base = dict(model=model, demo=False, warmup=False, max_wait_ms=2.0, graph_cache="off", **LIMITS)
    return Settings(**{**base, **kw})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- the bad-input corpus
def _png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose header claims width x height: the shape of a decompression bomb."""
    import struct
    import zlib

    data = bytearray(encode(Image.new("L", (64, 64))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(synthetic_image((40, 24), seed=5), "JPEG", exif=exif.tobytes())


def _palette_transparent() -> bytes:
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return encode(pal, transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def bad_corpus() -> list[tuple[str, bytes, str, int, str | None]]:
    """(name, body, content type, expected status, expected error code) for a raw-body request."""
    jpeg = encode(synthetic_image((64, 64)), "JPEG")
    png = encode(synthetic_image((64, 64)), "PNG")
    return [
        ("zero-bytes", b"", "image/png", 422, "empty_image"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", 422, "corrupt_image"),
        ("truncated-png", png[: len(png) // 2], "image/png", 422, "corrupt_image"),
        ("decompression-bomb", _png_claiming(30000, 30000), "image/png", 413, "too_many_pixels"),
        ("not-an-image", b"%PDF-1.4 definitely not an image", "image/png", 415, "unsupported_format"),
        ("one-pixel", encode(Image.new("RGB", (1, 1))), "image/png", 422, "image_too_small"),
        ("cmyk-jpeg", encode(Image.new("CMYK", (32, 32), (0, 255, 0, 0)), "JPEG"), "image/jpeg", 200, None),
        (
            "16-bit-png",
            encode(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))),
            "image/png",
            200,
            None,
        ),
        ("palette-transparency", _palette_transparent(), "image/png", 200, None),
        ("exif-rotated", _exif_rotated(), "image/jpeg", 200, None),
        ("animated-gif", _animated_gif(), "image/gif", 200, None),
        ("wrong-content-type", png, "text/plain", 415, "unsupported_media_type"),
        ("mislabelled-type", png, "image/jpeg", 200, None),  # decoded by content, not by label
        ("octet-stream", png, "application/octet-stream", 200, None),
        # issue 11: these raised RecursionError and ValueError in json.loads -> 500 and a 13 KB traceback
        ("deeply-nested-json", b"[" * 14_000, "application/json", 422, "invalid_json"),
        (
            "5000-digit-integer",
            b'{"images": [], "top_k": ' + b"9" * 5000 + b"}",
            "application/json",
            422,
            "invalid_json",
        ),
    ]


CORPUS = bad_corpus()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def client(ckpt):
    with TestClient(create_app(settings(ckpt))) as c:
        yield c


def fake_client(backend: FakeBackend, **kw) -> TestClient:
    return TestClient(create_app(settings(**kw), backend=backend))


class GatedBackend(FakeBackend):
    """A fake whose model call blocks until `gate` is set (a slow model)."""

    def __init__(self, **kw):
        super().__init__(fake_card(class_names=CLASSES), **kw)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _work(self, n: int) -> None:
        self.entered.set()
        assert self.gate.wait(20)
        super()._work(n)


def good_request(client: TestClient):
    r = client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r


# ---------------------------------------------------------------------------- health, info, docs
def test_health_readiness_info_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {
        "ready": True,
        "checks": {"model_loaded": True, "warmed_up": True, "batcher_alive": True},
    }
    info = client.get("/v1/info").json()
    assert info["backend"]["name"] == "torch" and info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["model"]["class_names"] == CLASSES and info["capabilities"]["reconstruct"]
    assert info["limits"]["max_images_per_request"] == 8 and info["batching"]["max_batch_size"] == 32
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/embed",
        "/v1/classify",
        "/v1/reconstruct",
        "/v1/info",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/*"} <= set(body)
    assert {p["name"] for p in spec["paths"]["/v1/embed"]["post"]["parameters"]} == {
        "normalize",
        "pooling",
        "encoding_format",
    }
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------------------- input forms
def test_every_input_form_gives_the_same_answer(client):
    raw = client.post("/v1/embed", content=PNG, headers={"content-type": "image/png"}).json()
    forms = [
        client.post("/v1/embed", files={"file": ("a.png", PNG, "image/png")}),
        client.post("/v1/embed", json={"images": [b64(PNG)]}),
        client.post("/v1/embed", json={"image": "data:image/png;base64," + b64(PNG)}),
        client.post("/v1/embed", json={"images": [{"data": b64(PNG)}]}),
        client.post("/v1/embed", json=[b64(PNG)]),
        client.post(
            "/v1/embed",
            json={"images": ["\n".join(b64(PNG)[i : i + 76] for i in range(0, len(b64(PNG)), 76))]},
        ),
    ]
    for r in forms:
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], raw["data"][0]["embedding"], atol=1e-6)


def test_several_images_one_result_each_in_order(client):
    imgs = [encode(synthetic_image((32, 32), seed=s)) for s in range(5)]
    r = client.post(
        "/v1/classify", files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(imgs)]
    )
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(5))
    singles = [
        client.post("/v1/classify", content=d, headers={"content-type": "image/png"}).json() for d in imgs
    ]
    for d, s in zip(data, singles, strict=True):  # batched == alone
        assert d["predictions"][0]["label"] == s["data"][0]["predictions"][0]["label"]
        assert d["predictions"][0]["score"] == pytest.approx(
            s["data"][0]["predictions"][0]["score"], abs=1e-5
        )


def test_api_output_is_the_backend_on_the_shared_preprocessing(client):
    service = client.app.state.service
    x = to_tensor(decode_image(JPEG), service.card.preprocessing).unsqueeze(0)
    expect = service.backend.embed(x, "cls").embedding[0]
    r = client.post(
        "/v1/embed?pooling=cls&normalize=false", content=JPEG, headers={"content-type": "image/jpeg"}
    )
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expect, atol=1e-5)


# ---------------------------------------------------------------------------- options per route
def test_embed_options(client):
    def post(q, **kw):
        return client.post(f"/v1/embed{q}", content=PNG, headers={"content-type": "image/png"}, **kw)

    avg = post("").json()
    assert avg["pooling"] == "avg" and avg["normalized"] and avg["data"][0]["shape"] == [64]
    assert np.linalg.norm(avg["data"][0]["embedding"]) == pytest.approx(1.0, abs=1e-5)
    raw = post("?normalize=false").json()["data"][0]["embedding"]
    assert np.linalg.norm(raw) != pytest.approx(1.0, abs=1e-3)
    patch = post("?pooling=patch").json()["data"][0]
    assert patch["shape"] == [64, 64]
    np.testing.assert_allclose(np.linalg.norm(patch["embedding"], axis=1), 1.0, atol=1e-5)
    enc = post("?encoding_format=base64&normalize=false").json()["data"][0]
    decoded = np.frombuffer(base64.b64decode(enc["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, raw, atol=1e-7)
    # options in the JSON body win over the query string
    r = client.post("/v1/embed?pooling=avg", json={"images": [b64(PNG)], "pooling": "cls"}).json()
    assert r["pooling"] == "cls"
    # and as multipart form fields
    r = client.post("/v1/embed", files={"f": ("a.png", PNG, "image/png")}, data={"pooling": "patch"}).json()
    assert r["data"][0]["shape"] == [64, 64]


def test_classify_top_k_and_labels(client):
    r = client.post("/v1/classify?top_k=3", content=PNG, headers={"content-type": "image/png"}).json()
    preds = r["data"][0]["predictions"]
    assert len(preds) == 3 and all(p["label"] == CLASSES[p["class_index"]] for p in preds)
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    full = client.post("/v1/classify?top_k=1000", content=PNG, headers={"content-type": "image/png"}).json()
    assert len(full["data"][0]["predictions"]) == 10  # clamped to the number of classes
    assert sum(p["score"] for p in full["data"][0]["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_reconstruct_returns_pngs_and_is_seeded(client):
    def rec(**opts):
        r = client.post("/v1/reconstruct", json={"images": [b64(PNG)], **opts})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]

    a, b, c = rec(seed=3), rec(seed=3), rec(seed=4, mask_ratio=0.5, upscale=4)
    assert a["mask"] == b["mask"] and a["images"] == b["images"]
    assert (
        a["mask_ratio"] == 0.75
        and a["visible_patches"] == 16
        and a["grid"] == [8, 8]
        and len(a["mask"]) == 64
    )
    assert c["visible_patches"] == 32 and c["mask"] != a["mask"]
    for name in ("original", "masked", "reconstruction", "reconstruction_visible"):
        img = Image.open(io.BytesIO(base64.b64decode(c["images"][name])))
        assert img.format == "PNG" and img.size == (128, 128) and img.mode == "RGB"
    # the visible patches of reconstruction_visible are the input's own
    orig = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["images"]["original"]))), dtype=int)
    vis = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(a["images"]["reconstruction_visible"]))), dtype=int
    )
    keep = a["mask"].index(0)
    r0, c0 = divmod(keep, 8)
    patch = np.s_[r0 * 4 : r0 * 4 + 4, c0 * 4 : c0 * 4 + 4]
    assert np.abs(orig[patch] - vis[patch]).max() <= 1


def test_aliases(client):
    for path in ("/embed", "/classify", "/reconstruct"):
        r = client.post(path, content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 200, (path, r.text)


# ---------------------------------------------------------------------------- per-item errors and status codes
def test_a_bad_image_fails_only_its_own_item(client):
    r = client.post(
        "/v1/classify",
        files=[
            ("files", ("good.png", PNG, "image/png")),
            ("files", ("bad.txt", b"not an image", "text/plain")),
            ("files", ("tiny.png", encode(Image.new("RGB", (2, 2))), "image/png")),
            ("files", ("good.jpg", JPEG, "image/jpeg")),
        ],
    )
    assert r.status_code == 200
    body = r.json()
    assert body["usage"] == {"images": 4, "succeeded": 2, "failed": 2}
    d = body["data"]
    assert "predictions" in d[0] and "predictions" in d[3]
    assert d[1]["error"]["status"] == 415 and d[1]["error"]["code"] == "unsupported_format"
    assert d[2]["error"]["status"] == 422 and "at least 8 pixels" in d[2]["error"]["message"]


def test_status_when_every_image_fails(client):
    same = client.post("/v1/embed", json={"images": [b64(b"nope"), b64(b"nah")]})
    assert same.status_code == 415 and all(
        d["error"]["code"] == "unsupported_format" for d in same.json()["data"]
    )
    mixed = client.post("/v1/embed", json={"images": [b64(b"nope"), b64(b"")]})
    assert mixed.status_code == 422


@pytest.mark.parametrize("name,data,ctype,status,code", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_corpus_never_5xx_and_server_keeps_answering(client, name, data, ctype, status, code):
    for path in ("/v1/classify", "/v1/embed"):
        r = client.post(path, content=data, headers={"content-type": ctype})
        assert r.status_code == status, (name, r.text)
        if code:
            body = r.json()
            err = body["error"] if "error" in body else body["data"][0]["error"]
            assert err["code"] == code and err["status"] == status and err["message"]
    good_request(client)


def test_huge_base64_strings(client):
    huge = "A" * (LIMITS["max_image_bytes"] * 2)  # over the per-image limit, under the request limit
    r = client.post("/v1/embed", json={"images": [huge, b64(PNG)]})
    assert r.status_code == 200
    err = r.json()["data"][0]["error"]
    assert err["status"] == 413 and f"limit is {LIMITS['max_image_bytes']} bytes per image" in err["message"]
    r = client.post("/v1/embed", json={"images": ["A" * (LIMITS["max_request_bytes"] + 10)]})
    assert r.status_code == 413 and "per request" in r.json()["error"]["message"]
    good_request(client)


def test_request_limits(client):
    r = client.post("/v1/embed", json={"images": [b64(PNG)] * 9})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    assert "limit is 8 images per request" in r.json()["error"]["message"]
    r = client.post("/v1/embed", files=[("f", (f"{i}.png", PNG, "image/png")) for i in range(9)])
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    big = encode(synthetic_image((400, 300)), "BMP")  # 360 KB > 300 KB per image
    r = client.post("/v1/embed", content=big, headers={"content-type": "image/bmp"})
    assert r.status_code == 413 and r.json()["data"][0]["error"]["code"] == "image_too_large"
    r = client.post("/v1/embed", files={"f": ("big.bmp", big, "image/bmp")})
    assert r.status_code == 413
    r = client.post("/v1/embed", content=b"x" * 1_100_000, headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    many_pixels = encode(Image.new("L", (2100, 2000)))  # 4.2 M pixels > 4 M
    r = client.post("/v1/embed", content=many_pixels, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "limit is 4000000 pixels" in r.json()["data"][0]["error"]["message"]
    good_request(client)


@pytest.mark.parametrize(
    "text",
    [
        "!!!notb64",
        "@@@@",
        "a",
        "abcde",
        "QUJD+-",
        "QU=JD",
        "QUJD!",
        "data:image/png;base64,@@@@",
        "====",
        "QQ===",
    ],
)
def test_invalid_base64_is_invalid_base64_whatever_its_length(client, text):
    """Issue 14: the URL-safe fallback dropped invalid characters, so '!!!notb64' became bytes (415) and
    '@@@@' nothing (422 empty_image)."""
    r = client.post("/v1/embed", json={"images": [text]})
    err = r.json()["data"][0]["error"]
    assert (r.status_code, err["code"]) == (422, "invalid_base64"), r.text
    assert "not valid base64" in err["message"]


def test_base64_in_either_alphabet_with_or_without_padding(client):
    png = PNG + b"\xfb\xff\xfe" * 3  # bytes after IEND are ignored by decoders; they force + / - _ characters
    standard, urlsafe = base64.b64encode(png).decode(), base64.urlsafe_b64encode(png).decode()
    assert standard != urlsafe
    expect = client.post("/v1/embed", content=png, headers={"content-type": "image/png"}).json()["data"][0]
    for text in (standard, urlsafe, standard.rstrip("="), urlsafe.rstrip("=")):
        r = client.post("/v1/embed", json={"images": [text]})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["embedding"] == expect["embedding"]


def test_client_errors_are_4xx_without_a_logged_traceback(client, caplog):
    with caplog.at_level(logging.WARNING):
        for _, data, ctype, status, _ in CORPUS[-2:]:
            r = client.post("/v1/classify", content=data, headers={"content-type": ctype})
            assert r.status_code == status, r.text
        r = client.post(
            "/v1/classify?top_k=" + "9" * 5000, content=PNG, headers={"content-type": "image/png"}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.text


def test_too_many_pixels_always_names_the_size(client):
    """Issue 14: past Pillow's own bomb check (30000 x 30000) the message lacked the size; it is the same
    message whichever check refuses the image."""
    for w, h in ((30000, 30000), (2100, 2000)):
        r = client.post("/v1/classify", content=_png_claiming(w, h), headers={"content-type": "image/png"})
        err = r.json()["data"][0]["error"]
        assert (r.status_code, err["code"]) == (413, "too_many_pixels")
        assert err["message"] == f"image is {w}x{h} = {w * h} pixels; the limit is 4000000 pixels"


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid_json"),
        (dict(json={"pictures": []}), 422, "no_images"),
        (dict(json={"images": []}), 422, "no_images"),
        (dict(json={"images": [42]}), 422, "invalid_item"),
        (dict(json={"images": ["data:text/plain;base64,aGk="]}), 415, "unsupported_media_type"),
        (dict(json={"images": ["data:image/png,rawtext"]}), 422, "invalid_data_uri"),
        (dict(json={"images": ["!!!not base64!!!"]}), 422, "invalid_base64"),
        (dict(json={"images": [b64(PNG)], "poolng": "cls"}), 422, "invalid_option"),
        (dict(json={"images": [b64(PNG)], "pooling": "max"}), 422, "invalid_option"),
        (dict(json={"images": [b64(PNG)], "normalize": "maybe"}), 422, "invalid_option"),
        (dict(content=PNG), 415, "unsupported_media_type"),  # no content type at all
        (
            dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}),
            422,
            None,
        ),
    ],
)
def test_request_errors(client, kwargs, status, code):
    r = client.post("/v1/embed", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"] if "error" in body else body["data"][0]["error"]
    assert err["message"] and (code is None or err["code"] == code)
    good_request(client)


def test_option_limits_of_reconstruct_and_classify(client):
    r = client.post("/v1/reconstruct?upscale=9", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "the limit is 8" in r.json()["error"]["message"]
    r = client.post("/v1/reconstruct?mask_ratio=1.0", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 422
    r = client.post("/v1/classify?top_k=0", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"


def test_capabilities_are_enforced_per_model():
    with fake_client(FakeBackend(fake_card(framework="mae"))) as c:
        r = c.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 422 and "cannot classify" in r.json()["error"]["message"]
        assert (
            c.post("/v1/reconstruct", content=PNG, headers={"content-type": "image/png"}).status_code == 200
        )
    with fake_client(FakeBackend(fake_card(framework="supervised"))) as c:
        r = c.post("/v1/reconstruct", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "capability_unavailable"


def test_a_large_response_does_not_stall_the_event_loop():
    """Issue 11: /v1/embed?pooling=patch for 64 images (15 MB of JSON) was encoded on the event loop and
    stalled every other request (/healthz) for as long. The loop's longest pause while such a response is
    built must be a small part of what encoding that JSON in one go takes."""
    import asyncio
    import time

    card = fake_card(class_names=CLASSES, embed_dim=192)  # ViT-T width, 64 patches: 64 x 64 x 192 floats
    s = settings(max_images_per_request=64, max_request_bytes=4_000_000)
    with TestClient(create_app(s, backend=FakeBackend(card))) as c:
        body = {"images": [b64(encode(synthetic_image(seed=i))) for i in range(64)], "pooling": "patch"}
        assert c.post("/v1/embed", json=body).status_code == 200  # warm
        pauses: list[float] = []
        stop = threading.Event()

        async def watch():
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.002)
                pauses.append(loop.time() - t - 0.002)

        c.portal.start_task_soon(watch)
        r = c.post("/v1/embed", json=body)
        stop.set()
        assert r.status_code == 200 and len(r.content) > 10_000_000
        t0 = time.perf_counter()
        json.dumps(r.json())
        one_go = time.perf_counter() - t0
    assert max(pauses) < one_go / 3, (max(pauses), one_go)


# ---------------------------------------------------------------------------- timing headers and metrics
def test_timing_headers(client):
    r = good_request(client)
    for h in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms", "x-batch-size", "x-request-id"):
        assert h in r.headers, h
    assert float(r.headers["x-total-time-ms"]) >= float(r.headers["x-inference-time-ms"]) >= 0
    timing = r.headers["server-timing"]
    assert timing.startswith("queue;dur=") and "inference;dur=" in timing and "total;dur=" in timing
    assert client.get("/healthz", headers={"x-request-id": "abc"}).headers["x-request-id"] == "abc"


def test_metrics(client):
    good_request(client)
    client.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"})
    client.get("/nowhere")
    text = client.get("/metrics").text
    for line in (
        'supmae_requests_total{method="POST",route="/v1/classify",status="200"}',
        'supmae_requests_total{method="POST",route="/v1/classify",status="415"}',
        'supmae_requests_total{method="GET",route="unmatched",status="404"}',
        'supmae_request_duration_seconds_bucket{le="0.5",route="/v1/classify"}',
        "supmae_queue_depth 0.0",
        "supmae_queue_time_seconds_count",
        "supmae_batch_size_bucket",
        'supmae_inference_seconds_count{task="classify"}',
        'supmae_batches_total{outcome="ok",task="classify"}',
        'supmae_image_errors_total{code="unsupported_format"}',
        'supmae_images_total{outcome="ok",task="classify"}',
        "supmae_ready 1.0",
    ):
        assert line in text, line


# ---------------------------------------------------------------------------- batching through the API
def test_concurrent_requests_are_batched_together():
    fake = FakeBackend(fake_card(class_names=CLASSES), delay_s=0.05)
    with fake_client(fake, max_wait_ms=300, max_batch_size=8) as c:
        fake.batch_sizes.clear()
        results = [None] * 6

        def send(i):
            results[i] = c.post(
                "/v1/embed", content=encode(synthetic_image(seed=i)), headers={"content-type": "image/png"}
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(r.status_code == 200 for r in results)
        assert sum(fake.batch_sizes) == 6 and max(fake.batch_sizes) > 1, fake.batch_sizes
        assert max(int(r.headers["x-batch-size"]) for r in results) > 1


def test_a_lone_request_does_not_sit_out_max_wait():
    """Nothing else is being decoded, so the batch runs at once rather than after the 3 s max wait; a request
    whose images all fail to decode leaves nothing announced behind it."""
    fake = FakeBackend(fake_card(class_names=CLASSES))
    with fake_client(fake, max_wait_ms=3000, max_batch_size=8) as c:
        r = good_request(c)
        assert float(r.headers["x-queue-time-ms"]) < 1000, r.headers
        bad = c.post("/v1/classify", content=b"not an image", headers={"content-type": "image/png"})
        assert bad.status_code == 415
        assert c.app.state.service.arriving == 0
        assert float(good_request(c).headers["x-queue-time-ms"]) < 1000


def test_inference_workers_reach_the_batcher_and_fall_back_to_one_where_unsafe(caplog):
    fake = FakeBackend(fake_card(class_names=CLASSES), delay_s=0.01)
    with fake_client(fake, inference_workers=2) as c:
        assert c.get("/v1/info").json()["batching"]["workers"] == 2
        assert c.app.state.service.batcher.config.workers == 2
        good_request(c)

    class OneAtATime(FakeBackend):
        name = "tensorrt"  # an execution context must not be entered from two threads

    with caplog.at_level(logging.WARNING, "supmae.service"):
        with fake_client(OneAtATime(fake_card(class_names=CLASSES)), inference_workers=2) as c:
            assert c.get("/v1/info").json()["batching"]["workers"] == 1
            assert c.app.state.service.batcher.config.workers == 1
            good_request(c)
    assert "runs one batch at a time; using 1 worker" in caplog.text


def test_large_json_bodies_are_parsed_off_the_event_loop(monkeypatch):
    from supmae_serve.api import inputs

    threads = []
    parse = inputs._parse_json

    def recording(body, limits):
        threads.append(threading.current_thread().name)
        return parse(body, limits)

    monkeypatch.setattr(inputs, "_parse_json", recording)
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)))
    assert len(b64(big)) > inputs.PARSE_OFF_LOOP_BYTES
    with fake_client(FakeBackend(fake_card(class_names=CLASSES))) as c:
        assert c.post("/v1/classify", json={"images": [b64(PNG)]}).status_code == 200
        assert c.post("/v1/classify", json={"images": [b64(big)]}).status_code == 200
        r = c.post("/v1/classify", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
    assert not threads[0].startswith("supmae-decode")  # small: parsed in place, a thread hop costs more
    assert threads[1].startswith("supmae-decode") and threads[2].startswith("supmae-decode")


def test_queue_full_is_429_with_retry_after():
    fake = GatedBackend()
    with fake_client(fake, max_queue=2, max_images_per_request=2, max_batch_size=1, max_wait_ms=0) as c:
        out = {}

        def send(name, n):
            out[name] = c.post("/v1/embed", json={"images": [b64(PNG)] * n})

        first = threading.Thread(target=send, args=("first", 1))
        first.start()
        assert fake.entered.wait(10)  # the worker is busy with the first image
        second = threading.Thread(target=send, args=("second", 2))
        second.start()
        service = c.app.state.service
        for _ in range(400):
            if service.batcher.depth == 2:
                break
            threading.Event().wait(0.01)
        r = c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1 and "at most 2 images" in r.json()["error"]["message"]
        fake.gate.set()
        first.join(30)
        second.join(30)
        assert out["first"].status_code == 200 and out["second"].status_code == 200
        assert c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"}).status_code == 200


def test_request_timeout_is_504_and_the_server_recovers():
    fake = GatedBackend()
    with fake_client(fake, request_timeout_s=0.3, max_wait_ms=0) as c:
        r = c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 504 and "0.3 s" in r.json()["error"]["message"]
        fake.gate.set()
        assert c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"}).status_code == 200


def test_readiness_turns_false_when_the_batching_worker_dies(ckpt):
    with TestClient(create_app(settings(ckpt))) as c:
        assert c.get("/readyz").status_code == 200
        service = c.app.state.service

        async def kill():
            service.batcher._task.cancel()

        c.portal.call(kill)
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["batcher_alive"] is False and "cancelled" in r.json()["reason"]
        assert "supmae_ready 0.0" in c.get("/metrics").text
        r = c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.get("/healthz").status_code == 200  # alive, not ready: the orchestrator restarts it


def test_the_start_up_heap_is_frozen_before_ready(ckpt):
    import gc

    gc.unfreeze()  # (an earlier test's server may have frozen it already)
    app = create_app(settings(ckpt))
    assert gc.get_freeze_count() == 0
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 10_000  # torch, the app and the model: out of the collector's sight


def test_warmup_runs_before_ready(ckpt):
    with TestClient(create_app(settings(ckpt, warmup=True, max_batch_size=4))) as c:
        assert c.get("/readyz").json()["checks"]["warmed_up"] is True


# ---------------------------------------------------------------------------- security
def test_api_keys(ckpt):
    with TestClient(create_app(settings(ckpt, api_keys="key-one, key-two"))) as c:
        r = c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "missing_api_key"
        r = c.post(
            "/v1/embed", content=PNG, headers={"content-type": "image/png", "authorization": "Bearer nope"}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post(
            "/embed",
            content=PNG,
            headers={"content-type": "image/png", "authorization": "Basic a2V5LW9uZQ=="},
        )
        assert r.status_code == 401
        for key in ("key-one", "key-two"):
            auth = {"authorization": f"Bearer {key}"}
            assert (
                c.post("/v1/embed", content=PNG, headers={"content-type": "image/png", **auth}).status_code
                == 200
            )
            assert (
                c.post("/classify", content=PNG, headers={"content-type": "image/png", **auth}).status_code
                == 200
            )
        assert c.get("/v1/info").status_code == 401
        for public in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert c.get(public).status_code == 200, public
        spec = c.get("/openapi.json").json()  # the /docs "Authorize" button
        assert spec["components"]["securitySchemes"]["apiKey"] == {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key from SUPMAE_API_KEYS",
        }
        assert spec["paths"]["/v1/embed"]["post"]["security"] == [{"apiKey": []}]
        assert "security" not in spec["paths"]["/healthz"]["get"]
        info = c.get("/v1/info", headers={"authorization": "Bearer key-one"}).json()
        assert info["auth"] is True and "key-one" not in json.dumps(info)


def test_api_key_is_compared_with_every_key(ckpt, monkeypatch):
    """Issue 11: any() stopped at the first matching key, so the time taken told which key matched."""
    import hmac

    compared = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append(len(b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with TestClient(create_app(settings(ckpt, api_keys="first-key,second,the-third-key"))) as c:
        for token, status in (("first-key", 200), ("nope", 401), ("the-third-key", 200)):
            compared.clear()
            r = c.post(
                "/v1/embed",
                content=PNG,
                headers={"content-type": "image/png", "authorization": f"Bearer {token}"},
            )
            assert r.status_code == status
            assert len(compared) == 3 and len(set(compared)) == 1  # every key, digests of one length


def leaky_card():
    """A model card that records the trainer's absolute paths (as cards written before issue 14 do)."""
    card = fake_card(class_names=CLASSES)
    card.training = {
        "command": "supmae-train --data ../shared/data/c10 --out /home/alice/runs/c10 --set val_data=/mnt/nas/val",
        "config": {
            "data": "/mnt/nas/imagenet/train",
            "url": "https://example.com/data/x.tar",
            "rel": "data/x",
        },
        "data": [{"root": "C:\\Users\\alice\\data"}],
    }
    return card


def test_served_card_redacts_absolute_paths():
    """Issue 11: /v1/info showed the training command with the trainer's absolute output path."""
    with TestClient(create_app(settings(), backend=FakeBackend(leaky_card()))) as c:
        info = c.get("/v1/info").json()
    text = json.dumps(info)
    for secret in ("/home/alice", "/mnt/nas", "alice\\\\data", "Users"):
        assert secret not in text, secret
    training = info["model"]["training"]
    assert training["command"] == (
        "supmae-train --data ../shared/data/c10 --out [redacted]/c10 --set val_data=[redacted]/val"
    )
    assert training["config"] == {
        "data": "[redacted]/train",
        "url": "https://example.com/data/x.tar",
        "rel": "data/x",
    }


def test_cors(ckpt):
    with TestClient(create_app(settings(ckpt, cors_origins="https://app.example"))) as c:
        pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
        r = c.options("/v1/embed", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/v1/embed", headers={**pre, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = c.post(
            "/v1/embed", content=PNG, headers={"content-type": "image/png", "origin": "https://app.example"}
        )
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "server-timing" in r.headers["access-control-expose-headers"].lower()
    with TestClient(create_app(settings(ckpt))) as c:  # off by default
        r = c.post(
            "/v1/embed", content=PNG, headers={"content-type": "image/png", "origin": "https://app.example"}
        )
        assert "access-control-allow-origin" not in r.headers


@pytest.fixture
def image_server():
    """A local HTTP server (127.0.0.1) serving PNG at /img.png, a redirect at /go, 404 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/go":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            if self.path != "/img.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_inputs_are_refused_unless_enabled_and_private_addresses_blocked(ckpt, image_server):
    url = image_server + "/img.png"
    with TestClient(create_app(settings(ckpt))) as c:  # default: no fetching at all
        r = c.post("/v1/embed", json={"images": [url]})
        assert r.status_code == 422 and r.json()["data"][0]["error"]["code"] == "url_fetch_disabled"
    with TestClient(create_app(settings(ckpt, allow_url_fetch=True))) as c:  # on, but loopback is private
        r = c.post("/v1/embed", json={"images": [{"url": url}]})
        assert r.status_code == 422 and r.json()["data"][0]["error"]["code"] == "url_fetch_failed"
        r = c.post("/v1/embed", json={"images": ["http://169.254.169.254/latest/meta-data/"]})
        assert r.json()["data"][0]["error"]["code"] == "url_fetch_failed"
        r = c.post("/v1/embed", json={"images": [{"url": "file:///etc/passwd"}]})
        assert r.json()["data"][0]["error"]["code"] == "url_invalid"
        r = c.post("/v1/embed", json={"images": [{"url": "http://a:99999/x.png"}]})  # was a "corrupt image"
        assert r.json()["data"][0]["error"]["code"] == "url_invalid"
    with TestClient(create_app(settings(ckpt, allow_url_fetch=True, url_fetch_allow_private=True))) as c:
        direct = c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"}).json()["data"][0]
        for u in (url, image_server + "/go"):  # follows a redirect
            r = c.post("/v1/embed", json={"images": [u]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["data"][0]["embedding"], direct["embedding"], atol=1e-6)


def test_address_policy():
    from supmae_serve.api.fetch import address_allowed

    for private in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        # IPv4 inside IPv6 (issue 11): NAT64, 6to4 of 169.254.169.254, IPv4-compatible, Teredo
        "64:ff9b::7f00:1",
        "2002:a9fe:a9fe::",
        "::127.0.0.1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "224.0.0.1",
    ):
        assert not address_allowed(private, False), private
        assert address_allowed(private, True)
    for public in ("8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808"):
        assert address_allowed(public, False)


def _listener():
    """A loopback TCP socket that counts connections (it accepts, never answers)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    return sock


def test_blocked_addresses_are_never_connected_to_and_every_failure_reads_the_same(image_server):
    """Issue 11: the address was checked after connecting, so the error differed between open and closed
    ports (a port scanner); now the name is resolved and checked first, and every failure is one answer."""
    import socket

    from supmae_serve.api.fetch import FetchPolicy, fetch_url
    from supmae_serve.preprocess import ImageError

    listener = _listener()
    port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    errors = []
    for url in (f"http://127.0.0.1:{port}/", f"http://localhost:{closed_port}/", image_server + "/img.png"):
        with pytest.raises(ImageError) as e:
            fetch_url(url, FetchPolicy(timeout_s=2))
        errors.append((e.value.status, e.value.code, str(e.value)))
    with pytest.raises(OSError):
        listener.accept()  # nothing ever connected
    listener.close()
    assert len(set(errors)) == 1 and errors[0][:2] == (422, "url_fetch_failed"), errors
    # with private addresses allowed, a closed port, an error answer and no answer still read the same
    silent = _listener()  # accepts, never answers: the deadline ends it
    for url in (
        f"http://127.0.0.1:{closed_port}/",
        image_server + "/missing",
        f"http://127.0.0.1:{silent.getsockname()[1]}/",
    ):
        with pytest.raises(ImageError) as e:
            fetch_url(url, FetchPolicy(allow_private=True, timeout_s=0.5))
        assert (e.value.code, str(e.value)) == (errors[0][1], errors[0][2])
    silent.close()


class _Drip(http.server.BaseHTTPRequestHandler):
    """/body: headers at once, then one body byte every 0.2 s; /head: the header lines a byte at a time."""

    def do_GET(self):
        try:
            if self.path == "/head":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for c in b"X-Slow: " + b"x" * 1000:
                    self.wfile.write(bytes([c]))
                    self.wfile.flush()
                    threading.Event().wait(0.2)
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100000):
                self.wfile.write(b"x")
                self.wfile.flush()
                threading.Event().wait(0.2)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def drip_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["/body", "/head"])
def test_a_fetch_has_one_deadline_however_the_server_drips(drip_server, path):
    """Issue 11: the timeout bounded each socket read, so a byte every 2 s kept a fetch going for ever."""
    import time

    from supmae_serve.api.fetch import FetchPolicy, fetch_url
    from supmae_serve.preprocess import ImageError

    out = {}

    def fetch():
        t0 = time.monotonic()
        try:
            fetch_url(drip_server + path, FetchPolicy(allow_private=True, timeout_s=1.0))
        except ImageError as e:
            out["error"] = e.code
        out["s"] = time.monotonic() - t0

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(15)
    assert out.get("error") == "url_fetch_failed" and out["s"] < 3.0, out


@pytest.mark.timeout(60)
def test_slow_urls_never_hold_the_decoding_of_other_requests(ckpt, drip_server):
    """Issue 11: four clients pointing at a dripping server filled the decode threads and an ordinary
    request got no answer. Fetches now have their own pool and deadline; the ordinary request answers while
    the slow ones are still waiting for their URLs."""
    import time

    s = settings(
        ckpt, allow_url_fetch=True, url_fetch_allow_private=True, url_fetch_timeout_s=3.0, decode_threads=2
    )
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        good_request(c)  # warm
        done: dict[str, float] = {}
        t0 = time.monotonic()

        def slow(i):
            r = c.post("/v1/embed", json={"images": [drip_server + "/body"]})
            assert r.json()["data"][0]["error"]["code"] == "url_fetch_failed"
            done[f"slow{i}"] = time.monotonic() - t0

        threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the four fetches are dripping
        good_request(c)
        done["ordinary"] = time.monotonic() - t0
        for t in threads:
            t.join(20)
        assert len(done) == 5, done
        assert done["ordinary"] < min(v for k, v in done.items() if k.startswith("slow")), done
        assert max(done.values()) < 8, done  # every slow one ended at its deadline (3 s, waiting included)


def test_exif_orientation_is_applied_by_the_api(client):
    img = synthetic_image((40, 24), seed=9)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated_by_exif = encode(img, "PNG", exif=exif.tobytes())
    rotated_by_hand = encode(img.transpose(Image.Transpose.ROTATE_270), "PNG")
    a = client.post("/v1/embed", content=rotated_by_exif, headers={"content-type": "image/png"}).json()
    b = client.post("/v1/embed", content=rotated_by_hand, headers={"content-type": "image/png"}).json()
    unrotated = client.post("/v1/embed", content=encode(img), headers={"content-type": "image/png"}).json()
    np.testing.assert_allclose(a["data"][0]["embedding"], b["data"][0]["embedding"], atol=1e-6)
    assert not np.allclose(a["data"][0]["embedding"], unrotated["data"][0]["embedding"], atol=1e-3)


# ---------------------------------------------------------------------------- the demo mount
def test_demo_is_mounted_over_the_batched_backend(ckpt, monkeypatch):
    mounted = {}

    def mount_demo(app, backend, path="/demo", config=None):
        mounted["backend"], mounted["config"] = backend, config

        @app.get(path)
        def demo_page():
            return {"demo": True}

        return app

    monkeypatch.setitem(
        sys.modules, "app.demo", types.SimpleNamespace(mount_demo=mount_demo, DemoConfig=DemoConfig)
    )
    s = settings(ckpt, demo=True, max_pixels=12345, min_side=3)
    with TestClient(create_app(s)) as c:
        assert c.app.state.demo_mounted and c.get("/demo").json() == {"demo": True}
        assert mounted["config"].limits == s.image_limits()  # the page applies the server's limits
        assert mounted["config"].max_request_bytes == s.max_request_bytes
        backend = mounted["backend"]  # called from this (non-loop) thread, as Gradio's workers do
        x = to_tensor(decode_image(PNG), backend.card.preprocessing).unsqueeze(0).repeat(2, 1, 1, 1)
        assert backend.classify(x).probs.shape == (2, 10) and backend.classify(x).labels == CLASSES
        assert backend.embed(x, "patch").embedding.shape == (2, 64, 64)
        r = backend.reconstruct(x, 0.75, [1, 1])
        assert r.pasted.shape == (2, 3, 32, 32) and (r.mask[0] == r.mask[1]).all()
        assert backend.info().name == "torch"
        assert 'supmae_batches_total{outcome="ok",task="reconstruct"}' in c.get("/metrics").text


def test_demo_missing_gradio_only_warns(ckpt, monkeypatch, caplog):
    def no_gradio(app, backend, path="/demo", config=None):
        raise ModuleNotFoundError("No module named 'gradio'", name="gradio")

    monkeypatch.setitem(
        sys.modules, "app.demo", types.SimpleNamespace(mount_demo=no_gradio, DemoConfig=DemoConfig)
    )
    with caplog.at_level(logging.WARNING, logger="supmae.api"):
        app = create_app(settings(ckpt, demo=True))
    assert app.state.demo_mounted is False and "pip install 'supmae[demo]'" in caplog.text
    with TestClient(app) as c:
        good_request(c)
    monkeypatch.setitem(
        sys.modules, "app.demo", types.SimpleNamespace(mount_demo=lambda *a, **k: None, DemoConfig=DemoConfig)
    )
    with caplog.at_level(logging.WARNING, logger="supmae.api"):
        app = create_app(settings(ckpt, demo=True, api_keys="k"))
    assert app.state.demo_mounted is False and "cannot check them" in caplog.text
    with caplog.at_level(logging.INFO, logger="supmae.api"):
        app = create_app(settings(ckpt, demo=None, host="0.0.0.0"))  # the Docker image's address, no keys
    assert app.state.demo_mounted is False and "--demo mounts it" in caplog.text


def test_missing_model_is_a_clear_error(tmp_path):
    from supmae_serve.backends import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        create_app(settings(tmp_path / "nope"))


def test_fp16_checkpoint_serves(tmp_path):
    path = tmp_path / "fp16"
    save_checkpoint(tiny_model(), path, variant="micro_patch4_32", class_names=CLASSES, dtype=torch.float16)
    with TestClient(create_app(settings(path))) as c:
        good_request(c)


def test_a_client_leaving_mid_body_is_one_log_line(client, caplog):
    """Issue 11: every client error is a 4xx and one log line, a client gone mid-upload too."""

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    sent: list = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/embed",
        "raw_path": b"/v1/embed",
        "query_string": b"",
        "headers": [(b"content-type", b"image/png"), (b"content-length", b"5000")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "scheme": "http",
        "root_path": "",
        "http_version": "1.1",
    }
    with caplog.at_level(logging.INFO):
        client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 400
    assert "client went away" in caplog.text and "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
