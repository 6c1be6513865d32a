"""Prometheus metrics (one registry per app) and the middleware that times every request.

- `supmae_requests_total{route, method, status}` and `supmae_request_duration_seconds{route}`: every request,
  labelled by the route template (never the raw path, so labels stay bounded);
- `supmae_queue_depth`, `supmae_queue_time_seconds`, `supmae_batch_size`, `supmae_inference_seconds{task}`,
  `supmae_batches_total{task, outcome}`: the batcher;
- `supmae_images_total{task, outcome}` and `supmae_image_errors_total{code}`: per input image;
- `supmae_ready`: 1 when /readyz would answer 200.

Timing headers on every response: `X-Total-Time-Ms` and `Server-Timing` (total, plus queue and inference
where the route ran the model; those also come as `X-Queue-Time-Ms` and `X-Inference-Time-Ms`).
With several uvicorn workers each process keeps its own metrics (scrape per replica, one worker each).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Hashable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("supmae_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "supmae_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("supmae_queue_depth", "images waiting for a batch", registry=r)
        self.queue_time = Histogram(
            "supmae_queue_time_seconds",
            "time an image waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "supmae_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "supmae_inference_seconds",
            "model call time per batch",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batches = Counter("supmae_batches", "model calls", ["task", "outcome"], registry=r)
        self.images = Counter("supmae_images", "input images", ["task", "outcome"], registry=r)
        self.image_errors = Counter(
            "supmae_image_errors", "rejected input images by reason", ["code"], registry=r
        )
        self.ready = Gauge("supmae_ready", "1 when the service is ready", registry=r)

    # BatchObserver
    def on_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_batch(
        self, key: Hashable, size: int, queue_s: Sequence[float], inference_s: float, ok: bool
    ) -> None:
        task = key[0] if isinstance(key, tuple) else str(key)
        self.batch_size.observe(size)
        self.inference.labels(task).observe(inference_s)
        self.batches.labels(task, "ok" if ok else "error").inc()
        for q in queue_s:
            self.queue_time.observe(q)


def _route_label(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    root = scope.get("root_path", "") or ""
    if scope.get("app_root_path") or root:  # a mounted sub-application (the demo)
        return root or "mounted"
    return "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times requests, adds timing and request-id headers.

    Routes put `queue_ms` / `inference_ms` into `request.state`; they end up in Server-Timing."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics
        self.prefix = os.urandom(6).hex()  # request ids: unique per process start, cheap per request
        self.counter = itertools.count(1)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}
        state = scope.setdefault("state", {})
        request_id = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None
        )
        request_id = (request_id or f"{self.prefix}-{next(self.counter):x}")[:64]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                total_ms = (time.perf_counter() - t0) * 1000
                timing = [
                    f"{n};dur={state[f'{n}_ms']:.2f}"
                    for n in ("queue", "inference")
                    if state.get(f"{n}_ms") is not None
                ]
                timing.append(f"total;dur={total_ms:.2f}")
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", ", ".join(timing).encode()))
                headers.append((b"x-total-time-ms", f"{total_ms:.2f}".encode()))
                headers.append((b"x-request-id", request_id.encode("latin-1", "replace")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
