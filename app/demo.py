"""The Gradio demo, built over any serving Backend (torch, onnxruntime, tensorrt).

Three views of one model:
- Explore: upload or pick an example; the top-5 classes as bars, and the masked reconstruction
  (original / masked / reconstruction / reconstruction + visible) with a mask-ratio slider and a seed.
- Compare: the cosine similarity of two images' embeddings.
- Similar images (with an index, `app/similar.py`): the most similar indexed images, with labels and scores.
- Model card: what the checkpoint says about itself, and the backend serving it.

`DemoService` is the Python behind the page (plain inputs in, plain outputs out, bad input -> gr.Error),
so it is tested without a browser; `build_demo` lays the page out over it; `mount_demo` puts it at
/demo of a FastAPI app (the API server does this); `create_demo_app` is the standalone server that
`python -m app --checkpoint PATH` runs. gradio is imported only inside these functions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from supmae_serve.backends.base import Backend, class_labels, top_k
from supmae_serve.common.optional import install_hint
from supmae_serve.model.masking import num_visible
from supmae_serve.preprocess import (
    FORMATS_TEXT,
    ImageError,
    ImageLimits,
    batch,
    decode_image,
    resize_side,
    to_pil,
)
from supmae_serve.redact import redact_paths
from supmae_serve.settings import DEFAULT_MAX_PIXELS, Settings

from .guard import DemoGuard, UploadPolicy
from .similar import SimilarService, similar_tab

INSTALL_HINT = install_hint("gradio")
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SEED = 2**31 - 1

# Views are upscaled with nearest neighbour (one model pixel = a square of screen pixels) and the
# browser is told not to smooth them again.
CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%; }
"""


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:  # pragma: no cover - exercised by a test that hides gradio
        raise ImportError(f"the Gradio demo needs gradio: {INSTALL_HINT}") from e
    return gr


def _user_error(message: str) -> Exception:
    """The error Gradio shows to the user as a readable message (not a stack trace)."""
    return _gradio().Error(message, title="Cannot use this input", print_exception=False)


