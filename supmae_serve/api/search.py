"""`POST /v1/search` (and `/search`): the indexed images most similar to query images or vectors.

The index (`--index`, built by `supmae-embed index`) is loaded with the app and checked against the served
model (`supmae_serve.features.gallery.load_served_index`): an index made by another model stops the server
from starting, with what differs. `--index auto` (the default) loads the shipped CIFAR-10 gallery for the
bundled model and nothing for any other model.

Queries, one result per query, in order:
- images, in every form /v1/embed takes (multipart files, an image/* body, JSON `{"images": [...]}`): decoded
  on the decode threads, embedded through the batcher with the index's pooling and searched; an unusable image
  fails its own item, as on the other routes;
- JSON `{"vectors": [[...], ...]}`: embeddings of the index's dimension, any scale (they are L2-normalised);
  a vector of another dimension, a non-finite value or an all-zero vector -> 422 saying what is expected.
Options (query string, form fields or JSON keys): `top_k`, 1 to `--max-top-k`.

FAISS runs on its own small thread pool (`--search-threads`, one OpenMP thread each), never on the event
loop; the time of each search call is in `/metrics` as `supmae_search_seconds{query="image"|"vector"}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import Histogram
from pydantic import BaseModel, Field

from supmae_serve.features.gallery import INDEX_CHOICES, load_served_index, resolve_index_spec
from supmae_serve.model import ModelCard
from supmae_serve.preprocess import ImageError
from supmae_serve.redact import redact_paths
from supmae_serve.settings import Settings

from .errors import ApiError
from .inputs import (
    PARSE_OFF_LOOP_BYTES,
    images_from_json,
    load_json,
    parse_request,
    read_body,
    too_many_images,
)
from .metrics import LATENCY_BUCKETS, ServiceMetrics
from .routes import (
    ERRORS,
    _error_item,
    _json,
    _options,
    _status,
    require_api_key,
    service_errors,
)
from .schemas import ErrorResponse
from .service import InferenceService

log = logging.getLogger("supmae.api")


DEFAULT_TOP_K = 10
INLINE_JSON_NEIGHBOURS = 1000  # responses up to this many neighbours (~100 KB) are encoded on the event loop


class SearchIndexError(RuntimeError):
    """`--index` names an index this server cannot serve (missing, unreadable, another model's, no faiss)."""


class SearchOptions(BaseModel):
    model_config = {"extra": "forbid"}
    top_k: int | None = Field(
        None,
        ge=1,
        description=f"neighbours per query, most similar first, at most --max-top-k (default: {DEFAULT_TOP_K}, "
        "or the limit when it is lower)",
    )


def open_index(settings: Settings, card: ModelCard):
    """The FeatureIndex `--index` names for this model, or None. An explicit index that cannot be served
    raises SearchIndexError; `auto` falls back to no index (with a warning) instead."""
    path = resolve_index_spec(settings.index, settings.model)
    if path is None:
        return None
    auto = settings.index.strip().lower() == "auto"
    try:
        index = load_served_index(path, card, settings.model, settings.export_dir)
    except Exception as e:  # noqa: BLE001 - any reason is reported with the flag that caused it
        if auto:
            log.warning("not loading the shipped gallery for /v1/search: %s", e)
            return None
        raise SearchIndexError(f"cannot serve --index {path}: {e}") from e
    log.info("index %s: %d vectors (%s), /v1/search enabled", path, len(index), index.kind)
    return index


def _one_omp_thread() -> None:
    """Each search thread runs FAISS on one OpenMP thread (the setting is per calling thread): requests are
    one or a few queries, which FAISS's OpenMP threads slow down on a busy CPU rather than speed up;
    concurrent requests run in parallel on the pool's threads instead (--search-threads)."""
    from supmae_serve.features.index import import_faiss

    import_faiss().omp_set_num_threads(1)


class Search:
    """The loaded index (or None), its thread pool, the top_k limit and the search-time histogram."""

    def __init__(self, index, settings: Settings, metrics: ServiceMetrics):
        self.index = index
        self.max_top_k = settings.max_top_k
        self.max_queries = settings.max_images_per_request
        self.pool = (
            ThreadPoolExecutor(
                settings.search_threads, thread_name_prefix="supmae-search", initializer=_one_omp_thread
            )
            if index is not None
            else None
        )
        self.seconds = Histogram(
            "supmae_search_seconds",
            "FAISS search time per request",
            ["query"],
            buckets=LATENCY_BUCKETS,
            registry=metrics.registry,
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any] | None:
        if self.index is None:
            return None
        # the index's folder as the model card's paths are shown: no absolute path of this machine
        return redact_paths({**self.index.describe(), "max_top_k": self.max_top_k})

    def require_index(self):
        if self.index is None:
            raise ApiError(
                404,
                "no_index",
                "this server has no index to search: start it with --index DIR (a folder built by "
                "`supmae-embed index` from embeddings of this model), or serve the bundled model with "
                f"--index auto for the shipped CIFAR-10 gallery (--index takes {INDEX_CHOICES})",
            )
        return self.index

    def vectors(self, value: Any) -> np.ndarray:
        """JSON `vectors` -> (Q, D) float32, or ApiError 422 saying what is expected."""
        dim = self.index.dim
        expected = f"a list of vectors, each a list of {dim} finite numbers (this index's dimension)"
        if not isinstance(value, list) or not value:
            raise ApiError(422, "invalid_vector", f"vectors must be {expected}")
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            raise ApiError(
                422,
                "invalid_vector",
                f"vectors must be {expected}: wrap a single vector in brackets, [[...]]",
            )
        if len(value) > self.max_queries:
            raise ApiError(
                413,
                "too_many_queries",
                f"request has {len(value)} vectors; the limit is {self.max_queries} queries per request",
            )
        for i, v in enumerate(value):
            if not isinstance(v, list) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in v
            ):
                raise ApiError(
                    422, "invalid_vector", f"vectors[{i}] is not a list of numbers; send {expected}"
                )
            if len(v) != dim:
                raise ApiError(
                    422,
                    "invalid_vector",
                    f"vectors[{i}] has {len(v)} values; this index holds {dim}-dimensional embeddings, so "
                    f"each vector needs {dim}",
                )
        try:
            with np.errstate(over="ignore"):
                q = np.array(value, dtype=np.float64).astype(np.float32)
        except (OverflowError, ValueError, TypeError):
            q = np.full((len(value), dim), np.inf, np.float32)  # an integer too large for a float
        for i, row in enumerate(q):
            if not np.isfinite(row).all():
                raise ApiError(
                    422,
                    "invalid_vector",
                    f"vectors[{i}] has a NaN, an infinite value or a number beyond float32; every value "
                    "must be finite",
                )
            if not row.any():
                raise ApiError(
                    422, "invalid_vector", f"vectors[{i}] is all zeros: it has no direction to compare"
                )
        return q

    async def run(self, q: np.ndarray, top_k: int, query: str) -> tuple[list[list[dict]], float]:
        """Search on the pool: (neighbours per query, seconds of the FAISS call)."""
        index = self.index

        def call():
            t0 = time.perf_counter()
            scores, pos = index.search_arrays(q, top_k)
            seconds = time.perf_counter() - t0
            ids, labels, sources = index.ids, index.labels, index.sources
            found = [
                [
                    {"id": ids[p], "label": labels[p], "score": float(s), "source": sources[p]}
                    for s, p in zip(srow, prow, strict=True)
                    if p >= 0
                ]
                for srow, prow in zip(scores, pos, strict=True)
            ]
            return found, seconds

        found, seconds = await asyncio.get_running_loop().run_in_executor(self.pool, call)
        self.seconds.labels(query).observe(seconds)
        return found, seconds


