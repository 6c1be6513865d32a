"""The micro-batcher alone: merging, limits, deadlines, failure isolation, liveness and draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from supmae_serve.batching import (
    BatchConfig,
    BatcherClosedError,
    MicroBatcher,
    QueueFullError,
    RequestTimeout,
)


class Recorder:
    """run_batch that doubles numbers, records every batch, and can be held (a slow model call)."""

    def __init__(self):
        self.batches: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, key, payloads):
        self.started.set()
        assert self.gate.wait(10)
        self.batches.append((key, list(payloads)))
        if key == "boom":
            raise RuntimeError("model exploded")
        return [p * 2 for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _started(rec: Recorder, batcher: MicroBatcher):
    """Wait (without blocking the loop) until the worker is inside a model call."""
    while not rec.started.is_set():
        await asyncio.sleep(0.005)


async def _busy(rec: Recorder, config: BatchConfig, **submit) -> tuple[MicroBatcher, asyncio.Future]:
    """A started batcher whose worker is held inside the model call for a first request [0]
    -> (the batcher, that request)."""
    rec.gate.clear()
    b = MicroBatcher(rec, config)
    b.start()
    first = asyncio.ensure_future(b.submit("k", [0], **submit))  # taken by the worker, which then blocks
    await _started(rec, b)
    return b, first


def test_concurrent_requests_share_a_batch_in_order():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, BatchConfig(max_batch_size=8, max_wait_ms=200))
        b.start()
        results = await asyncio.gather(*(b.submit("k", [i]) for i in range(8)))
        await b.close()
        return results

    results = run(main())
    assert [r[0].value for r in results] == [2 * i for i in range(8)]
    assert len(rec.batches) == 1 and rec.batches[0] == ("k", list(range(8)))  # one full batch, no wait
    assert all(r[0].batch_size == 8 for r in results)


def test_max_batch_size_and_keys_are_respected():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, BatchConfig(max_batch_size=3, max_wait_ms=50))
        b.start()
        many = b.submit("a", list(range(7)))
        other = b.submit("b", [100, 101])
        a, o = await asyncio.gather(many, other)
        await b.close()
        return a, o

    a, o = run(main())
    assert [r.value for r in a] == [2 * i for i in range(7)] and [r.value for r in o] == [200, 202]
    assert all(len(p) <= 3 for _, p in rec.batches)
    for key, payloads in rec.batches:  # keys never mix
        assert all((p >= 100) == (key == "b") for p in payloads)
    assert sorted(len(p) for k, p in rec.batches if k == "a") == [1, 3, 3]


def test_a_lone_request_waits_at_most_max_wait():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, BatchConfig(max_batch_size=64, max_wait_ms=30))
        b.start()
        t0 = time.perf_counter()
        r = await b.submit("k", [1])
        elapsed = time.perf_counter() - t0
        await b.close()
        return r, elapsed

    r, elapsed = run(main())
    assert r[0].value == 2 and r[0].batch_size == 1
    assert 0.025 <= r[0].queue_s < 2.0 and elapsed < 2.0  # it waited for company, then went alone


def test_with_nothing_arriving_a_lone_request_runs_at_once():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, BatchConfig(max_batch_size=64, max_wait_ms=5000), arriving=lambda: 0)
        b.start()
        r = await b.submit("k", [1])
        await b.close()
        return r

    r = run(main())
    assert r[0].value == 2 and r[0].batch_size == 1
    assert r[0].queue_s < 1.0  # not the 5 s max wait: no other image was on its way


def test_the_batch_waits_for_images_on_their_way_then_runs_when_none_are_left():
    rec = Recorder()
    on_the_way = {"n": 2}

    async def main():
        b = MicroBatcher(
            rec, BatchConfig(max_batch_size=64, max_wait_ms=5000), arriving=lambda: on_the_way["n"]
        )
        b.start()
        first = asyncio.ensure_future(b.submit("k", [1]))
        await asyncio.sleep(0.1)
        assert not rec.batches and not first.done()  # two more announced: it waits for them
        on_the_way["n"] = 1
        second = asyncio.ensure_future(b.submit("k", [2]))  # one arrives
        await asyncio.sleep(0.1)
        assert not rec.batches  # still one on its way
        on_the_way["n"] = 0  # the last one failed to decode: nothing is coming any more
        b.poke()
        t0 = time.perf_counter()
        results = await asyncio.gather(first, second)
        waited = time.perf_counter() - t0
        await b.close()
        return results, waited

    (r1, r2), waited = run(main())
    assert [r1[0].value, r2[0].value] == [2, 4] and r1[0].batch_size == 2
    assert rec.batches == [("k", [1, 2])] and waited < 1.0


def test_queue_full_refuses_the_whole_request_and_queues_nothing():
    rec = Recorder()

    async def main():
        b, first = await _busy(rec, BatchConfig(max_batch_size=1, max_wait_ms=0, max_queue=3))
        queued = asyncio.ensure_future(b.submit("k", [1, 2]))
        await asyncio.sleep(0.01)
        assert b.depth == 2
        with pytest.raises(QueueFullError, match="holds 2 of at most 3") as e:
            await b.submit("k", [3, 4])
        assert e.value.retry_after_s >= 1 and b.depth == 2  # nothing of the refused request was queued
        fits = asyncio.ensure_future(b.submit("k", [5]))
        await asyncio.sleep(0.01)
        assert b.depth == 3
        rec.gate.set()
        results = await asyncio.gather(first, queued, fits)
        await b.close()
        return results

    results = run(main())
    assert [[r.value for r in res] for res in results] == [[0], [2, 4], [10]]


def test_timeout_frees_the_queue_and_the_worker_skips_dropped_items():
    rec = Recorder()

    async def main():
        b, first = await _busy(rec, BatchConfig(max_batch_size=4, max_wait_ms=0, max_queue=10), timeout_s=5)
        with pytest.raises(RequestTimeout, match="0.05 s"):
            await b.submit("k", [1, 2], timeout_s=0.05)
        assert b.depth == 0  # the timed-out items left the queue
        rec.gate.set()
        r = await first
        after = await b.submit("k", [3])
        await b.close()
        return r, after

    r, after = run(main())
    assert r[0].value == 0 and after[0].value == 6
    assert all(1 not in p and 2 not in p for _, p in rec.batches)  # never computed


def test_a_failing_batch_fails_only_its_items():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, BatchConfig(max_batch_size=4, max_wait_ms=20))
        b.start()
        bad, good = await asyncio.gather(b.submit("boom", [1]), b.submit("k", [2]), return_exceptions=True)
        later = await b.submit("k", [3])
        alive = b.alive
        await b.close()
        return bad, good, later, alive

    bad, good, later, alive = run(main())
    assert isinstance(bad, RuntimeError) and "exploded" in str(bad)
    assert good[0].value == 4 and later[0].value == 6 and alive


def test_wrong_result_count_is_an_error_not_a_hang():
    async def main():
        b = MicroBatcher(lambda key, p: [0], BatchConfig(max_batch_size=4, max_wait_ms=0))
        b.start()
        with pytest.raises(RuntimeError, match="1 results for 2 inputs"):
            await b.submit("k", [1, 2])
        await b.close()

    run(main())


def test_a_dead_worker_is_reported_and_fails_waiting_requests():
    rec = Recorder()

    async def main():
        b, running = await _busy(rec, BatchConfig(max_batch_size=1, max_wait_ms=0, max_queue=10))
        assert b.alive
        waiting = asyncio.ensure_future(b.submit("k", [1]))
        await asyncio.sleep(0.01)
        b._task.cancel()  # the worker dies (a bug, a cancelled task: any reason)
        await asyncio.sleep(0.01)
        assert not b.alive and b.stop_reason == "cancelled"
        results = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(BatcherClosedError, match="cancelled"):
            await b.submit("k", [2])
        rec.gate.set()
        await b.close()
        return results

    results = run(main())
    assert all(isinstance(r, BatcherClosedError) for r in results)


async def _close_while_five_are_held(rec: Recorder, config: BatchConfig, pause: float, while_draining=None):
    """Submit five requests while the model is held, start close(drain=True), run `while_draining(batcher)`,
    release the model -> the five results once close has returned."""
    b = MicroBatcher(rec, config)
    b.start()
    pending = [asyncio.ensure_future(b.submit("k", [i])) for i in range(5)]
    await asyncio.sleep(pause)
    closing = asyncio.ensure_future(b.close(drain=True, timeout=10))
    await asyncio.sleep(pause)
    if while_draining is not None:
        await while_draining(b)
    rec.gate.set()
    await closing
    return await asyncio.gather(*pending)


def test_close_drains_the_queue_then_refuses_new_work():
    rec = Recorder()
    rec.gate.clear()

    async def refused(b):
        assert not b.alive  # readiness goes false while draining
        with pytest.raises(BatcherClosedError, match="shutting down"):
            await b.submit("k", [9])

    config = BatchConfig(max_batch_size=2, max_wait_ms=1000, max_queue=10)
    results = run(_close_while_five_are_held(rec, config, 0.01, refused))
    assert [r[0].value for r in results] == [0, 2, 4, 6, 8]  # everything queued before close finished


def test_workers_run_batches_at_once_and_the_queue_fills_while_they_are_busy():
    both_running = threading.Barrier(2, timeout=5)  # only passes when two model calls run at the same time
    rec = Recorder()
    rec.gate.clear()

    entered = []

    def run_batch(key, payloads):
        if payloads[0] < 2:  # the first two batches must meet inside the model
            both_running.wait()
        entered.append(payloads[0])
        return rec(key, payloads)

    async def main():
        b = MicroBatcher(run_batch, BatchConfig(max_batch_size=8, max_wait_ms=0, workers=2))
        b.start()
        first = asyncio.ensure_future(b.submit("k", [0]))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit("k", [1]))
        while len(entered) < 2:  # both calls are in the model, held by the gate
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(b.submit("k", [i])) for i in range(2, 7)]
        await asyncio.sleep(0.1)
        assert b.depth == 5  # no free worker: they wait, together
        rec.gate.set()
        results = await asyncio.gather(first, second, *rest)
        await b.close()
        return results

    results = run(main())
    assert [r[0].value for r in results] == [2 * i for i in range(7)]
    assert sorted(len(p) for _, p in rec.batches) == [1, 1, 5]  # the five queued meanwhile ran as one batch


def test_one_worker_never_runs_two_batches_at_once():
    running, most = [0], [0]
    lock = threading.Lock()

    def run_batch(key, payloads):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return payloads

    async def main():
        b = MicroBatcher(run_batch, BatchConfig(max_batch_size=1, max_wait_ms=0))
        b.start()
        await asyncio.gather(*(b.submit("k", [i]) for i in range(6)))
        await b.close()

    run(main())
    assert most[0] == 1


def test_close_drains_every_worker():
    rec = Recorder()
    rec.gate.clear()
    config = BatchConfig(max_batch_size=1, max_wait_ms=0, workers=3)
    assert [r[0].value for r in run(_close_while_five_are_held(rec, config, 0.05))] == [0, 2, 4, 6, 8]


def test_a_dead_worker_fails_every_batch_in_flight():
    rec = Recorder()
    rec.gate.clear()
    entered = threading.Semaphore(0)

    def run_batch(key, payloads):
        entered.release()
        return rec(key, payloads)

    async def main():
        b = MicroBatcher(run_batch, BatchConfig(max_batch_size=1, max_wait_ms=0, workers=2))
        b.start()
        running = [asyncio.ensure_future(b.submit("k", [i])) for i in range(2)]
        for _ in range(2):
            while not entered.acquire(blocking=False):
                await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(b.submit("k", [2]))
        await asyncio.sleep(0.01)
        b._task.cancel()
        results = await asyncio.gather(*running, queued, return_exceptions=True)
        rec.gate.set()  # let the model threads finish
        await b.close()
        return results

    results = run(main())
    assert all(isinstance(r, BatcherClosedError) for r in results), results


def test_config_is_validated():
    with pytest.raises(ValueError):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchConfig(timeout_s=0)
    with pytest.raises(ValueError):
        BatchConfig(workers=0)
