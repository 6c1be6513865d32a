"""The Gradio demo's callbacks and page, without a browser (tests/test_browser_demo.py drives one)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from supmae_serve.backends import BackendConfig, create_backend
from supmae_serve.model import save_checkpoint
from supmae_serve.preprocess import ImageLimits, batch, decode_image
from tests.conftest import TINY, encode, synthetic_image, tiny_model

gr = pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'supmae[demo]'")

from app.demo import (  # noqa: E402
    EXAMPLES_DIR,
    DemoConfig,
    DemoService,
    build_demo,
    create_demo_app,
    example_images,
    example_pairs,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_backend(path: Path):
    backend = create_backend(BackendConfig(model=path, backend="torch", device="cpu"))
    backend.warmup()
    return backend


def _checkpoint(root: Path, framework: str = "supmae") -> Path:
    path = root / framework
    save_checkpoint(
        tiny_model(framework), path, variant=TINY, class_names=None if framework == "mae" else CLASSES
    )
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo_ckpt")
    return {fw: _checkpoint(root, fw) for fw in ("supmae", "mae", "supervised")}


@pytest.fixture(scope="module")
def backend(checkpoints):
    return load_backend(checkpoints["supmae"])


@pytest.fixture(scope="module")
def service(backend) -> DemoService:
    return DemoService(backend)


@pytest.fixture
def image_path(tmp_path) -> Path:
    path = tmp_path / "upload.png"
    synthetic_image((48, 40), seed=3).save(path)
    return path


def _input(path: Path, service: DemoService) -> torch.Tensor:
    return batch([decode_image(path.read_bytes())], service.prep)


# ---------------------------------------------------------------------------- classify
def test_classify_returns_top5_labels_from_the_card_matching_the_backend(service, backend, image_path):
    out = service.classify(str(image_path))
    assert len(out) == 5
    assert set(out) <= set(CLASSES)
    probs = list(out.values())
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    direct = backend.classify(_input(image_path, service))
    best = np.argsort(-direct.probs[0])[:5]
    assert list(out) == [CLASSES[i] for i in best]
    np.testing.assert_allclose(probs, direct.probs[0][best], rtol=1e-5)


def test_classify_accepts_paths_bytes_and_pil_images_alike(service, image_path):
    by_path = service.classify(str(image_path))
    assert service.classify(image_path.read_bytes()) == pytest.approx(by_path)
    assert service.classify(Image.open(image_path)) == pytest.approx(by_path)


def test_shipped_examples_are_one_per_class_and_classify(service):
    files = example_images()
    assert {Path(f).stem.split("_")[0] for f in files} == set(CLASSES)
    assert all(Image.open(f).size == (32, 32) for f in files)
    assert len(service.classify(files[0])) == 5
    pairs = example_pairs(files)
    assert ["dog.png", "dog_2.png"] in [[Path(a).name, Path(b).name] for a, b in pairs]


# ---------------------------------------------------------------------------- reconstruct
def test_reconstruct_gives_four_upscaled_views_with_the_requested_mask(service, image_path):
    views = service.reconstruct(str(image_path), 0.75, 7)
    assert len(views) == 4
    assert all(v.size == (256, 256) and v.mode == "RGB" for v in views)  # 32 px x 8 (nearest)
    original, masked, _, pasted = (np.asarray(v)[::8, ::8].astype(int) for v in views)  # back to (32, 32, 3)
    # a removed patch shows the mean colour (zero in normalised space) over its whole 4x4 area
    mean = np.round(np.asarray(service.prep.mean) * 255)
    patches = masked.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 3)
    removed = np.all(np.abs(patches - mean) <= 1, axis=(1, 2))
    assert removed.sum() == 64 - int(64 * 0.25)  # 48 of 64 patches, as the model counts them
    # visible patches are the original pixels in the masked and pasted views
    orig_patches = original.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 3)
    pasted_patches = pasted.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 3)
    assert np.abs(patches[~removed] - orig_patches[~removed]).max() <= 1
    assert np.abs(pasted_patches[~removed] - orig_patches[~removed]).max() <= 1


def test_reconstruct_is_deterministic_per_seed(service, image_path):
    a = service.reconstruct(str(image_path), 0.5, 1)
    b = service.reconstruct(str(image_path), 0.5, 1)
    c = service.reconstruct(str(image_path), 0.5, 2)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))  # another seed, another mask


def test_display_upscale_follows_the_image_size(backend):
    assert DemoService(backend, DemoConfig(display_size=128)).upscale == 4
    assert DemoService(backend, DemoConfig(display_size=10)).upscale == 1


# ---------------------------------------------------------------------------- compare
def test_compare_same_image_is_one_and_different_images_less(service, image_path, tmp_path):
    same, text = service.compare(str(image_path), str(image_path))
    assert same == pytest.approx(1.0, abs=1e-4)
    assert "Top class" in text
    other = tmp_path / "other.png"
    Image.fromarray(np.full((32, 32, 3), (250, 10, 10), np.uint8)).save(other)
    cosine, _ = service.compare(str(image_path), str(other))
    assert -1.0 <= cosine < 0.999


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"this is not an image", "not a recognised image format"),
        (encode(synthetic_image((32, 32)), "PNG")[:200], "corrupt or truncated"),
        (encode(synthetic_image((1, 1)), "PNG"), "at least 8 pixels"),
    ],
    ids=["empty", "not-an-image", "truncated-png", "1x1"],
)
def test_bad_uploads_give_a_readable_gradio_error(service, tmp_path, data, message):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    for call in (
        lambda: service.classify(str(path)),
        lambda: service.reconstruct(str(path), 0.75, 0),
        lambda: service.compare(str(path), str(path)),
    ):
        with pytest.raises(gr.Error, match=message):
            call()


def test_missing_and_oversized_inputs_name_the_problem(backend, image_path, tmp_path):
    service = DemoService(backend, DemoConfig(limits=ImageLimits(max_bytes=100)))
    with pytest.raises(gr.Error, match="the limit is 100 bytes"):
        service.classify(str(image_path))
    with pytest.raises(gr.Error, match="No image"):
        service.classify(None)
    with pytest.raises(gr.Error, match="two images"):
        service.compare(str(image_path), None)
    with pytest.raises(gr.Error, match="missing"):
        service.classify(str(tmp_path / "gone.png"))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.99, float("nan"), "x", None])
def test_bad_mask_ratio_is_refused(service, image_path, ratio):
    with pytest.raises(gr.Error, match="mask ratio"):
        service.reconstruct(str(image_path), ratio, 0)


@pytest.mark.parametrize("seed", [-1, 2.5, 2**31, None, "abc"])
def test_bad_seed_is_refused(service, image_path, seed):
    with pytest.raises(gr.Error, match="seed must be a whole number"):
        service.reconstruct(str(image_path), 0.75, seed)


def test_a_non_image_upload_is_refused_before_the_callback(backend, tmp_path):
    from gradio.data_classes import FileData

    demo = build_demo(backend)
    image = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "explore-image")
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(gr.Error, match="not a recognised image"):
        image.preprocess(FileData(path=str(bad), orig_name="notes.png"))
    good = tmp_path / "ok.png"
    synthetic_image().save(good)
    assert image.preprocess(FileData(path=str(good), orig_name="ok.png")) == str(good)


# ---------------------------------------------------------------------------- capabilities and page
def _component(demo, elem_id):
    return next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == elem_id)


def test_page_shows_every_view_a_full_supmae_model_can_serve(backend):
    demo = build_demo(backend)
    assert isinstance(demo, gr.Blocks)
    assert _component(demo, "top-classes").visible
    assert _component(demo, "mask-ratio").visible
    assert _component(demo, "mask-ratio").value == pytest.approx(0.75)  # the card's mask ratio
    assert "Served by torch on cpu (fp32)" in demo.service.summary()
    assert demo.service.card_json()["model_card"]["class_names"] == CLASSES
    names = {d.api_name for d in demo.fns.values()}
    assert {"explore", "compare"} <= names
    examples = [c for c in demo.blocks.values() if isinstance(c, gr.Dataset)]
    assert examples and len(examples[0].samples) == len(example_images())


def test_the_card_tab_redacts_absolute_paths():
    from supmae_serve.backends.fake import FakeBackend

    from .test_api import leaky_card

    card = DemoService(FakeBackend(leaky_card())).card_json()["model_card"]
    assert "/home/alice" not in str(card) and "/mnt/nas" not in str(card)
    assert card["training"]["command"].endswith("--out [redacted]/c10 --set val_data=[redacted]/val")


def test_views_the_model_cannot_serve_are_hidden_and_refused(checkpoints):
    mae = build_demo(load_backend(checkpoints["mae"]))  # no classification head
    assert not _component(mae, "top-classes").visible
    assert _component(mae, "mask-ratio").visible
    with pytest.raises(gr.Error, match="cannot classify"):
        mae.service.classify(synthetic_image())
    cosine, text = mae.service.compare(synthetic_image(seed=1), synthetic_image(seed=2))
    assert "Top class" not in text

    supervised = build_demo(load_backend(checkpoints["supervised"]))  # no decoder
    assert _component(supervised, "top-classes").visible
    assert not _component(supervised, "mask-ratio").visible
    with pytest.raises(gr.Error, match="cannot reconstruct"):
        supervised.service.reconstruct(synthetic_image(), 0.75, 0)


def test_examples_dir_can_be_replaced_or_empty(backend, tmp_path):
    (tmp_path / "mine.png").write_bytes(encode(synthetic_image()))
    (tmp_path / "readme.txt").write_text("not an example")
    assert [Path(p).name for p in example_images(tmp_path)] == ["mine.png"]
    assert example_images(tmp_path / "nowhere") == []
    demo = build_demo(backend, examples_dir=tmp_path / "nowhere")
    assert not [c for c in demo.blocks.values() if isinstance(c, gr.Dataset)]
    assert EXAMPLES_DIR.is_dir()


def _call(client, api_name: str, data: list) -> tuple[str, str]:
    """Gradio's HTTP API: POST the inputs, then read the event stream -> (event, data)."""
    event_id = client.post(f"/demo/gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
    lines = client.get(f"/demo/gradio_api/call/{api_name}/{event_id}").text.strip().splitlines()
    return lines[-2].removeprefix("event: "), lines[-1].removeprefix("data: ")


def test_mounted_demo_serves_its_page_and_answers_over_the_gradio_api(backend, image_path, tmp_path):
    import json

    from fastapi.testclient import TestClient

    app = create_demo_app(backend)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/", follow_redirects=False).headers["location"] == "/demo/"
        page = client.get("/demo/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        config = client.get("/demo/config").json()
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"explore-image", "top-classes", "view-reconstruction", "compare-a", "cosine"} <= ids

        def upload(path: Path) -> dict:
            with open(path, "rb") as f:
                files = {"files": (path.name, f, "image/png")}
                (server_path,) = client.post("/demo/gradio_api/upload", files=files).json()
            return {"path": server_path, "meta": {"_type": "gradio.FileData"}}

        event, data = _call(client, "explore", [upload(image_path), 0.75, 0])
        assert event == "complete"
        label, *views = json.loads(data)
        assert len(label["confidences"]) == 5 and label["label"] in CLASSES
        assert len(views) == 4 and all(v["path"].endswith(".png") for v in views)

        bad = tmp_path / "bad.png"  # a PNG header the upload route accepts, truncated image data
        bad.write_bytes(encode(synthetic_image((32, 32)), "PNG")[:200])
        event, data = _call(client, "explore", [upload(bad), 0.75, 0])
        assert event == "error" and "corrupt or truncated" in data
        event, _ = _call(client, "explore", [upload(image_path), 0.5, 3])  # still answers after an error
        assert event == "complete"
        tiny = client.post(
            "/demo/gradio_api/upload", files={"files": ("t.png", encode(synthetic_image((1, 1))))}
        )
        assert tiny.status_code == 422 and "at least 8 pixels" in tiny.text  # refused before it is stored


def test_gradios_own_upload_check_is_on_in_a_mounted_demo(backend, tmp_path):
    """Defence in depth (issue 11): with the HTTP guard taken away, Gradio's own check still refuses a file
    that was not uploaded, because mount_demo sets the `has_launched` flag that check waits for."""
    from fastapi.testclient import TestClient

    from app.guard import DemoGuard

    app = create_demo_app(backend)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not DemoGuard]
    elsewhere = tmp_path / "elsewhere.png"
    synthetic_image((40, 40)).save(elsewhere)
    with TestClient(app) as client:
        event, data = _call(
            client, "explore", [{"path": str(elsewhere), "meta": {"_type": "gradio.FileData"}}, 0.75, 0]
        )
    assert event == "error", data