# ---------------------------------------------------------------------------- the route
def _parse_json(body: bytes, limits) -> tuple[list | None, Any, dict]:
    doc = load_json(body)
    if isinstance(doc, dict) and "vectors" in doc:
        if "images" in doc or "image" in doc:
            raise ApiError(422, "invalid_request", "give either images or vectors in one request, not both")
        vectors = doc.pop("vectors")
        return vectors, None, doc
    parsed = images_from_json(doc, limits)
    return None, parsed.items, parsed.options


async def _parse(request: Request, service: InferenceService) -> tuple[list | None, Any, dict]:
    """(vectors or None, image items or None, options) from any accepted body; large JSON bodies are parsed
    on the service's decode pool, as on the image routes (inputs.PARSE_OFF_LOOP_BYTES)."""
    limits = service.request_limits
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        body = await read_body(request, limits.max_request_bytes)
        if len(body) > PARSE_OFF_LOOP_BYTES:
            return await service.run_blocking(_parse_json, body, limits)
        return _parse_json(body, limits)
    parsed = await parse_request(request, limits, service.run_blocking)
    return None, parsed.items, parsed.options


async def _embed(request: Request, service: InferenceService, items: list, pooling: str):
    """Decode and embed the query images -> (prepared items, [(item index, embedding)], timing headers)."""
    if not items:
        raise ApiError(422, "no_images", "no images or vectors in the request")
    if len(items) > service.request_limits.max_images:
        raise too_many_images(len(items), service.request_limits)
    timeout_s = service.settings.request_timeout_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with service_errors(timeout_s):
        service.require("embed")
        service.check_capacity(len(items))
        prepared = await asyncio.wait_for(service.prepare(items), timeout_s)
        good = [(i, x) for i, x in enumerate(prepared) if isinstance(x, torch.Tensor)]
        remaining = max(deadline - loop.time(), 0.001)
        payloads = [(x, None) for _, x in good]
        results = await service.infer(("embed", pooling), payloads, remaining) if good else []
    service.metrics.images.labels("search", "ok").inc(len(good))
    service.metrics.images.labels("search", "error").inc(len(prepared) - len(good))
    headers = {}
    if results:
        queue_ms = max(r.queue_s for r in results) * 1000
        inference_ms = max(r.inference_s for r in results) * 1000
        request.state.queue_ms, request.state.inference_ms = queue_ms, inference_ms
        headers = {"X-Queue-Time-Ms": f"{queue_ms:.2f}", "X-Inference-Time-Ms": f"{inference_ms:.2f}"}
    embedded = [(i, np.asarray(r.value, dtype=np.float32)) for (i, _), r in zip(good, results, strict=True)]
    return prepared, embedded, headers