def whole_number(value: Any, low: int, high: int, name: str) -> int:
    """A widget's value as an int in [low, high]; a message naming `name` and the range otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not np.isfinite(v) or v != int(v) or not low <= v <= high:
        raise _user_error(f"{name} must be a whole number from {low} to {high}; got {value!r}")
    return int(v)


@dataclass(frozen=True)
class DemoConfig:
    top_k: int = 5
    display_size: int = 256  # reconstruction views are upscaled (nearest) to about this many pixels
    # per image, as the server's (supmae-serve passes its own)
    limits: ImageLimits = field(default_factory=lambda: ImageLimits(max_pixels=DEFAULT_MAX_PIXELS))
    concurrency: int = 2  # events computed at once (the CPU is shared with the REST API)
    max_request_bytes: int = 32 * 1024 * 1024  # one upload request (the server's --max-request-bytes)
    upload_ttl_s: int = 600  # uploads and outputs are deleted this long after they were written
    upload_quota_bytes: int = 256 * 1024 * 1024  # upload bytes accepted within upload_ttl_s

    def upload_policy(self) -> UploadPolicy:
        return UploadPolicy(
            limits=self.limits,
            max_request_bytes=self.max_request_bytes,
            ttl_s=self.upload_ttl_s,
            quota_bytes=self.upload_quota_bytes,
        )


class DemoService:
    """The callbacks behind the page. Inputs are what Gradio components give (a file path for an
    image, floats for sliders); images are decoded and validated by `supmae_serve.preprocess`."""

    def __init__(self, backend: Backend, config: DemoConfig | None = None):
        self.backend = backend
        self.card = backend.card
        self.config = config or DemoConfig()
        self.prep = self.card.preprocessing
        self.capabilities = dict(self.card.capabilities)
        self.num_patches = self.card.config.num_patches
        self.upscale = max(1, self.config.display_size // self.prep.image_size)

    # ------------------------------------------------------------------ input
    def load(self, image: str | os.PathLike | bytes | Image.Image | None) -> torch.Tensor:
        """A file path, encoded bytes or a PIL image -> normalised (1, 3, S, S); gr.Error if unusable."""
        if image is None:
            raise _user_error("No image: upload one or pick an example.")
        limits = self.config.limits
        try:
            if isinstance(image, Image.Image):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data = buf.getvalue()
            elif isinstance(image, bytes | bytearray):
                data = bytes(image)
            else:
                path = Path(image)
                if not path.is_file():
                    raise _user_error(f"The uploaded file is missing ({path.name}); upload it again.")
                size = path.stat().st_size
                if size > limits.max_bytes:
                    raise ImageError(
                        f"image is {size} bytes; the limit is {limits.max_bytes} bytes per image", 413
                    )
                data = path.read_bytes()
            img = decode_image(data, limits, resize_side(self.prep))
        except ImageError as e:
            raise _user_error(str(e)) from e
        return batch([img], self.prep)  # (1, 3, S, S)

    def _require(self, capability: str) -> None:
        if not self.capabilities.get(capability, False):
            raise _user_error(
                f"This model ({self.card.framework}) cannot {capability}; it can "
                + ", ".join(k for k, v in self.capabilities.items() if v)
                + "."
            )

    def _mask_ratio(self, mask_ratio: Any) -> float:
        try:
            r = float(mask_ratio)
            keep = num_visible(self.num_patches, r)  # the model's own rule: int(L * (1 - r))
        except (TypeError, ValueError):
            keep = 0
        if keep < 1:
            raise _user_error(
                f"mask ratio must be at least 0 and keep at least one of the {self.num_patches} patches "
                f"(at most {1 - 1 / self.num_patches:.4f}); got {mask_ratio!r}"
            )
        return r

    @staticmethod
    def _seed(seed: Any) -> int:
        return whole_number(seed, 0, MAX_SEED, "seed")

    # ------------------------------------------------------------------ the three views
    def classify(self, image) -> dict[str, float]:
        """The top-k classes as {label: probability}, what gr.Label draws as bars."""
        self._require("classify")
        x = self.load(image)  # (1, 3, S, S)
        out = self.backend.classify(x)
        return dict(top_k(out.probs, out.labels, self.config.top_k)[0])

    def reconstruct(self, image, mask_ratio: float, seed: int) -> tuple[Image.Image, ...]:
        """(original, masked, reconstruction, reconstruction + visible), upscaled for display."""
        self._require("reconstruct")
        ratio, s = self._mask_ratio(mask_ratio), self._seed(seed)
        x = self.load(image)  # (1, 3, S, S)
        out = self.backend.reconstruct(x, ratio, [s])
        views = [x] + [torch.from_numpy(np.asarray(a)) for a in (out.masked, out.reconstruction, out.pasted)]
        return tuple(to_pil(v, self.prep, upscale=self.upscale)[0] for v in views)

    def compare(self, image_a, image_b) -> tuple[float, str]:
        """Cosine similarity of the two images' mean-pooled embeddings, and a sentence about it."""
        if image_a is None or image_b is None:
            raise _user_error("Compare needs two images: fill both slots.")
        x = torch.cat([self.load(image_a), self.load(image_b)])  # (2, 3, S, S)
        emb = np.asarray(self.backend.embed(x, pooling="avg").embedding, dtype=np.float64)  # (2, D)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        cosine = float(np.clip(emb[0] @ emb[1], -1.0, 1.0))
        text = f"Cosine similarity of the mean-pooled encoder embeddings: **{cosine:.4f}**"
        if self.capabilities.get("classify"):
            out = self.backend.classify(x)
            (la, pa), (lb, pb) = (row[0] for row in top_k(out.probs, out.labels, 1))
            text += f"  \nTop class: A = {la} ({pa:.0%}), B = {lb} ({pb:.0%})"
        return round(cosine, 4), text

    # ------------------------------------------------------------------ page text
    def summary(self) -> str:
        card, info = self.card, self.backend.info()
        cfg = card.config
        can = ", ".join(k for k, v in self.capabilities.items() if v)
        lines = [
            f"**{card.variant or 'custom'}** ({card.framework}): ViT {cfg.embed_dim}-d x {cfg.depth} blocks, "
            f"patch {cfg.patch_size}, {self.prep.image_size}-px input ({self.num_patches} patches). "
            f"Served by {info.name} on {info.device} ({info.precision}); it can {can}."
        ]
        if self.capabilities.get("classify"):
            labels = class_labels(card)
            shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} classes)" if len(labels) > 12 else "")
            lines.append(f"Classes: {shown}.")
        return "  \n".join(lines)

    def card_json(self) -> dict:
        info = self.backend.info()
        return {
            "backend": {
                "name": info.name,
                "device": info.device,
                "precision": info.precision,
                "capabilities": info.capabilities,
                **info.extra,
            },
            "model_card": redact_paths(self.card.to_dict()),  # not the trainer's directory layout
        }


