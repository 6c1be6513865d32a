"""`supmae-serve` as users run it: a real uvicorn process on 127.0.0.1 (every endpoint and input form, the
bad-input corpus over real HTTP, graceful shutdown), and the command line mirroring the settings."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from supmae_serve.cli import EXTRA_FLAGS, build_parser, main, parse_settings
from supmae_serve.settings import DEFAULT_MODEL, Settings

from .test_api import CLASSES, CORPUS, JPEG, PNG, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_server(ckpt: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`supmae-serve --model ckpt --port <free> FLAGS` in a subprocess, ready -> (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "supmae_serve.cli", "--model", str(ckpt), "--port", str(port), *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
    except BaseException:
        stop(proc)
        raise
    return proc, base


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    flags = [
        "--no-demo",
        "--max-wait-ms",
        "2",
        "--max-image-bytes",
        "300000",
        "--max-request-bytes",
        "1000000",
        "--max-images-per-request",
        "8",
        "--max-pixels",
        "4000000",
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "SUPMAE_DEMO": "true"}  # the flag wins over the environment
    proc, base = start_server(ckpt, *flags, env=env)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client
    finally:
        code = stop(proc)
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully
        assert code in (0, -signal.SIGTERM), proc.stdout.read()


def test_every_endpoint_and_input_form_over_http(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json()["ready"] is True
    assert server.get("/v1/info").json()["model"]["class_names"] == CLASSES
    assert (
        server.get("/docs").status_code == 200 and "/v1/embed" in server.get("/openapi.json").json()["paths"]
    )
    assert server.get("/demo").status_code == 404  # --no-demo
    b64 = base64.b64encode(PNG).decode()
    for path in ("/v1/embed", "/v1/classify", "/v1/reconstruct", "/embed", "/classify", "/reconstruct"):
        forms = [
            server.post(path, content=PNG, headers={"content-type": "image/png"}),
            server.post(
                path, files=[("files", ("a.png", PNG, "image/png")), ("files", ("b.jpg", JPEG, "image/jpeg"))]
            ),
            server.post(
                path, json={"images": [b64, "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()]}
            ),
        ]
        for r in forms:
            assert r.status_code == 200, (path, r.text)
            assert "x-inference-time-ms" in r.headers and "server-timing" in r.headers
        assert len(forms[1].json()["data"]) == 2 and len(forms[2].json()["data"]) == 2
    text = server.get("/metrics").text
    assert 'route="/v1/reconstruct",status="200"' in text and "supmae_batch_size_count" in text


@pytest.mark.parametrize("name,data,ctype,status,code", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_corpus_over_http(server, name, data, ctype, status, code):
    r = server.post("/v1/classify", content=data, headers={"content-type": ctype})
    assert r.status_code == status and r.status_code < 500, (name, r.text)
    good = server.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
    assert good.status_code == 200


def test_limits_over_http(server):
    r = server.post("/v1/embed", content=b"\0" * 1_200_000, headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = server.post("/v1/embed", json={"images": ["A" * 600_000]})
    assert r.status_code == 413 and r.json()["data"][0]["error"]["code"] == "image_too_large"
    r = server.post("/v1/embed", json={"images": [base64.b64encode(PNG).decode()] * 9})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    assert server.post("/v1/classify", content=PNG, headers={"content-type": "image/png"}).status_code == 200


def test_concurrent_clients(server):
    results = []

    def client(i):
        with httpx.Client(base_url=str(server.base_url), timeout=30) as c:
            for _ in range(3):
                results.append(
                    c.post("/v1/embed", content=PNG, headers={"content-type": "image/png"}).status_code
                )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 18


SLOW_SERVER = """
import sys, time
from pathlib import Path
import uvicorn
from supmae_serve.api.app import create_app
from supmae_serve.backends.fake import FakeBackend, fake_card
from supmae_serve.settings import Settings

class Gated(FakeBackend):  # a model call that lasts until the test creates the gate file
    def _work(self, n):
        while not Path(sys.argv[2]).exists():
            time.sleep(0.02)
        super()._work(n)

