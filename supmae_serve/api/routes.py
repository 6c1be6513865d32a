"""The routes: /v1/embed, /v1/classify, /v1/reconstruct, /v1/info (API key when configured) and the public
/healthz, /readyz, /metrics. `/embed`, `/classify` and `/reconstruct` are aliases of the /v1 routes.

Every inference route runs the same steps: parse the body (any of the three forms) -> validate options ->
decode each image on the thread pool -> send the good ones through the batcher -> one result per input, in
order, a failed image carrying its own status, code and message. The response status is 200 when at least one
image succeeded, otherwise the items' shared status (422 when they differ). `_run` does these steps; what
differs per route (its options, batch key and seed, how an item and the header render) is one `Route`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from supmae_serve import __version__
from supmae_serve.backends.base import CapabilityError, check_pooling
from supmae_serve.batching import BatcherClosedError, QueueFullError, RequestTimeout
from supmae_serve.preprocess import ImageError, to_pil
from supmae_serve.redact import redact_paths

from .errors import ApiError
from .inputs import parse_request, too_many_images
from .schemas import (
    ClassifyOptions,
    ClassifyResponse,
    EmbedOptions,
    EmbedResponse,
    ErrorResponse,
    ReconstructOptions,
    ReconstructResponse,
    openapi_extra,
)
from .service import InferenceService, Reconstructed


async def get_service(request: Request) -> InferenceService:
    return request.app.state.service


Service = Annotated[InferenceService, Depends(get_service)]


class ApiKeys:
    """The configured Bearer keys, checked in constant time: the SHA-256 of the given token is compared with
    that of every key, with no early exit, so timing tells neither which key matched nor how long keys are."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode("ascii")).digest() for k in keys]  # ASCII: settings check

    def __bool__(self) -> bool:
        return bool(self._digests)

    def valid(self, token: str) -> bool:
        given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        match = False
        for digest in self._digests:
            match |= hmac.compare_digest(given, digest)
        return match


async def require_api_key(request: Request) -> None:
    """Bearer API keys, when configured. One dependency without sub-dependencies: FastAPI resolves it on every
    request, and nested ones (HTTPBearer, the service) cost more than the check. The OpenAPI document declares
    the bearer scheme (`app.py`)."""
    keys: ApiKeys = request.app.state.api_keys
    if not keys:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing_api_key",
            "this server needs an API key: send 'Authorization: Bearer <key>'",
            challenge,
        )
    if not keys.valid(token.strip()):
        raise ApiError(401, "invalid_api_key", "the API key is not valid", challenge)


# ---------------------------------------------------------------------------- the shared pipeline
def _options(model: type[BaseModel], request: Request, body_options: dict[str, Any]) -> BaseModel:
    merged: dict[str, Any] = dict(request.query_params)
    merged.update(body_options)
    try:
        return model(**merged)
    except ValidationError as e:
        text = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors())
        raise ApiError(422, "invalid_option", f"invalid options: {text}") from e


def _error_item(index: int, e: ImageError) -> dict:
    return {"index": index, "error": {"status": e.status, "code": e.code, "message": str(e)}}


def _status(items: list[dict]) -> int:
    failed = [it["error"]["status"] for it in items if "error" in it]
    if len(failed) < len(items):
        return 200
    return failed[0] if len(set(failed)) == 1 else 422


@dataclass(frozen=True)
class Route:
    """One inference route: all `_run` needs to know beyond the steps every route shares.

    task:    the capability it needs, its label in the metrics, the first element of its batch keys
    options: its options model (the query string merged with the body's `options`)
    batch:   (service, options) -> (batch key, seed per image): images with equal keys share a model call;
             raises ApiError for options this model or these settings do not allow
    render:  (service, options, index, result, the image's input tensor) -> its item of the response's `data`
    header:  options -> the fields the response carries beside `data`
    """

    task: str
    options: type[BaseModel]
    batch: Callable[[InferenceService, Any], tuple[tuple, int | None]]
    render: Callable[[InferenceService, Any, int, Any, torch.Tensor], dict]
    header: Callable[[Any], dict] = lambda opts: {}