def example_images(examples_dir: str | os.PathLike | None = None) -> list[str]:
    """The example image files, sorted by name (the app's own CIFAR-10 samples by default)."""
    folder = Path(examples_dir) if examples_dir is not None else EXAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def example_pairs(files: list[str]) -> list[list[str]]:
    """Pairs for the Compare tab: `dog.png` with `dog_2.png` (same class), then two different classes."""
    by_stem = {Path(f).stem: f for f in files}
    pairs = [
        [by_stem[s.removesuffix("_2")], f]
        for s, f in by_stem.items()
        if s.endswith("_2") and s[:-2] in by_stem
    ]
    singles = [f for s, f in by_stem.items() if not s.endswith("_2")]
    if len(singles) >= 2:
        pairs.append(singles[:2])
    return pairs


def _guard_image_input(component) -> None:
    """Gradio opens an upload with PIL before our callback sees it; a file that is not an image would
    fail there with a bare exception. Turn that into the same readable error as ours."""
    gr = _gradio()
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError as e:
            raise _user_error(f"The upload is too large to decode: {e}") from e
        except Exception as e:  # noqa: BLE001 - any failure to open the upload is the user's input
            raise _user_error(f"The upload is not a recognised image (supported: {FORMATS_TEXT}).") from e

    component.preprocess = preprocess


def _image_input(label: str, elem_id: str, examples: Sequence[str] = (), examples_label: str = "Examples"):
    """An upload slot whose file reaches our callbacks untouched (supmae_serve.preprocess decodes it); with
    `examples`, the example images to pick from below it, all on one page."""
    gr = _gradio()
    component = gr.Image(
        type="filepath",
        image_mode=None,
        sources=["upload", "clipboard"],
        label=label,
        elem_id=elem_id,
        elem_classes=["pixelated"],
        height=260,
    )
    _guard_image_input(component)
    if examples:
        gr.Examples(
            [[f] for f in examples], inputs=[component], label=examples_label, examples_per_page=len(examples)
        )
    return component


def _explore_tab(gr, service: DemoService, examples: list[str]) -> None:
    """Upload or pick an image: its classes and its masked reconstruction, in one event."""
    can_classify = service.capabilities.get("classify", False)
    can_reconstruct = service.capabilities.get("reconstruct", False)
    ratio_default = float(getattr(service.card.config, "mask_ratio", 0.75) or 0.75)
    framework = service.card.framework

    def explore(image, ratio, seed):
        """A new image: classes and reconstruction in one event (so a bad upload shows one error)."""
        out = []
        if can_classify:
            out.append(None if image is None else service.classify(image))
        if can_reconstruct:
            out.extend((None,) * 4 if image is None else service.reconstruct(image, ratio, seed))
        return tuple(out)

    def explore_reconstruct(image, ratio, seed):
        return (None,) * 4 if image is None else service.reconstruct(image, ratio, seed)

    with gr.Tab("Explore", id="explore"):
        with gr.Row():
            with gr.Column(scale=1):
                image = _image_input(
                    "Image", "explore-image", examples, "Examples (CIFAR-10 training images)"
                )
            with gr.Column(scale=1):
                classes = gr.Label(
                    num_top_classes=service.config.top_k,
                    label=f"Top-{service.config.top_k} classes",
                    elem_id="top-classes",
                    visible=can_classify,
                )
                if not can_classify:
                    gr.Markdown(f"This model ({framework}) has no classification head.")
                ratio = gr.Slider(
                    0.0,
                    0.95,
                    value=ratio_default,
                    step=0.05,
                    label="Mask ratio (fraction of patches removed)",
                    elem_id="mask-ratio",
                    visible=can_reconstruct,
                )
                seed = gr.Number(
                    value=0,
                    precision=0,
                    minimum=0,
                    maximum=MAX_SEED,
                    label="Seed (which patches are removed)",
                    elem_id="mask-seed",
                    visible=can_reconstruct,
                )
                if not can_reconstruct:
                    gr.Markdown(f"This model ({framework}) has no decoder to reconstruct with.")
        with gr.Row(visible=can_reconstruct):
            views = [
                gr.Image(
                    label=name,
                    type="pil",
                    format="png",
                    interactive=False,
                    height=300,
                    buttons=["download"],
                    elem_id=f"view-{key}",
                    elem_classes=["pixelated"],
                )
                for key, name in (
                    ("original", "Original (model input)"),
                    ("masked", "Masked"),
                    ("reconstruction", "Reconstruction"),
                    ("pasted", "Reconstruction + visible"),
                )
            ]
        inputs = [image, ratio, seed]
        outputs = ([classes] if can_classify else []) + (views if can_reconstruct else [])
        if outputs:
            image.change(explore, inputs, outputs, api_name="explore")
        if can_reconstruct:
            ratio.release(explore_reconstruct, inputs, views, api_name=False)
            seed.submit(explore_reconstruct, inputs, views, api_name=False)


