"""The inference service behind the routes (and the mounted demo): backend + micro-batcher + decoding.

`InferenceService.start()` (from the app's lifespan) loads the backend off the event loop, warms it up and
starts the batcher; `stop()` drains it. Images are decoded on a thread pool (`decode_threads`), or on the
GPU with nvjpeg when the backend serves on CUDA. `BatchedBackend` is a synchronous `Backend` over the same
batcher for the Gradio demo, so demo clicks and API calls share batches, limits and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from supmae_serve.backends.base import (
    Backend,
    BackendInfo,
    CapabilityError,
    ClassifyOutput,
    EmbedOutput,
    ReconstructOutput,
    class_labels,
)
from supmae_serve.batching import ItemResult, MicroBatcher
from supmae_serve.model import ModelCard
from supmae_serve.preprocess import ImageError, decode_image, resize_side, to_tensor
from supmae_serve.settings import Settings

from .fetch import FETCH_FAILED, FetchPolicy, fetch_url
from .inputs import RawImage, RequestLimits
from .metrics import ServiceMetrics

log = logging.getLogger("supmae.service")

# backends that may be called from several threads at once (--inference-workers > 1): an onnxruntime session
# and an eager torch module are; a TensorRT execution context is not, nor is a torch.compile'd function
# (guards and recompilation), so those run one batch at a time
CONCURRENT_BACKENDS = ("torch", "onnxruntime", "fake")


@dataclass
class Reconstructed:
    """One image's reconstruction, (3, S, S) arrays in the normalised input space."""

    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray
    mask: np.ndarray  # (L,)


def run_batch(backend: Backend, key: tuple, payloads: list[tuple[torch.Tensor, int | None]]) -> list[Any]:
    """One model call for the batcher: stack the items of one key, run the backend, split per item."""
    x = torch.stack([p[0] for p in payloads])  # (N, 3, S, S)
    task = key[0]
    if task == "embed":
        return list(backend.embed(x, key[1]).embedding)
    if task == "classify":
        return list(backend.classify(x).probs)
    if task == "reconstruct":
        r = backend.reconstruct(x, key[1], [int(p[1]) for p in payloads])
        return [
            Reconstructed(r.masked[i], r.reconstruction[i], r.pasted[i], r.mask[i]) for i in range(x.shape[0])
        ]
    raise ValueError(f"unknown task {task!r}")


class Arrival:
    """Images of one request between being accepted and being queued (fetching, decoding): the batcher waits
    for a batch to fill only while some are on their way. `done()` (idempotent) when they are queued or
    have failed."""

    def __init__(self, service: InferenceService, n: int):
        self._service, self.n = service, n
        service.arriving += n

    def done(self) -> None:
        if self.n:
            s = self._service
            s.arriving -= self.n
            self.n = 0
            if s.arriving <= 0 and s.batcher is not None:
                s.batcher.poke()