async def _run(request: Request, route: Route) -> Response:
    service: InferenceService = request.app.state.service  # (no Depends on the hot path)
    parsed = await parse_request(request, service.request_limits, service.run_blocking)
    opts = _options(route.options, request, parsed.options)
    if not parsed.items:
        raise ApiError(422, "no_images", "no images in the request")
    if len(parsed.items) > service.request_limits.max_images:
        raise too_many_images(len(parsed.items), service.request_limits)
    try:
        service.require(route.task)
    except CapabilityError as e:
        raise ApiError(422, "capability_unavailable", str(e)) from e
    key, seed = route.batch(service, opts)
    timeout_s = service.settings.request_timeout_s  # one deadline: fetching, decoding, queue and inference
    deadline = asyncio.get_running_loop().time() + timeout_s
    arrival = service.arrival(len(parsed.items))  # the batcher waits for these while they decode
    try:
        with service_errors(timeout_s):
            service.check_capacity(len(parsed.items))  # before spending CPU on decoding
            prepared = await asyncio.wait_for(service.prepare(parsed.items), timeout_s)
            good = [(i, x) for i, x in enumerate(prepared) if isinstance(x, torch.Tensor)]
            remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
            payloads = [(x, seed) for _, x in good]
            arrival.done()  # and queued in the same step: submit runs before the next await
            results = await service.infer(key, payloads, remaining) if good else []
    finally:
        arrival.done()

    items: list = [_error_item(i, x) if isinstance(x, ImageError) else None for i, x in enumerate(prepared)]
    service.metrics.images.labels(route.task, "ok").inc(len(good))
    service.metrics.images.labels(route.task, "error").inc(len(prepared) - len(good))
    headers = _timing_headers(request, results)

    def body() -> bytes:  # rendering and JSON encoding: CPU work for a thread, not the event loop
        for (i, x), r in zip(good, results, strict=True):
            items[i] = route.render(service, opts, i, r.value, x)
        return _json(
            {
                "object": "list",
                "model": service.card.variant or service.card.framework,
                **route.header(opts),
                "data": items,
                "usage": {"images": len(items), "succeeded": len(good), "failed": len(items) - len(good)},
            }
        )

    content = await service.run_blocking(body)
    return Response(content, _status(items), headers=headers, media_type="application/json")


@contextlib.contextmanager
def service_errors(timeout_s: float) -> Iterator[None]:
    """The batcher's and the backend's refusals, raised inside the block, as the API's errors."""
    try:
        yield
    except QueueFullError as e:
        raise ApiError(429, "queue_full", str(e), {"Retry-After": str(e.retry_after_s)}) from e
    except BatcherClosedError as e:
        raise ApiError(503, "unavailable", f"not accepting work: {e}", {"Retry-After": "5"}) from e
    except (RequestTimeout, asyncio.TimeoutError) as e:
        raise ApiError(504, "timeout", f"no result within the request timeout of {timeout_s:g} s") from e
    except CapabilityError as e:
        raise ApiError(422, "capability_unavailable", str(e)) from e


def _timing_headers(request: Request, results: list) -> dict[str, str]:
    """The batch's queue and inference times and size, as headers and for the access log."""
    if not results:
        return {}
    queue_ms = max(r.queue_s for r in results) * 1000
    inference_ms = max(r.inference_s for r in results) * 1000
    request.state.queue_ms, request.state.inference_ms = queue_ms, inference_ms
    return {
        "X-Queue-Time-Ms": f"{queue_ms:.2f}",
        "X-Inference-Time-Ms": f"{inference_ms:.2f}",
        "X-Batch-Size": str(max(r.batch_size for r in results)),
    }


def _json(body: dict) -> bytes:
    """`body` as JSONResponse would encode it, one `data` item per json.dumps call: a call holds the GIL for
    its whole run, so one call over a 15 MB body (64 images' patch tokens) would stall the event loop for as
    long; between items the loop's thread gets its turn."""

    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    fields = [
        f"{dumps(k)}:[{','.join(map(dumps, v))}]" if k == "data" else f"{dumps(k)}:{dumps(v)}"
        for k, v in body.items()
    ]
    return ("{" + ",".join(fields) + "}").encode()


# ---------------------------------------------------------------------------- the routes' tasks
def _embed_batch(service: InferenceService, o: EmbedOptions) -> tuple[tuple, None]:
    check_pooling(o.pooling)
    return ("embed", o.pooling), None


def _render_embedding(
    service: InferenceService, opts: EmbedOptions, index: int, value: np.ndarray, _x
) -> dict:
    v = np.asarray(value, dtype=np.float32)
    if opts.normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    if opts.encoding_format == "base64":
        emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    else:
        emb = v.tolist()
    return {"index": index, "object": "embedding", "embedding": emb, "shape": list(v.shape)}


def _render_classification(
    service: InferenceService, o: ClassifyOptions, index: int, probs: np.ndarray, _x
) -> dict:
    k = min(o.top_k, probs.shape[0])
    best = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[0] else np.arange(k)
    best = best[np.argsort(-probs[best], kind="stable")]  # the k best, best first
    labels = service.labels
    preds = [{"label": labels[j], "class_index": int(j), "score": float(probs[j])} for j in best]
    return {"index": index, "object": "classification", "predictions": preds}


def _mask_ratio(service: InferenceService, o: ReconstructOptions) -> float:
    return service.card.config.mask_ratio if o.mask_ratio is None else o.mask_ratio


def _reconstruct_batch(service: InferenceService, o: ReconstructOptions) -> tuple[tuple, int]:
    cfg, ratio = service.card.config, _mask_ratio(service, o)
    if o.upscale > service.settings.max_upscale:
        raise ApiError(
            422, "invalid_option", f"upscale is {o.upscale}; the limit is {service.settings.max_upscale}"
        )
    if int(cfg.num_patches * (1 - ratio)) < 1:
        raise ApiError(
            422, "invalid_option", f"mask_ratio {ratio} leaves no visible patch of {cfg.num_patches}"
        )
    return ("reconstruct", float(ratio)), o.seed


