"""The serving benchmarks' own parts: the load generator against a tiny HTTP server, serve_peer.py's inputs,
correctness check and report arithmetic (the servers themselves are not started here)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import pytest

from .conftest import encode, synthetic_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import loadgen  # noqa: E402
import serve_peer  # noqa: E402


class EchoServer:
    """HTTP/1.1 keep-alive server on a thread: answers each POST with its body's length, or 500 for b"fail"."""

    def __init__(self):
        self.seen: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.seen.append(body)
                status = b"500 Internal Server Error" if body == b"fail" else b"200 OK"
                answer = json.dumps({"length": len(body)}).encode()
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def test_closed_loop_counts_requests_in_the_window_and_walks_the_bodies(echo):
    bodies = [b"a", b"bb", b"ccc", b"fail"]
    result = loadgen.closed_loop(echo.base, "/x", bodies, "application/octet-stream", clients=3, seconds=0.5)
    assert result.latencies and result.errors, "both answers are expected"
    assert all(e.startswith("HTTP 500") for e in result.errors)
    assert 0.4 <= result.window_s <= 1.0
    assert set(echo.seen) == set(bodies)  # every client walks the list
    # one in four bodies fails; the counts follow that within the ragged ends of the window
    assert len(result.errors) == pytest.approx(len(result.latencies) / 3, rel=0.35)
    answers = loadgen.post_each(echo.base, "/x", [b"1234", b"fail"], "application/octet-stream")
    assert answers[0] == (200, b'{"length": 4}') and answers[1][0] == 500


def test_the_process_tree_cpu_includes_children():
    import os
    import subprocess
    import time

    busy = "import time\nt = time.time()\nwhile time.time() - t < 5: pass"
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        deadline = time.time() + 10
        while loadgen.process_cpu_s(child.pid) < 0.05 and time.time() < deadline:
            time.sleep(0.02)
        me, tree = loadgen.process_cpu_s(os.getpid()), loadgen.tree_cpu_s(os.getpid())
        assert child.pid in loadgen.descendants(os.getpid())
        assert tree >= me + 0.05  # the child's CPU time counts
    finally:
        child.kill()
        child.wait(10)


def test_request_bodies_are_json_base64_upscaled_when_asked(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.jpg").write_bytes(encode(synthetic_image((32, 32), seed=i), "JPEG"))
    paths = serve_peer.sample_images(tmp_path, 4)
    assert paths == serve_peer.sample_images(tmp_path, 4) and len(set(paths)) == 4  # seeded, no repeats
    import base64
    import io

    from PIL import Image

    for size, want in ((None, (32, 32)), (224, (224, 224))):
        doc = json.loads(serve_peer.request_bodies(paths[:1], size)[0])
        assert Image.open(io.BytesIO(base64.b64decode(doc["image"]))).size == want
    with pytest.raises(SystemExit, match="need 99"):
        serve_peer.sample_images(tmp_path, 99)


def test_top1_reads_both_servers_answers_and_disagreement_aborts():
    ours = json.dumps({"data": [{"predictions": [{"class_index": 3}, {"class_index": 1}]}]}).encode()
    peer = json.dumps({"predictions": [{"class_index": 3}]}).encode()
    assert serve_peer.top1([(200, ours), (200, peer)], "x") == [3, 3]
    with pytest.raises(SystemExit, match="HTTP 503"):
        serve_peer.top1([(503, b"busy")], "x")
    serve_peer.check_agreement({"a": [1, 2, 3], "b": [1, 2, 3]})
    with pytest.raises(SystemExit, match="differs on 1 of 3 images.*image 2: a 3, b 4"):
        serve_peer.check_agreement({"a": [1, 2, 3], "b": [1, 2, 4]})


def _phase(server, clients, ips, p99, model="vit_t4", rep=0):
    return serve_peer.Phase(model, server, clients, rep, ips, p99 / 2, p99, 1.9, 8.0, 0, 100)


def test_report_ratios_and_targets():
    peer, ours = serve_peer.PEER_LABEL, "supmae-serve"
    phases = []
    for rep, (a16, b16, a1, b1) in enumerate([(140, 100, 30, 20), (130, 100, 27, 20), (150, 100, 33, 20)]):
        phases += [_phase(ours, 16, a16, 90, rep=rep), _phase(peer, 16, b16, 100, rep=rep)]
        phases += [_phase(ours, 1, a1, 60, rep=rep), _phase(peer, 1, b1, 50, rep=rep)]
    phases += [_phase(ours, 16, 0.0, 1, model="vit_s16"), _phase(peer, 16, 0.0, 1, model="vit_s16")]
    args = serve_peer.argparse.Namespace(
        duration=20.0, warmup=3.0, repeats=3, clients=[16, 1], supmae_args=[""]
    )
    meta = {"date": "d", "cpu": "c", "cores": 2, "cpu_flags": ["avx2"], "load_before": "0", "load_after": "0"}
    text = serve_peer.report(phases, meta, args)
    assert "| vit_t4 | 16 | supmae-serve | 140.0 (130.0-150.0) | 1.40x (1.30-1.50) |" in text
    assert "vit_t4, 16 clients: 1.40x (>= 1.3x), p99 no worse than the peer's: met" in text
    # 1.50x reaches the throughput goal, but p99 60 ms against the peer's 50 ms misses it
    assert "vit_t4, 1 clients: 1.50x (>= 1.5x), p99 WORSE than the peer's: MISSED" in text
    assert "vit_s16, 16 clients: nanx (>= 1.2x): MISSED" in text  # a server that served nothing
    assert "not a measurement" not in text
    args.repeats, meta["load_before"] = 1, "3.5"
    text = serve_peer.report(phases, meta, args)
    assert (
        "[SMOKE SETTINGS (fewer than 3 repeats or under 10 s per phase); BUSY MACHINE (load average 3.5"
        in text
    )