class InferenceService:
    def __init__(self, settings: Settings, card: ModelCard, backend: Backend | None = None):
        self.settings = settings
        self.card = card
        self.labels = class_labels(card)
        self.backend: Backend | None = backend
        self._injected = backend is not None
        self.metrics = ServiceMetrics()
        self.limits = settings.image_limits()
        self.request_limits = RequestLimits(
            max_request_bytes=settings.max_request_bytes,
            max_image_bytes=settings.max_image_bytes,
            max_images=settings.max_images_per_request,
        )
        self.fetch_policy = FetchPolicy(
            allow_private=settings.url_fetch_allow_private,
            timeout_s=settings.url_fetch_timeout_s,
            max_bytes=settings.max_image_bytes,
        )
        self.batch_config = settings.batch_config()
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="supmae-decode")
        # URL fetches wait on the network: their own bounded pool, so slow URLs never hold the decode threads
        self.fetch_pool = ThreadPoolExecutor(settings.url_fetch_threads, thread_name_prefix="supmae-fetch")
        self.batcher: MicroBatcher | None = None
        self.arriving = 0  # images accepted and being fetched/decoded, not yet queued (event loop only)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loaded = backend is not None
        self.warmed = False
        self.load_error: str | None = None
        self.backend_info: BackendInfo | None = None
        self.selection: dict | None = None  # what `auto` picked and why (backends/registry.py)
        self.gpu_decode_device: torch.device | None = None
        self.started_at = time.time()

    # ------------------------------------------------------------------ lifecycle
    def _load(self) -> None:
        from supmae_serve.backends.registry import create_backend

        t0 = time.perf_counter()
        if self.backend is None:
            self.backend = create_backend(self.settings.backend_config())
            self.card = self.backend.card
            self.labels = class_labels(self.card)
        self.loaded = True
        self.backend_info = self.backend.info()
        self.selection = getattr(self.backend, "selection", None)
        log.info(
            "backend %s on %s (%s) loaded in %.2f s",
            self.backend_info.name,
            self.backend_info.device,
            self.backend_info.precision,
            time.perf_counter() - t0,
        )
        if self.settings.warmup:
            t0 = time.perf_counter()
            sizes = sorted({1, self.batch_config.max_batch_size})
            self.backend.warmup(tuple(sizes))
            log.info("warmed up (batch sizes %s) in %.2f s", sizes, time.perf_counter() - t0)
        self.warmed = True
        self._check_workers(self.backend_info)
        if self.settings.gpu_decode and self.backend_info.device.startswith("cuda"):
            self.gpu_decode_device = torch.device(self.backend_info.device)

    def _check_workers(self, info: BackendInfo) -> None:
        workers = self.batch_config.workers
        if workers > 1 and (info.name not in CONCURRENT_BACKENDS or info.extra.get("compiled")):
            log.warning(
                "--inference-workers %d: the %s backend%s runs one batch at a time; using 1 worker",
                workers,
                info.name,
                " (compiled)" if info.extra.get("compiled") else "",
            )
            self.batch_config = dataclasses.replace(self.batch_config, workers=1)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await self.loop.run_in_executor(self.decode_pool, self._load)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)
            raise
        backend = self.backend
        self.batcher = MicroBatcher(
            lambda key, items: run_batch(backend, key, items),
            self.batch_config,
            self.metrics,
            arriving=lambda: self.arriving,
        )
        self.batcher.start()
        # Everything alive now (torch, onnxruntime, the app, the model) lives as long as the process: move it
        # out of the collector's sight, so a full collection while serving scans only what requests create.
        # Unfrozen, one full collection of the start-up heap (about 420k objects with the ORT backend) held
        # the GIL, and so every thread of the server, for 0.1-1.4 s on the 2-core machine (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        self.metrics.ready.set(1)

    async def stop(self) -> None:
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.close(drain=True, timeout=self.settings.shutdown_timeout_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.backend, "close", None)
        if callable(close) and not self._injected:
            close()

    def readiness(self) -> dict:
        alive = self.batcher is not None and self.batcher.alive
        checks = {"model_loaded": self.loaded, "warmed_up": self.warmed, "batcher_alive": alive}
        ready = all(checks.values())
        out: dict[str, Any] = {"ready": ready, "checks": checks}
        if not ready:
            if self.load_error:
                out["reason"] = f"model failed to load: {self.load_error}"
            elif not self.loaded or not self.warmed:
                out["reason"] = "model loading or warming up"
            elif self.batcher is not None:
                out["reason"] = (
                    "shutting down"
                    if self.batcher._closing
                    else f"batching worker {self.batcher.stop_reason or 'not running'}"
                )
            else:
                out["reason"] = "batching worker not started"
        self.metrics.ready.set(1 if ready else 0)
        return out

    @property
    def capabilities(self) -> dict[str, bool]:
        if self.backend_info is not None:
            return dict(self.backend_info.capabilities)
        return dict(self.card.capabilities)

    def require(self, capability: str) -> None:
        if not self.capabilities.get(capability, False):
            can = ", ".join(k for k, v in self.capabilities.items() if v)
            raise CapabilityError(f"this model ({self.card.framework}) cannot {capability}; it can: {can}")

    # ------------------------------------------------------------------ decoding
    def _prepare_one(self, raw: RawImage) -> torch.Tensor | ImageError:
        """RawImage with bytes -> normalised (3, S, S) tensor, or the ImageError that says why not (never raises)."""
        try:
            if raw.error is not None:
                return raw.error
            data = raw.data
            if self.gpu_decode_device is not None:
                from .gpu_decode import decode_jpeg_gpu

                x = decode_jpeg_gpu(data, self.limits, self.card.preprocessing, self.gpu_decode_device)
                if x is not None:
                    return x
            prep = self.card.preprocessing
            return to_tensor(decode_image(data, self.limits, resize_side(prep)), prep)
        except ImageError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a bad input must fail its item, never the request
            log.warning("unexpected error decoding %s: %r", raw.name, e)
            return ImageError(f"cannot decode this image: {type(e).__name__}: {e}", 422, "corrupt_image")

    async def _fetch(self, raw: RawImage) -> RawImage:
        """A URL item -> the same item with the fetched bytes, or with the error (never raises)."""
        if not self.settings.allow_url_fetch:
            return RawImage(
                name=raw.name,
                error=ImageError(
                    "fetching image URLs is disabled on this server; send the image itself "
                    "(multipart file, image/* body, base64 or data URI)",
                    422,
                    "url_fetch_disabled",
                ),
            )
        loop = asyncio.get_running_loop()
        policy = self.fetch_policy
        try:  # the fetch has its own deadline; this one also covers waiting for a free fetch thread
            fetch = loop.run_in_executor(self.fetch_pool, fetch_url, raw.url, policy)
            return RawImage(data=await asyncio.wait_for(fetch, policy.timeout_s + 0.5), name=raw.name)
        except ImageError as e:
            return RawImage(name=raw.name, error=e)
        except Exception as e:  # noqa: BLE001 - a timeout waiting for a fetch thread, or a bug: the item fails
            log.info("URL fetch failed (%s): %r", raw.url[:200], e)
            return RawImage(name=raw.name, error=ImageError(FETCH_FAILED, 422, "url_fetch_failed"))

    async def _prepare(self, raw: RawImage) -> torch.Tensor | ImageError:
        if raw.error is None and raw.url is not None:
            raw = await self._fetch(raw)
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, self._prepare_one, raw)

    async def prepare(self, items: list[RawImage]) -> list[torch.Tensor | ImageError]:
        """Fetch (URL items) and decode every item; the caller bounds it with the request's deadline."""
        out = await asyncio.gather(*(self._prepare(r) for r in items))
        for r in out:
            if isinstance(r, ImageError):
                self.metrics.image_errors.labels(r.code).inc()
        return list(out)

    async def run_blocking(self, fn, *args):
        """CPU work (PNG encoding, ...) on the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    # ------------------------------------------------------------------ inference
    def arrival(self, n: int) -> Arrival:
        """Announce `n` images that will be queued once decoded (call `done()` on the result right before
        `infer`, with no await in between, or when the request fails)."""
        return Arrival(self, n)

    def check_capacity(self, n: int) -> None:
        """Shed load before decoding anything: raise what `submit` would (BatcherClosedError, QueueFullError)
        if `n` images could not be queued now. `submit` checks again when they are."""
        if self.batcher is None:
            from supmae_serve.batching import BatcherClosedError

            raise BatcherClosedError("the model is not loaded yet")
        self.batcher.check_capacity(n)

    async def infer(
        self, key: tuple, payloads: list[tuple[torch.Tensor, int | None]], timeout_s: float | None = None
    ) -> list[ItemResult]:
        """Queue + inference, within `timeout_s` (default: the batcher's request timeout)."""
        if self.batcher is None:
            from supmae_serve.batching import BatcherClosedError

            raise BatcherClosedError("the model is not loaded yet")
        return await self.batcher.submit(key, payloads, timeout_s)

    def facade(self) -> BatchedBackend:
        return BatchedBackend(self)


class BatchedBackend:
    """A synchronous `Backend` that sends its work through the service's batcher (for the Gradio demo).

    Call it from worker threads (Gradio runs synchronous event handlers in threads), not from the event loop."""

    def __init__(self, service: InferenceService):
        self._service = service

    @property
    def card(self) -> ModelCard:
        return self._service.card

    def info(self) -> BackendInfo:
        s = self._service
        if s.backend_info is None:
            return BackendInfo("loading", "-", "-", dict(s.card.capabilities))
        return s.backend_info

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """The service warms its backend up at start; nothing to do."""

    def _call(self, key: tuple, payloads: list) -> list[Any]:
        loop = self._service.loop
        if loop is None:
            raise RuntimeError("the service has not started (the model is still loading)")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is loop:
            raise RuntimeError(
                "BatchedBackend is synchronous: call it from a worker thread, not the event loop"
            )
        fut = asyncio.run_coroutine_threadsafe(self._service.infer(key, payloads), loop)
        return [r.value for r in fut.result()]

    def embed(self, images: torch.Tensor, pooling: str = "avg") -> EmbedOutput:
        rows = self._call(("embed", pooling), [(x, None) for x in images])
        return EmbedOutput(np.stack(rows))

    def classify(self, images: torch.Tensor) -> ClassifyOutput:
        self._service.require("classify")
        rows = self._call(("classify",), [(x, None) for x in images])
        return ClassifyOutput(np.stack(rows), class_labels(self.card))

    def reconstruct(self, images: torch.Tensor, mask_ratio: float, seeds: list[int]) -> ReconstructOutput:
        self._service.require("reconstruct")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {images.shape[0]} images")
        rows = self._call(
            ("reconstruct", float(mask_ratio)), [(x, int(s)) for x, s in zip(images, seeds, strict=True)]
        )
        return ReconstructOutput(
            masked=np.stack([r.masked for r in rows]),
            reconstruction=np.stack([r.reconstruction for r in rows]),
            pasted=np.stack([r.pasted for r in rows]),
            mask=np.stack([r.mask for r in rows]),
        )
