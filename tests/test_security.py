"""The service's defences against clients that hold on to it, over real HTTP: a `supmae-serve` subprocess
(uvicorn) with small limits, and raw sockets that behave as slow or idle clients do (issue 11)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from .conftest import encode, synthetic_image
from .test_api import PNG, tiny_checkpoint
from .test_serve import start_server, stop

LIMITS = [
    "--header-timeout-s",
    "1",
    "--body-timeout-s",
    "1",
    "--timeout-keep-alive",
    "1",
    "--max-request-bytes",
    "200000",
    "--max-image-bytes",
    "100000",
    "--max-bytes-in-flight",
    "500000",
    "--limit-concurrency",
    "12",
]


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory) -> Path:
    """Gradio's upload folder of the server under test (GRADIO_TEMP_DIR), not the machine's shared one."""
    return tmp_path_factory.mktemp("gradio-uploads").resolve()


@pytest.fixture(scope="module")
def base(tmp_path_factory, upload_dir):
    pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'supmae[demo]'")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(upload_dir)}
    proc, url = start_server(
        tiny_checkpoint(tmp_path_factory.mktemp("ckpt")),
        *LIMITS,
        "--demo",
        "--threads",
        "1",
        "--max-wait-ms",
        "1",
        "--log-level",
        "warning",
        env=env,
    )
    try:
        yield url
    finally:
        stop(proc)


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_after(sock: socket.socket, limit_s: float = 6.0) -> float:
    """Seconds until the server closes `sock` (reading and discarding what it sends); fails past limit_s."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < limit_s:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    pytest.fail(f"the server kept the connection open for more than {limit_s} s")