async def search(request: Request) -> Response:
    """The top_k most similar indexed images (id, label, cosine score, source) for each query image or vector."""
    service: InferenceService = request.app.state.service
    state: Search = request.app.state.search
    index = state.require_index()
    vectors, items, options = await _parse(request, service)
    top_k = _options(SearchOptions, request, options).top_k or min(DEFAULT_TOP_K, state.max_top_k)
    if top_k > state.max_top_k:
        raise ApiError(
            422,
            "invalid_option",
            f"top_k is {top_k}; the limit on this server is {state.max_top_k} (--max-top-k)",
        )
    headers: dict[str, str] = {}
    if vectors is not None:
        q = state.vectors(vectors)
        found, seconds = await state.run(q, top_k, "vector")
        data = [{"index": i, "object": "neighbors", "neighbors": f} for i, f in enumerate(found)]
        query = "vector"
    else:
        prepared, embedded, headers = await _embed(request, service, items, index.identity.pooling)
        data = [_error_item(i, x) if isinstance(x, ImageError) else None for i, x in enumerate(prepared)]
        seconds = 0.0
        if embedded:
            found, seconds = await state.run(np.stack([e for _, e in embedded]), top_k, "image")
            for (i, _), f in zip(embedded, found, strict=True):
                data[i] = {"index": i, "object": "neighbors", "neighbors": f}
        query = "image"
    headers["X-Search-Time-Ms"] = f"{seconds * 1000:.3f}"
    failed = sum("error" in d for d in data)
    body = {
        "object": "list",
        "model": service.card.variant or service.card.framework,
        "query": query,
        "top_k": top_k,
        "index": {"count": len(index), "kind": index.kind, "pooling": index.identity.pooling},
        "data": data,
        "usage": {"queries": len(data), "succeeded": len(data) - failed, "failed": failed},
    }
    if sum(len(d.get("neighbors", ())) for d in data) <= INLINE_JSON_NEIGHBOURS:
        content = _json(body)  # a few KB: cheaper here than a hop to a thread
    else:
        content = await service.run_blocking(_json, body)
    return Response(content, _status(data), headers=headers, media_type="application/json")


def _openapi() -> dict:
    binary = {"type": "string", "format": "binary"}
    vector = {"type": "array", "items": {"type": "number"}}
    top_k = SearchOptions.model_json_schema()["properties"]["top_k"]
    return {
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": top_k}],
        "requestBody": {
            "required": True,
            "description": "query images (as /v1/embed takes them) or JSON vectors of the index's dimension",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "vectors": {"type": "array", "items": vector},
                            "images": {"type": "array", "items": {"type": "string"}},
                            "top_k": top_k,
                        },
                    }
                },
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"files": {"type": "array", "items": binary}}}
                },
                "image/*": {"schema": binary},
            },
        },
    }


search_v1 = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_api_key)])
search_alias = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)
for _router in (search_v1, search_alias):
    _router.add_api_route(
        "/search",
        search,
        methods=["POST"],
        summary="Similar images from the index",
        responses={**ERRORS, 404: {"model": ErrorResponse, "description": "no index loaded (code no_index)"}},
        openapi_extra=_openapi(),
    )
