"""The demo in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright against
the standalone demo app on loopback. `make browser-deps` installs chromium; Playwright's own browser
downloads are never used. The screenshot lands in test-artifacts/demo.png."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from supmae_serve.model import save_checkpoint
from tests.conftest import TINY, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("SUPMAE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)),
        reason=f"no Chromium at {CHROMIUM}: run `make browser-deps` as root (apt-get install chromium), "
        "or point SUPMAE_CHROMIUM at a Chromium binary",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install 'supmae[dev]'"
)
pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'supmae[demo]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_url(tmp_path):
    """The standalone demo app (what `python -m app` serves) under a real uvicorn server on 127.0.0.1,
    in a thread of this process (torch and gradio are imported already); yields the demo's URL."""
    from app.demo import create_demo_app
    from supmae_serve.backends import BackendConfig, create_backend

    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_model(), ckpt, variant=TINY, class_names=CLASSES)
    backend = create_backend(BackendConfig(model=ckpt, backend="torch", device="cpu"))
    backend.warmup()
    yield from _serve(create_demo_app(backend))


@pytest.fixture
def gallery_demo_url():
    """The demo of the bundled model with the shipped CIFAR-10 gallery (what `make serve` shows at /demo)."""
    pytest.importorskip("faiss", reason="the index needs faiss: pip install 'supmae[features]'")
    from app.demo import create_demo_app
    from supmae_serve.backends import BackendConfig, create_backend
    from supmae_serve.features.gallery import GALLERY_INDEX, load_served_index
    from supmae_serve.settings import DEFAULT_MODEL

    backend = create_backend(BackendConfig(model=DEFAULT_MODEL, backend="torch", device="cpu"))
    backend.warmup()
    index = load_served_index(GALLERY_INDEX, backend.card, DEFAULT_MODEL)
    yield from _serve(create_demo_app(backend, index=index))


def _serve(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="demo-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive():
                pytest.fail("the demo server stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                pytest.fail("the demo server did not start within 30 s")
            time.sleep(0.1)
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
        yield f"{base}/demo/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _picture() -> Image.Image:
    """A 40x40 test picture (sky gradient, a sun, grass) that reads well in the screenshot."""
    img = Image.new("RGB", (40, 40))
    draw = ImageDraw.Draw(img)
    for y in range(40):
        draw.line([(0, y), (39, y)], fill=(70 + 3 * y, 130 + 2 * y, 230))
    draw.ellipse([22, 5, 34, 17], fill=(250, 210, 40))
    draw.rectangle([0, 28, 39, 39], fill=(60, 150, 60))
    return img


@contextlib.contextmanager
def _chromium_page(url: str, height: int, failure_png: str):
    """A Chromium page 1280 px wide showing `url`; a failure inside the block saves a screenshot under
    ARTIFACTS as `failure_png` before it propagates."""
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        try:
            page.goto(url, timeout=30_000)
            yield page
        except Exception:
            page.screenshot(path=str(ARTIFACTS / failure_png), full_page=True)
            raise
        finally:
            browser.close()


@pytest.mark.timeout(120)
def test_demo_in_chromium_classifies_and_reconstructs_an_upload(demo_url, tmp_path):
    upload = tmp_path / "upload.png"
    _picture().save(upload)
    with _chromium_page(demo_url, 1100, "demo-failure.png") as page:
        page.locator("#explore-image input[type=file]").set_input_files(str(upload))

        # the top-5 classes appear as bars, named from the model card
        classes = page.locator("#top-classes")
        classes.get_by_text("%").first.wait_for(timeout=30_000)
        text = classes.inner_text()
        assert sum(name in text for name in CLASSES) >= 5, text

        # the four reconstruction views appear, upscaled 8x (32 px -> 256 px)
        for key in ("original", "masked", "reconstruction", "pasted"):
            img = page.locator(f"#view-{key} img")
            img.wait_for(timeout=30_000)
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle())
            assert img.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [256, 256]
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

        # an example goes through the same event as an upload, past the demo's file guard (app/guard.py)
        original = page.locator("#view-original img")
        before = original.get_attribute("src")
        page.locator(".gallery-item").first.click()
        page.wait_for_function(
            "([el, before]) => el.getAttribute('src') !== before && el.complete && el.naturalWidth > 0",
            arg=[original.element_handle(), before],
            timeout=30_000,
        )

        # a file that is not an image is refused by the upload route, and the page says why
        bad = tmp_path / "notes.png"
        bad.write_text("hello, not an image")
        page.locator("#explore-image input[type=file]").set_input_files(str(bad))
        page.get_by_text("not a recognised image format").first.wait_for(timeout=30_000)
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000


@pytest.mark.timeout(120)
def test_similar_images_tab_shows_the_neighbours_of_an_example(gallery_demo_url):
    """The Similar images tab over the shipped gallery: pick an example, see its neighbours with labels and
    cosine scores as thumbnails read from the gallery's image folder."""
    with _chromium_page(gallery_demo_url, 1000, "demo-similar-failure.png") as page:
        page.get_by_role("tab", name="Similar images").click()
        page.get_by_text("Index of 1,000 images").wait_for(timeout=30_000)
        upload = page.locator("#similar-image input[type=file]")
        upload.set_input_files(str(ROOT / "app" / "examples" / "cat.png"))
        thumbs = page.locator("#similar-gallery img")
        page.wait_for_function(
            "() => { const imgs = document.querySelectorAll('#similar-gallery img');"
            " return imgs.length >= 8 && [...imgs].every(i => i.complete && i.naturalWidth > 0); }",
            timeout=30_000,
        )
        assert thumbs.count() >= 8
        table = page.locator("#similar-table")
        text = table.inner_text()
        assert "rank" in text and "cosine" in text and sum(c in text for c in CLASSES) >= 1, text
        page.screenshot(path=str(ARTIFACTS / "demo-similar.png"), full_page=True)
    assert (ARTIFACTS / "demo-similar.png").stat().st_size > 10_000