def response_head(sock: socket.socket, limit_s: float = 6.0) -> str:
    """The response's head (and whatever of the body came with it)."""
    sock.settimeout(limit_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


def post_head(length: int) -> bytes:
    return (
        f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.timeout(60)
def test_idle_connections_are_closed(base):
    """Issue 11: connections that send nothing stayed open (60 s observed, without end)."""
    sock = connect(base)
    assert 0.5 < closed_after(sock) < 4
    sock = connect(base)  # after a response, the keep-alive timeout (1 s) closes it
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response_head(sock).startswith("HTTP/1.1 200")
    assert closed_after(sock) < 4


@pytest.mark.timeout(60)
def test_a_client_dripping_its_request_head_is_cut_off(base):
    sock = connect(base)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    t0 = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        while time.monotonic() - t0 < 8:
            sock.sendall(b"x")  # a byte every 0.2 s: each read is quick, the head never ends
            time.sleep(0.2)
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_a_body_that_stalls_gets_408_and_the_connection_closes(base):
    sock = connect(base)
    sock.sendall(post_head(50_000) + b"\x89PNG" + b"\0" * 100)  # then nothing
    t0 = time.monotonic()
    head = response_head(sock)
    assert head.startswith("HTTP/1.1 408"), head
    assert time.monotonic() - t0 < 4
    assert closed_after(sock) < 3
    assert (
        httpx.post(base + "/v1/embed", content=PNG, headers={"content-type": "image/png"}).status_code == 200
    )


@pytest.mark.timeout(60)
def test_body_bytes_in_flight_are_bounded_before_reading(base):
    """Issue 11: eight uploads stalled short of their end held 250 MB, and the 429 check ran only after a
    whole body was read. Bodies reserve their declared size first; what does not fit is refused unread."""
    stalled = [connect(base) for _ in range(2)]
    for sock in stalled:
        sock.sendall(post_head(200_000) + b"\0" * 1000)  # 2 x 200 KB of the 500 KB reserved, then stall
    time.sleep(0.3)
    third = connect(base)
    t0 = time.monotonic()
    third.sendall(post_head(200_000))  # only the head: the answer cannot have waited for the body
    answer = response_head(third)
    assert time.monotonic() - t0 < 1.0
    assert answer.startswith("HTTP/1.1 503") and "retry-after: 1" in answer.lower(), answer
    answer += third.recv(65536).decode() if "too_many_bytes_in_flight" not in answer else ""
    assert "too_many_bytes_in_flight" in answer and "the limit is 500000 bytes" in answer
    # a small request still fits in what is left
    assert (
        httpx.post(base + "/v1/embed", content=PNG, headers={"content-type": "image/png"}).status_code == 200
    )
    for sock in stalled:  # the body timeout frees their reservations
        assert response_head(sock).startswith("HTTP/1.1 408")
    r = httpx.post(base + "/v1/embed", content=b"\0" * 150_000, headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["data"][0]["error"]["code"] == "image_too_large"


@pytest.mark.timeout(60)
def test_connections_beyond_limit_concurrency_get_503(base):
    idle = [connect(base) for _ in range(12)]
    time.sleep(0.2)
    r = httpx.get(base + "/healthz", timeout=5)
    assert r.status_code == 503
    for sock in idle:
        sock.close()
    time.sleep(0.3)
    assert httpx.get(base + "/healthz", timeout=5).status_code == 200


# ---------------------------------------------------------------------------- the mounted demo (item 1)
FILE = {"_type": "gradio.FileData"}


def explore(base: str, image: dict, timeout: float = 10.0) -> tuple[int, str]:
    """The demo's explore event over Gradio's HTTP API -> (status of the call, its final event or body)."""
    r = httpx.post(f"{base}/demo/gradio_api/call/explore", json={"data": [image, 0.75, 0]}, timeout=timeout)
    if r.status_code != 200:
        return r.status_code, r.text
    stream = httpx.get(f"{base}/demo/gradio_api/call/explore/{r.json()['event_id']}", timeout=timeout)
    return 200, stream.text.strip().splitlines()[-2].removeprefix("event: ")


def upload(base: str, *files: tuple[str, bytes, str]) -> httpx.Response:
    parts = [("files", f) for f in files]
    return httpx.post(f"{base}/demo/gradio_api/upload", files=parts, timeout=10)


@pytest.mark.timeout(90)
def test_the_demo_never_reads_a_file_it_was_not_sent(base, upload_dir, tmp_path):
    """Issue 11: the mounted demo hashed /dev/zero on the event loop for ever (the server stopped answering,
    even SIGTERM), classified an image elsewhere on the disk and copied /etc/passwd into its cache."""
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(encode(synthetic_image((48, 48), seed=4)))
    for path in ("/dev/zero", str(elsewhere), "/etc/passwd", "http://127.0.0.1:9/x.png"):
        status, answer = explore(base, {"path": path, "meta": FILE})
        assert status == 403 and "only reads files uploaded to it" in answer, (path, status, answer)
        t0 = time.monotonic()
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 2
    # the browser's route (the queue) and a data: URL riding on an uploaded file's path
    uploaded = upload(base, ("a.png", PNG, "image/png")).json()[0]
    queue = {"data": [{"path": str(elsewhere), "meta": FILE}, 0.75, 0], "fn_index": 0, "session_hash": "x"}
    r = httpx.post(f"{base}/demo/gradio_api/queue/join", json=queue, timeout=10)
    assert r.status_code == 403
    sneaky = {"path": uploaded, "url": "data:image/png;base64,AAAA", "meta": FILE}
    assert explore(base, sneaky)[0] == 403
    assert httpx.get(f"{base}/demo/gradio_api/file=http://127.0.0.1:9/x", timeout=5).status_code == 403
    # what the page does still works: upload, then explore the uploaded file
    assert Path(uploaded).resolve().is_relative_to(upload_dir)
    assert explore(base, {"path": uploaded, "meta": FILE}, timeout=30) == (200, "complete")


@pytest.mark.timeout(60)
def test_the_demo_upload_route_takes_one_image_within_the_servers_limits(base, upload_dir):
    """Issue 11: the upload route took 9 MB non-image files, several per request, outside the API's limits."""
    before = {p.name for p in upload_dir.rglob("*") if p.is_file()}
    cases = [
        ((("notes.txt", b"hello " * 5000, "text/plain"),), 415, "unsupported_format"),
        ((("big.png", b"\x89PNG" + b"\0" * 150_000, "image/png"),), 413, "image_too_large"),
        ((("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")), 413, "too_many_files"),
        ((("tiny.png", encode(synthetic_image((2, 2))), "image/png"),), 422, "image_too_small"),
        ((("bomb.png", _bomb(), "image/png"),), 413, "too_many_pixels"),
    ]
    for files, status, code in cases:
        r = upload(base, *files)
        assert (r.status_code, code in r.text) == (status, True), (files[0][0], r.status_code, r.text)
    r = httpx.post(
        f"{base}/demo/gradio_api/upload",
        content=b"x" * 300_000,
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=10,
    )
    assert r.status_code == 413  # the server's --max-request-bytes (200000)
    after = {p.name for p in upload_dir.rglob("*") if p.is_file()}
    assert not {"notes.txt", "big.png", "tiny.png", "bomb.png"} & (after - before)  # nothing refused was kept
    ok = upload(base, ("ok.png", PNG, "image/png"))
    assert ok.status_code == 200 and Path(ok.json()[0]).resolve().is_relative_to(upload_dir)


def _bomb() -> bytes:
    from .test_api import _png_claiming

    return _png_claiming(30000, 30000)
