"""Dynamic batching: an asyncio micro-batcher shared by every route (and the demo).

Requests put their images on one bounded queue as items with a key (what to run: `("embed", "avg")`,
`("classify",)`, `("reconstruct", 0.75)`); one worker task takes the oldest item's key and dispatches up to
`max_batch_size` items of that key as one model call when the batch is full or the oldest item has waited
`max_wait_ms` (like Triton's max queue delay: under load batches fill at once). Given `arriving` (how many
images the caller has accepted and is still decoding), the worker also stops waiting as soon as nothing more
is on its way: a lone client's image runs at once instead of sitting out `max_wait_ms` for company that
cannot come (the caller calls `poke()` when its count drops). The model call runs on a dedicated thread,
so the event loop keeps accepting and decoding while the model computes. With `workers` > 1, up to that many
batches run at once, each on its own thread (for backends that may be called from several threads: torch,
onnxruntime); with 1 intra-op thread each they use the cores without meeting at a barrier, so a core taken
for decoding slows one call instead of stalling both. A new batch forms only when a worker is free.

- bounded: a request whose images do not fit in `max_queue` is refused at once (`QueueFullError` -> 429
  with a Retry-After estimated from the recent throughput); nothing of it is queued;
- deadlines: `submit` gives up after `timeout_s` (`RequestTimeout` -> 504) and its items are dropped from
  the queue, or skipped if already taken;
- failure isolation: an exception in a model call fails that batch's items only; the worker carries on;
- liveness: `alive` is false once the worker task has ended for any reason, and every waiting item then
  fails with `BatcherClosedError` (readiness reports it);
- graceful shutdown: `close()` refuses new work, runs what is queued without waiting for batches to fill,
  then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("supmae.batching")


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 32  # items per model call
    max_wait_ms: float = 5.0  # how long the oldest item waits for its batch to fill
    max_queue: int = 256  # items waiting at most
    timeout_s: float = 30.0  # per-submit deadline: queue + inference
    workers: int = 1  # model calls at once, each on its own thread

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_queue < 1
            or self.max_wait_ms < 0
            or self.timeout_s <= 0
            or self.workers < 1
        ):
            raise ValueError(f"invalid batching config {self}")


class QueueFullError(Exception):
    def __init__(self, depth: int, limit: int, wanted: int, retry_after_s: int):
        super().__init__(
            f"the queue holds {depth} of at most {limit} images; this request needs {wanted} more: retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class BatcherClosedError(Exception):
    """The batcher is shutting down or its worker has stopped."""


class RequestTimeout(Exception):
    pass


@dataclass
class ItemResult:
    value: Any
    queue_s: float  # enqueued -> its batch started
    inference_s: float  # the batch's model call
    batch_size: int


class BatchObserver(Protocol):
    """Hooks for metrics; every method is called on the event loop thread."""

    def on_depth(self, depth: int) -> None: ...

    def on_batch(
        self, key: Hashable, size: int, queue_s: Sequence[float], inference_s: float, ok: bool
    ) -> None: ...


class _NullObserver:
    def on_depth(self, depth: int) -> None:
        pass

    def on_batch(self, key, size, queue_s, inference_s, ok) -> None:
        pass


@dataclass(eq=False)
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float


RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]


class MicroBatcher:
    """`run_batch(key, payloads) -> one result per payload` is synchronous and runs on the batcher's thread."""

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatchConfig = BatchConfig(),
        observer: BatchObserver | None = None,
        executor: Executor | None = None,
        arriving: Callable[[], int] | None = None,
    ):
        self.config = config
        self._arriving = arriving
        self._run_batch = run_batch
        self._observer = observer or _NullObserver()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=config.workers, thread_name_prefix="supmae-infer"
        )
        self._pending: OrderedDict[Hashable, deque[_Item]] = OrderedDict()
        self._depth = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._rate = 0.0  # exponential moving average of images per second, for Retry-After
        self.batches = 0
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="supmae-batcher")
        self._task.add_done_callback(self._on_worker_done)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def depth(self) -> int:
        return self._depth

    async def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Refuse new work; with `drain`, finish what is queued (up to `timeout` seconds), then stop."""
        self._closing = True
        if self._task is None:
            return
        if self._wakeup is not None:
            self._wakeup.set()
        if drain and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.warning(
                    "batcher: %d queued images not finished after %.1f s; dropping them", self._depth, timeout
                )
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._fail_pending(BatcherClosedError("the server is shutting down"))
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_worker_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            reason = "cancelled"
        elif task.exception() is not None:
            reason = f"crashed: {task.exception()!r}"
            log.error("batching worker stopped: %s", reason)
        else:
            reason = "stopped"
        self.stop_reason = reason
        self._fail_pending(BatcherClosedError(f"the batching worker has {reason}"))

    def _fail_pending(self, error: Exception) -> None:
        for queue in self._pending.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(error)
        self._pending.clear()
        self._depth = 0
        self._observer.on_depth(0)

    def poke(self) -> None:
        """Make the worker look at the queue again (the `arriving` count has dropped)."""
        if self._wakeup is not None:
            self._wakeup.set()

    # ------------------------------------------------------------------ submitting
    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from the recent throughput (1..60)."""
        if self._rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._depth / (self._rate * self.config.workers)))))

    def check_capacity(self, n: int) -> None:
        """Raise what `submit` would for `n` items now (BatcherClosedError, QueueFullError); callers use it
        to shed load before decoding a request's images."""
        if not self.alive:
            raise BatcherClosedError(
                "the server is shutting down"
                if self._closing
                else f"the batching worker has {self.stop_reason or 'not started'}"
            )
        if n and self._depth + n > self.config.max_queue:
            raise QueueFullError(self._depth, self.config.max_queue, n, self.retry_after_s())

    async def submit(
        self, key: Hashable, payloads: Sequence[Any], timeout_s: float | None = None
    ) -> list[ItemResult]:
        """Queue `payloads` under `key` and wait for their results (in order).

        Raises QueueFullError (nothing queued), BatcherClosedError, RequestTimeout, or the model call's error."""
        n = len(payloads)
        self.check_capacity(n)
        if n == 0:
            return []
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [_Item(key, p, loop.create_future(), now) for p in payloads]
        self._pending.setdefault(key, deque()).extend(items)
        self._depth += n
        self._observer.on_depth(self._depth)
        self._wakeup.set()
        try:
            return list(
                await asyncio.wait_for(
                    asyncio.gather(*(i.future for i in items)), timeout_s or self.config.timeout_s
                )
            )
        except asyncio.TimeoutError as e:
            self._discard(items)
            raise RequestTimeout(
                f"no result within the request timeout of {timeout_s or self.config.timeout_s:g} s"
            ) from e
        except BaseException:
            self._discard(items)  # cancelled (client gone) or failed: free the queue slots
            raise

    def _discard(self, items: list[_Item]) -> None:
        drop = set(map(id, items))
        for key in list(self._pending):
            q = self._pending[key]
            kept = deque(i for i in q if id(i) not in drop)
            self._depth -= len(q) - len(kept)
            if kept:
                self._pending[key] = kept
            else:
                del self._pending[key]
        for i in items:
            if not i.future.done():
                i.future.cancel()
        self._observer.on_depth(self._depth)

    # ------------------------------------------------------------------ the worker
    def _oldest_key(self) -> Hashable:
        return min(self._pending, key=lambda k: self._pending[k][0].enqueued)

    def _take(self, key: Hashable) -> list[_Item]:
        q = self._pending[key]
        items = []
        while q and len(items) < self.config.max_batch_size:
            item = q.popleft()
            self._depth -= 1
            if not item.future.done():  # skip items whose request already gave up
                items.append(item)
        if not q:
            del self._pending[key]
        self._observer.on_depth(self._depth)
        return items

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task] = set()  # batches in flight when workers > 1
        try:
            while True:
                if len(running) >= self.config.workers:  # every model thread busy: the queue keeps filling
                    _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = await self._next_batch(loop)
                if batch is None:  # closing, and nothing is queued
                    if running:
                        await asyncio.wait(running)
                    return
                if not batch[1]:
                    continue
                if self.config.workers == 1:
                    await self._dispatch(loop, *batch)
                else:
                    running.add(loop.create_task(self._dispatch(loop, *batch)))
        finally:
            for task in running:
                task.cancel()  # their items fail with BatcherClosedError

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> tuple[Hashable, list[_Item]] | None:
        """Wait for the next batch to form -> (key, items); None once closing with nothing queued."""
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            if not self._pending:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key = self._oldest_key()
            deadline = self._pending[key][0].enqueued + max_wait
            # wait for the batch to fill, at most until the oldest item's deadline and only while more images
            # are on their way (not while draining)
            while (
                not self._closing
                and key in self._pending
                and len(self._pending[key]) < self.config.max_batch_size
            ):
                if self._arriving is not None and self._arriving() <= 0:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            if key in self._pending:  # else every item of the key was discarded meanwhile
                return key, self._take(key)

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, key: Hashable, items: list[_Item]) -> None:
        start = loop.time()
        queue_s = [start - i.enqueued for i in items]
        t0 = time.perf_counter()
        ok = True
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, key, [i.payload for i in items]
            )
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} inputs")
        except asyncio.CancelledError:
            for i in items:
                if not i.future.done():
                    i.future.set_exception(BatcherClosedError("the batching worker was stopped"))
            raise
        except Exception as e:  # noqa: BLE001 - a failed model call fails its batch, not the worker
            ok = False
            log.exception("model call failed for a batch of %d (%s)", len(items), key)
            for i in items:
                if not i.future.done():
                    i.future.set_exception(e)
        inference_s = time.perf_counter() - t0
        self.batches += 1
        if ok:
            for i, r, q in zip(items, results, queue_s, strict=True):
                if not i.future.done():
                    i.future.set_result(ItemResult(r, q, inference_s, len(items)))
            rate = len(items) / max(inference_s, 1e-6)
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        self._observer.on_batch(key, len(items), queue_s, inference_s, ok)
