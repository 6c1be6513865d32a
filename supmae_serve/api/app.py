"""The app factory: `create_app(settings)` wires settings -> service -> routes, middleware and the demo.

The model card is read here (cheap, and a missing model fails at once with a clear message); the weights
are loaded in the lifespan, off the event loop, and the batcher drains on shutdown. `app_from_env` is the
factory uvicorn workers import (`uvicorn --factory supmae_serve.api.app:app_from_env`).
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from supmae_serve import __version__
from supmae_serve.backends.base import Backend
from supmae_serve.backends.registry import check_model_path
from supmae_serve.common.optional import install_hint
from supmae_serve.model import load_model_card
from supmae_serve.settings import Settings

from .errors import install_error_handlers
from .limits import ClientLimits
from .metrics import MetricsMiddleware
from .routes import ApiKeys, aliases, health, v1
from .search import Search, open_index, search_alias, search_v1
from .service import InferenceService

log = logging.getLogger("supmae.api")

DESCRIPTION = """
Embeddings, classification and masked reconstruction from a SupMAE vision transformer.

Send images as multipart files (several per request), a raw `image/*` body, or JSON
`{"images": ["<base64 or data URI>", ...]}`; options go in the query string, form fields or JSON keys.
Each input gets one result, in order; an unusable image fails only its own item (with status, code, message).
"""


@asynccontextmanager
async def lifespan(app: FastAPI):
    service: InferenceService = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.stop()
        app.state.search.close()


def _card_path(model: Path) -> Path:
    return model / "model.json" if model.is_dir() else model


def mount_demo(app: FastAPI, service: InferenceService, index=None) -> bool:
    """Mount the Gradio demo at /demo over the batched backend; warn (never fail) when it cannot be."""
    if service.settings.api_keys:
        log.warning(
            "API keys are set and the Gradio demo cannot check them: not mounting /demo "
            "(run it separately with `python -m app`, or serve without --api-keys)"
        )
        return False
    try:
        from app.demo import DemoConfig
        from app.demo import mount_demo as _mount
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "gradio":
            log.warning("the demo needs gradio: %s (serving the API without /demo)", install_hint("gradio"))
        else:
            log.warning("the demo is not available (%s); serving the API without /demo", e)
        return False
    try:
        # the page enforces the server's image and request limits, not the demo's stand-alone defaults
        s = service.settings
        config = DemoConfig(limits=s.image_limits(), max_request_bytes=s.max_request_bytes)
        with_index = {"index": index} if index is not None else {}  # the Similar images tab
        _mount(app, service.facade(), path="/demo", config=config, **with_index)
    except ModuleNotFoundError as e:
        log.warning(
            "the demo needs gradio: %s (%s); serving the API without /demo", install_hint("gradio"), e
        )
        return False
    return True


def _telemetry_off_unless_configured() -> dict:
    """FastAPI's native OpenTelemetry asks the global providers on every request (a measurable share of a
    request's CPU time here); switch it off unless OpenTelemetry is configured through the environment."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    if any(k.startswith("OTEL_") for k in os.environ) or os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE"):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app. `backend` injects a ready backend (tests, embedding in another program); otherwise
    `settings` say which one to build."""
    settings = settings or Settings()
    if backend is None:
        check_model_path(settings.model)
        card = load_model_card(_card_path(Path(settings.model)))
    else:
        card = backend.card
    service = InferenceService(settings, card, backend)
    app = FastAPI(
        title="supmae-serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        **_telemetry_off_unless_configured(),
    )
    app.state.service = service
    app.state.search = Search(open_index(settings, card), settings, service.metrics)
    app.state.settings = settings
    app.state.api_keys = ApiKeys(settings.api_keys)
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(v1)
    app.include_router(aliases)
    app.include_router(search_v1)
    app.include_router(search_alias)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=[
                "Server-Timing",
                "X-Queue-Time-Ms",
                "X-Inference-Time-Ms",
                "X-Total-Time-Ms",
                "X-Request-ID",
            ],
        )
    if settings.demo is None and not settings.demo_on():
        log.info(
            "not mounting the demo: --host %s is not a loopback address (--demo mounts it)", settings.host
        )
    app.state.demo_mounted = mount_demo(app, service, app.state.search.index) if settings.demo_on() else False
    # the last added is the outermost: metrics count everything, the client limits act before any body is
    # read, then the demo's guard (added by mount_demo), CORS and the routes
    app.add_middleware(
        ClientLimits,
        max_bytes_in_flight=settings.max_bytes_in_flight,
        max_request_bytes=settings.max_request_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    if settings.api_keys:
        _declare_bearer_auth(app)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer scheme in the OpenAPI document (the /docs "Authorize" button) for the /v1 routes."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key from SUPMAE_API_KEYS",
            }
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for op in operations.values():
                        op["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def app_from_env() -> FastAPI:
    """Settings from the SUPMAE_* environment (what the CLI exports for worker processes)."""
    return create_app(Settings())