def test_upload_quota_and_limits_follow_the_config(backend):
    from fastapi.testclient import TestClient

    png = encode(synthetic_image((32, 32)))
    config = DemoConfig(upload_quota_bytes=len(png) * 3, max_request_bytes=len(png) + 10_000)
    with TestClient(create_demo_app(backend, config=config)) as client:
        for _ in range(2):
            assert client.post("/demo/gradio_api/upload", files={"files": ("a.png", png)}).status_code == 200
        r = client.post("/demo/gradio_api/upload", files={"files": ("a.png", png)})
        assert r.status_code == 429 and "upload_quota" in r.text and r.headers["retry-after"]
        big = client.post("/demo/gradio_api/upload", files={"files": ("b.png", png + b"\0" * 20_000)})
        assert big.status_code == 413 and "request_too_large" in big.text


def test_uploads_over_the_byte_limit_are_refused_by_the_page(backend):
    from fastapi.testclient import TestClient

    app = create_demo_app(backend, config=DemoConfig(limits=ImageLimits(max_bytes=2000)))
    with TestClient(app) as client:
        files = {"files": ("big.png", b"x" * 5000, "image/png")}
        r = client.post("/demo/gradio_api/upload", files=files)
        assert r.status_code == 413 and "2000 bytes" in r.text


def test_missing_gradio_names_the_extra(backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'supmae\[demo\]'"):
        build_demo(backend)


def test_cli_builds_the_demo_app_from_a_checkpoint(checkpoints, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    from app.__main__ import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["--checkpoint", str(checkpoints["supmae"]), "--device", "cpu", "--port", "7999"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 7999)
    assert served["limit_concurrency"] == 256 and served["http"].keywords == {"header_timeout_s": 10.0}
    with TestClient(served["app"]) as client:
        assert client.get("/demo/").status_code == 200


def test_cli_reports_an_unreadable_checkpoint(tmp_path, capsys):
    from app.__main__ import main

    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    (broken / "model.json").write_text("{")
    assert main(["--checkpoint", str(broken), "--device", "cpu"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