def _render_reconstruction(
    service: InferenceService, o: ReconstructOptions, index: int, r: Reconstructed, x: torch.Tensor
) -> dict:
    mask = np.asarray(r.mask).round().astype(int)
    grid = service.card.config.grid
    return {
        "index": index,
        "object": "reconstruction",
        "mask_ratio": _mask_ratio(service, o),
        "seed": o.seed,
        "grid": [grid, grid],
        "visible_patches": int((mask == 0).sum()),
        "mask": mask.tolist(),
        "media_type": "image/png",
        "images": {
            "original": _png(x.float().cpu(), service, o.upscale),
            "masked": _png(r.masked, service, o.upscale),
            "reconstruction": _png(r.reconstruction, service, o.upscale),
            "reconstruction_visible": _png(r.pasted, service, o.upscale),
        },
    }


def _png(x: np.ndarray | torch.Tensor, service: InferenceService, upscale: int) -> str:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)).unsqueeze(0)  # (1, 3, S, S)
    img = to_pil(t, service.card.preprocessing, upscale=upscale)[0]
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


EMBED = Route(
    "embed",
    EmbedOptions,
    _embed_batch,
    _render_embedding,
    header=lambda o: {"pooling": o.pooling, "normalized": o.normalize, "encoding_format": o.encoding_format},
)
CLASSIFY = Route(
    "classify", ClassifyOptions, lambda service, o: (("classify",), None), _render_classification
)
RECONSTRUCT = Route("reconstruct", ReconstructOptions, _reconstruct_batch, _render_reconstruction)


# ---------------------------------------------------------------------------- routers
health = APIRouter(tags=["health"])
v1 = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(require_api_key)])
aliases = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)

ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    413: {"model": ErrorResponse, "description": "request or image over a size limit"},
    415: {"model": ErrorResponse, "description": "unsupported content type or image format"},
    422: {"model": ErrorResponse, "description": "invalid options, or every image unusable"},
    429: {"model": ErrorResponse, "description": "queue full: retry after Retry-After seconds"},
    503: {"model": ErrorResponse, "description": "not ready or shutting down"},
    504: {"model": ErrorResponse, "description": "request timeout"},
}


async def embed(request: Request) -> Response:
    """Embeddings of one or more images: the mean patch token (avg), the cls token, or every patch token."""
    return await _run(request, EMBED)


async def classify(request: Request) -> Response:
    """The top-k classes of each image, with softmax probabilities and the model card's class names."""
    return await _run(request, CLASSIFY)


async def reconstruct(request: Request) -> Response:
    """Masked reconstruction: which patches were hidden (seeded), and the decoder's prediction as PNGs."""
    return await _run(request, RECONSTRUCT)


_POST_ROUTES = (  # path, handler, summary, response model, options model
    ("/embed", embed, "Image embeddings", EmbedResponse, EmbedOptions),
    ("/classify", classify, "Top-k classification", ClassifyResponse, ClassifyOptions),
    (
        "/reconstruct",
        reconstruct,
        "Masked reconstruction (PNG images)",
        ReconstructResponse,
        ReconstructOptions,
    ),
)
for _router in (v1, aliases):
    for _path, _handler, _summary, _response, _options_model in _POST_ROUTES:
        _router.add_api_route(
            _path,
            _handler,
            methods=["POST"],
            summary=_summary,
            responses={200: {"model": _response}, **ERRORS},
            openapi_extra=openapi_extra(_options_model),
        )


@v1.get("/info", summary="Model card, backend, limits and batching")
async def info(request: Request, service: Service) -> dict:
    s = service.settings
    backend = asdict(service.backend_info) if service.backend_info else None
    return {
        "version": __version__,
        "model": redact_paths(service.card.to_dict()),  # not the trainer's directory layout
        "backend": backend,
        "device": backend["device"] if backend else None,
        "precision": backend["precision"] if backend else None,
        "selection": service.selection,  # backend, precision, why, CPU features, agreement, graph cache
        "capabilities": service.capabilities,
        "limits": {
            "max_request_bytes": s.max_request_bytes,
            "max_image_bytes": s.max_image_bytes,
            "max_images_per_request": s.max_images_per_request,
            "max_pixels": s.max_pixels,
            "min_side": s.min_side,
            "max_upscale": s.max_upscale,
            "request_timeout_s": s.request_timeout_s,
        },
        "batching": asdict(service.batch_config) | {"enabled": s.batching},
        "url_fetch": s.allow_url_fetch,
        "auth": bool(s.api_keys),
        "index": request.app.state.search.describe(),  # /v1/search (api/search.py)
    }


@health.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@health.get("/readyz", summary="Readiness: model loaded, warmed up, batching worker alive")
async def readyz(service: Service) -> JSONResponse:
    r = service.readiness()
    return JSONResponse(r, 200 if r["ready"] else 503)


@health.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: Service) -> Response:
    if service.batcher is not None:
        service.metrics.queue_depth.set(service.batcher.depth)
    service.readiness()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