def _compare_tab(gr, service: DemoService, examples: list[str]) -> None:
    """The cosine similarity of two images' embeddings."""
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            image_a = _image_input("Image A", "compare-a")
            image_b = _image_input("Image B", "compare-b")
        pairs = example_pairs(examples)
        if pairs:
            gr.Examples(pairs, inputs=[image_a, image_b], label="Example pairs")
        run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        cosine = gr.Number(label="Cosine similarity", precision=4, elem_id="cosine")
        note = gr.Markdown()
        run.click(service.compare, [image_a, image_b], [cosine, note], api_name="compare")


def build_demo(
    backend: Backend,
    examples_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    index=None,
):
    """The demo page over `backend` -> gradio.Blocks (queued). Views the model cannot serve (no
    head: no classes; no decoder: no reconstruction) are hidden, with a note saying why. With `index`
    (a `supmae_serve.features.index.FeatureIndex` of this model) a "Similar images" tab searches it."""
    gr = _gradio()
    service = DemoService(backend, config)
    examples = example_images(examples_dir)
    similar = SimilarService(service, index) if index is not None else None

    # delete_cache: Gradio keeps every upload and output image in its cache folder; drop them
    # upload_ttl_s after they were written, checking every minute (the examples are kept)
    delete_cache = (60, service.config.upload_ttl_s)
    with gr.Blocks(title="SupMAE demo", analytics_enabled=False, delete_cache=delete_cache) as demo:
        # callables: evaluated on each page load, so a server that mounts the page before its backend
        # has loaded (supmae-serve) still shows the backend that serves it
        gr.Markdown(lambda: "# SupMAE demo\n" + service.summary())
        with gr.Tabs():
            _explore_tab(gr, service, examples)
            _compare_tab(gr, service, examples)
            if similar is not None:
                similar_tab(gr, similar, examples, _image_input)
            with gr.Tab("Model card", id="card"):
                gr.JSON(service.card_json, label="Model card and backend", elem_id="model-card")

    demo.queue(default_concurrency_limit=service.config.concurrency, max_size=64)
    demo.service = service  # the callbacks, for tests and for callers that want them
    demo.similar = similar
    return demo


def _theme():
    gr = _gradio()
    # Local fonts only: the default theme loads Google Fonts, which an offline machine cannot reach.
    return gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def mount_demo(
    fastapi_app,
    backend: Backend,
    path: str = "/demo",
    examples_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    index=None,
):
    """Mount the demo at `path` of a FastAPI app (the REST server calls this) and return the app.

    The page reads only files uploaded through it, only images within `config`'s limits (app/guard.py):
    Gradio's own check is switched on (it runs only once `has_launched` is set, which `launch()` does and
    mounting does not) and `DemoGuard` enforces the same at the HTTP boundary, whatever Gradio's defaults.
    Features the page does not use, some of which reach the network, are off."""
    gr = _gradio()
    config = config or DemoConfig()
    demo = build_demo(backend, examples_dir=examples_dir, config=config, index=index)
    gr.mount_gradio_app(
        fastapi_app,
        demo,
        path=path,
        theme=_theme(),
        css=CSS,
        ssr_mode=False,
        show_error=True,
        max_file_size=config.limits.max_bytes,
        footer_links=[],
        allowed_paths=[],
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
    )
    demo.has_launched = True
    fastapi_app.add_middleware(
        DemoGuard, prefix=path, policy=config.upload_policy(), upload_dir=gr.utils.get_upload_folder()
    )
    return fastapi_app


def create_demo_app(
    backend: Backend,
    path: str = "/demo",
    examples_dir: str | os.PathLike | None = None,
    config: DemoConfig | None = None,
    index=None,
):
    """The standalone server's app: the demo at `path`, `/` redirecting to it, `/healthz`; request bodies
    bounded in time and bytes in flight as `supmae-serve` bounds them (its default settings)."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    from supmae_serve.api.limits import ClientLimits

    config = config or DemoConfig()
    app = FastAPI(title="SupMAE demo", docs_url=None, redoc_url=None)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(url=path.rstrip("/") + "/")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    mount_demo(app, backend, path=path, examples_dir=examples_dir, config=config, index=index)
    defaults = Settings.model_fields
    app.add_middleware(
        ClientLimits,
        max_bytes_in_flight=max(defaults["max_bytes_in_flight"].default, config.max_request_bytes),
        max_request_bytes=config.max_request_bytes,
        body_timeout_s=defaults["body_timeout_s"].default,
    )
    return app


__all__ = [
    "CSS",
    "DemoConfig",
    "DemoService",
    "build_demo",
    "create_demo_app",
    "example_images",
    "example_pairs",
    "mount_demo",
]
