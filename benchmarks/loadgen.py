"""The load generator and server plumbing shared by the serving benchmarks (serve_load.py, serve_peer.py).

- `Connection`: a minimal keep-alive HTTP/1.1 client (like wrk's), far cheaper per request than httpx;
- `closed_loop`: N closed-loop clients, each POSTing bodies in turn and waiting for the answer, for a bounded
  time after an unmeasured warm-up;
- `start_supmae` / `wait_ready` / `free_port`: a supmae-serve on loopback, as a subprocess;
- `tree_cpu_s`: the CPU seconds of a process and all its descendants (a server that forks workers),
  `pause_tree` (SIGSTOP/SIGCONT) so an idle server cannot take CPU from the one measured;
- `supmae_batch_stats`: the batcher's (images, batches) counters from a supmae-serve's /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_supmae(model: Path, extra: Sequence[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`supmae-serve --model MODEL --no-demo EXTRA...` on a free loopback port -> (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "supmae_serve.cli", "--model", str(model), "--port", str(port), "--no-demo"]
    cmd += ["--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 600, path: str = "/readyz") -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and every process below it: LitServe's model workers outlive a terminated parent (they
    were seen spinning at 20-60% of a core each, orphaned, through later runs' measurements)."""
    tree = descendants(proc.pid)
    pause_tree(proc.pid, False)  # a paused server cannot handle SIGTERM
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in tree[1:] if Path(f"/proc/{p}").exists()]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.time() + 10
        while left and time.time() < deadline:
            left = [p for p in left if Path(f"/proc/{p}").exists() and _alive(p)]
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """False for a process that has exited (a zombie waiting for its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (children, grandchildren, ...), from /proc."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants (LitServe runs its model in a child process)."""
    total = 0.0
    for p in descendants(pid):
        try:
            total += process_cpu_s(p)
        except (OSError, IndexError, ValueError):
            continue
    return total


def pause_tree(pid: int, pause: bool) -> None:
    """SIGSTOP (pause) or SIGCONT a server and its workers: an idle server's polling threads then cannot take
    CPU from the server being measured."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGSTOP if pause else signal.SIGCONT)
        except ProcessLookupError:
            continue


def supmae_batch_stats(base: str) -> tuple[float, float]:
    """(images, batches) the server's batcher has run so far (Prometheus counters)."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=10).text
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return get("supmae_batch_size_sum"), get("supmae_batch_size_count")


# ---------------------------------------------------------------------------- load
class Connection:
    """A minimal keep-alive HTTP/1.1 client (like wrk's): the load generator shares the 2 CPU cores with the
    server, so it must cost far less per request than the server does (httpx costs about a millisecond)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            header = await self.reader.readuntil(b"\r\n\r\n")
            status = int(header.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", header).group(1))
            return status, await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, AttributeError):
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@dataclass
class LoadResult:
    latencies: list[float]  # seconds, successful requests inside the measured window
    errors: list[str] = field(default_factory=list)
    window_s: float = 0.0


def closed_loop(
    base: str,
    path: str,
    bodies: Sequence[bytes],
    content_type: str,
    clients: int,
    seconds: float,
    warmup_s: float = 0.0,
    max_requests: int = 10**9,
) -> LoadResult:
    """`clients` closed-loop clients POST `bodies` (in turn) to `base + path` for `warmup_s` unmeasured seconds,
    then `seconds` measured ones; only requests that start and end inside the measured window count."""
    host, port = host_port(base)
    result = LoadResult([])
    count = 0

    async def client(index: int, measure_from: float, stop_at: float) -> None:
        nonlocal count
        conn = Connection(host, port)
        turn = index  # each client starts at its own body and walks the list
        while time.perf_counter() < stop_at and count < max_requests:
            body = bodies[turn % len(bodies)]
            turn += clients
            t0 = time.perf_counter()
            try:
                status, answer = await conn.post(path, body, content_type)
                ok, why = status == 200, f"HTTP {status}: {answer[:120]!r}"
            except Exception as e:  # noqa: BLE001 - every failure is an error to report
                ok, why = False, repr(e)
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                count += 1
                if ok:
                    result.latencies.append(t1 - t0)
                else:
                    result.errors.append(why)
        await conn.close()

    async def run() -> None:  # the clock starts inside the event loop, as the clients do
        measure_from = time.perf_counter() + warmup_s
        stop_at = measure_from + seconds
        await asyncio.gather(*(client(i, measure_from, stop_at) for i in range(clients)))
        result.window_s = min(time.perf_counter(), stop_at) - measure_from

    asyncio.run(run())
    return result


async def _post_each(
    base: str, path: str, bodies: Sequence[bytes], content_type: str
) -> list[tuple[int, bytes]]:
    conn = Connection(*host_port(base))
    try:
        return [await conn.post(path, b, content_type) for b in bodies]
    finally:
        await conn.close()


def post_each(base: str, path: str, bodies: Sequence[bytes], content_type: str) -> list[tuple[int, bytes]]:
    """(status, body) of each of `bodies` POSTed one after another on one connection."""
    return asyncio.run(_post_each(base, path, bodies, content_type))