settings = Settings(model="unused", demo=False, warmup=False, max_batch_size=1, max_wait_ms=0, shutdown_timeout_s=30)
app = create_app(settings, backend=Gated(fake_card()))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info", timeout_graceful_shutdown=30)
"""


@pytest.mark.slow
def test_graceful_shutdown_finishes_requests_in_flight(tmp_path):
    script, gate = tmp_path / "slow_server.py", tmp_path / "gate"
    script.write_text(SLOW_SERVER)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), str(gate)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(proc, base)
        out = {}

        def send(i):
            out[i] = httpx.post(
                base + "/v1/embed", content=PNG, headers={"content-type": "image/png"}, timeout=60
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while "supmae_queue_depth 2.0" not in httpx.get(base + "/metrics", timeout=10).text:
            assert time.time() < deadline, "requests never queued"  # 1 in the model call, 2 waiting
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # shutdown starts with all three unanswered
        time.sleep(0.5)
        gate.touch()
        for t in threads:
            t.join(60)
        assert [out[i].status_code for i in range(3)] == [200, 200, 200]
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Finished server process" in proc.stdout.read()
    finally:
        gate.touch()
        stop(proc)


@pytest.mark.slow
def test_several_worker_processes(tmp_path):
    proc, base = start_server(
        tiny_checkpoint(tmp_path / "ck"), "--workers", "2", "--no-demo", "--threads", "1"
    )
    try:
        for _ in range(4):
            r = httpx.post(
                base + "/v1/classify", content=PNG, headers={"content-type": "image/png"}, timeout=30
            )
            assert r.status_code == 200
    finally:
        stop(proc)
    log = proc.stdout.read()
    assert log.count("Application startup complete") == 2 and "died" not in log, log


def test_reading_settings_does_not_load_torch():
    """uvicorn's worker bootstrap re-imports the entry point and kills workers silent for 5 s: keep it light."""
    code = "import sys, supmae_serve.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---------------------------------------------------------------------------- the command line
def test_every_setting_has_a_flag_and_no_flag_is_unexplained():
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(Settings.model_fields) | set(EXTRA_FLAGS)


def test_help_texts_say_what_the_flags_do():
    """Issue 14: --api-keys left /docs out of the public routes, --model named engines *.engine, --check
    claimed to print /v1/info."""
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert "/docs" in helps["api_keys"] and "/healthz" in helps["api_keys"]
    assert "*.plan" in helps["model"] and ".engine" not in helps["model"]
    assert "{ready, backend, selection, model, index}" in helps["check"] and "/v1/info" not in helps["check"]


def test_flags_env_and_defaults(monkeypatch):
    monkeypatch.delenv("SUPMAE_PORT", raising=False)
    s, _ = parse_settings([])
    assert s.model == DEFAULT_MODEL and s.demo is None and s.backend == "auto" and s.api_keys == []
    monkeypatch.setenv("SUPMAE_PORT", "9001")
    monkeypatch.setenv("SUPMAE_API_KEYS", "a,b")
    s, _ = parse_settings(["--max-batch-size", "8", "--no-demo", "--cors-origins", "https://x.example"])
    assert (s.port, s.api_keys, s.max_batch_size, s.demo, s.cors_origins) == (
        9001,
        ["a", "b"],
        8,
        False,
        ["https://x.example"],
    )
    s, _ = parse_settings(["--port", "9002", "--api-keys", "c"])
    assert s.port == 9002 and s.api_keys == ["c"]  # flags win over the environment


def test_the_demo_is_on_by_default_only_on_a_loopback_address(monkeypatch):
    """Issue 11: a server listening on a public address without API keys (the Docker image) served the demo
    to anyone; it is now opt-in there."""
    for host, on in (
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
    ):
        assert Settings(host=host).demo_on() is on, host
        assert Settings(host=host, demo=True).demo_on() and not Settings(host=host, demo=False).demo_on()
    monkeypatch.setenv("SUPMAE_HOST", "0.0.0.0")
    assert not parse_settings([])[0].demo_on() and parse_settings(["--demo"])[0].demo_on()


def test_settings_survive_the_trip_to_worker_processes(monkeypatch, tmp_path):
    s = Settings(
        model=tmp_path,
        api_keys=["k1", "k2"],
        cors_origins=["*"],
        max_batch_size=4,
        batching=False,
        export_dir=None,
    )
    for k, v in s.to_env().items():
        monkeypatch.setenv(k, v)
    assert Settings() == s
    assert "k1" not in repr(s) and "k1" not in str(s.public_dict())


def test_invalid_settings_and_missing_model_exit_2(tmp_path, capsys):
    assert main(["--max-images-per-request", "500", "--max-queue", "10"]) == 2
    assert "cannot exceed max_queue" in capsys.readouterr().err
    assert main(["--device", "tpu"]) == 2
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("keys", ["ok-key,clé-secrète", "has space", "tab\there"])
def test_keys_no_header_can_carry_are_refused_at_start(keys, capsys):
    """Issue 11: a key with a non-ASCII character could never match; say so at start-up, without the key."""
    assert main(["--api-keys", keys, "--check"]) == 2
    err = capsys.readouterr().err
    assert "not visible ASCII" in err and keys.split(",")[-1] not in err
    with pytest.raises(ValueError, match="not visible ASCII") as e:
        Settings(api_keys=keys)
    assert keys.split(",")[-1] not in str(e.value)


def test_check_loads_and_reports(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ck")
    assert main(["--model", str(ckpt), "--check", "--max-batch-size", "2", "--no-graph-cache"]) == 0
    out = capsys.readouterr().out
    assert '"ready": true' in out and '"name": "torch"' in out
