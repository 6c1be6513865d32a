"""Load test of supmae-serve on loopback: N concurrent single-image clients for a bounded time, with dynamic
batching on and off, against the backend's raw throughput measured in the same run.

    nice -n 10 python benchmarks/serve_load.py                          # ViT-S/16 224 px, 16 clients, 3 repeats
    python benchmarks/serve_load.py --variant micro_patch4_32 --duration 5 --repeats 1   # a quick smoke run

Per repeat: (1) raw: `backend.classify` on ready-made batches of --max-batch-size images, in this process;
(2) the server with batching (`supmae-serve --max-batch-size B --max-wait-ms W`) and (3) without
(`--no-batching`: one image per model call), each loaded by --clients closed-loop clients that POST one JPEG
to /v1/classify and wait for the answer. Both servers start once (warmed up) and stay idle while not measured.
The table gives medians over the repeats; every phase stops by itself after --duration seconds (or
--max-requests requests). The model has random weights (throughput does not depend on them).
Targets (docs/benchmarks.md): batched >= 90% of raw and >= 2x unbatched at 16 clients, with zero errors.
--server-args adds supmae-serve flags to both servers: `--server-args='--backend torch'` keeps the servers on
the backend the raw phases time, whatever the server's default backend is.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen beside this file

from loadgen import closed_loop, process_cpu_s, start_supmae, stop, supmae_batch_stats, wait_ready  # noqa: E402


@dataclass
class Phase:
    name: str
    images_per_s: float
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    requests: int = 0
    mean_batch: float = float("nan")
    cpu_ms_per_image: float = float("nan")  # server (or raw backend) CPU time per image: immune to other load
    client_cpu_ms: float = float("nan")  # the load generator's CPU time per request
    error_samples: list[str] = field(default_factory=list)


def test_image(size: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth gradients + texture), a little larger than the model input so the server resizes."""
    rng = np.random.default_rng(seed)
    s = int(size * 1.15)
    yy, xx = np.mgrid[0:s, 0:s] / s
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200
    arr = np.clip(base + rng.normal(0, 12, size=(s, s, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_checkpoint(variant: str, folder: Path) -> Path:
    from supmae_serve.model import create_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(create_model(variant).eval(), folder, variant=variant)
    return folder


# ---------------------------------------------------------------------------- raw backend throughput
def raw_throughput(model: Path, batch: int, seconds: float, threads: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of `backend.classify` on ready-made batches, called from one worker thread
    exactly as the server's batcher calls it. Run in a fresh process (`measure_raw`), like a server."""
    from concurrent.futures import ThreadPoolExecutor

    from supmae_serve.backends.torch_backend import TorchBackend

    torch.set_num_threads(threads)
    backend = TorchBackend(model, device="cpu")
    s = backend.card.preprocessing.image_size
    x = torch.randn(batch, 3, s, s)

    def loop() -> tuple[float, float]:
        backend.classify(x)  # warm-up
        done, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            backend.classify(x)
            done += batch
        return done / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / done

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(loop).result()


def measure_raw(model: Path, batch: int, seconds: float, threads: int) -> tuple[float, float]:
    cmd = [
        sys.executable,
        __file__,
        "--raw",
        str(model),
        "--raw-batch",
        str(batch),
        "--duration",
        str(seconds),
    ]
    out = subprocess.run(
        [*cmd, "--threads", str(threads), "--nice", "0"], capture_output=True, text=True, check=True
    )
    ips, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return ips, cpu


# ---------------------------------------------------------------------------- servers and load
def start_server(model: Path, extra: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    return start_supmae(model, ["--threads", str(threads), *extra], log)


def load_phase(
    name: str,
    pid: int,
    base: str,
    image: bytes,
    clients: int,
    seconds: float,
    warmup_s: float,
    max_requests: int,
) -> Phase:
    images0, batches0 = supmae_batch_stats(base)
    cpu0, me0 = process_cpu_s(pid), time.process_time()
    load = closed_loop(base, "/v1/classify", [image], "image/jpeg", clients, seconds, warmup_s, max_requests)
    lat, errors, window = load.latencies, load.errors, load.window_s
    cpu1, me1 = process_cpu_s(pid), time.process_time()
    images1, batches1 = supmae_batch_stats(base)
    # every image the server ran in the phase, warm-up included (as in the CPU times)
    images, batches = max(images1 - images0, 1), max(batches1 - batches0, 1)
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    return Phase(
        name,
        len(lat) / window,
        *(float(np.percentile(ms, q)) for q in (50, 95, 99)),
        errors=len(errors),
        requests=len(lat) + len(errors),
        mean_batch=images / batches,
        cpu_ms_per_image=(cpu1 - cpu0) * 1000 / images,
        client_cpu_ms=(me1 - me0) * 1000 / images,
        error_samples=errors[:3],
    )


# ---------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> list[list[Phase]]:
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    model = Path(args.model) if args.model else make_checkpoint(args.variant, work / "ckpt")
    from supmae_serve.model import load_model_card

    size = load_model_card(model / "model.json").preprocessing.image_size
    image = test_image(size)
    batched_flags = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    batched_flags += ["--max-queue", str(max(256, 4 * args.clients)), *shlex.split(args.server_args)]
    servers = {
        "server, batching": start_server(model, batched_flags, args.threads, work / "batched.log"),
        "server, no batching": start_server(
            model,
            ["--no-batching", "--max-queue", str(max(256, 4 * args.clients)), *shlex.split(args.server_args)],
            args.threads,
            work / "unbatched.log",
        ),
    }
    results = []
    try:
        for proc, base in servers.values():
            wait_ready(proc, base)
        for rep in range(args.repeats):
            phases = []
            for batch, seconds in ((args.max_batch_size, args.duration), (1, args.duration / 2)):
                ips, cpu = measure_raw(model, batch, seconds, args.threads)
                phases.append(Phase(f"raw backend, batch {batch}", ips, cpu_ms_per_image=cpu))
            for name, (proc, base) in servers.items():
                phases.append(
                    load_phase(
                        name,
                        proc.pid,
                        base,
                        image,
                        args.clients,
                        args.duration,
                        args.warmup,
                        args.max_requests,
                    )
                )
            results.append(phases)
            print(
                f"repeat {rep + 1}/{args.repeats}:",
                ", ".join(f"{p.name} {p.images_per_s:.1f}/s" for p in phases),
                flush=True,
            )
    finally:
        for proc, _ in servers.values():
            stop(proc)
    return results


def report(results: list[list[Phase]], args: argparse.Namespace) -> str:
    def med(values):
        values = [v for v in values if v == v]
        return statistics.median(values) if values else float("nan")

    names = [p.name for p in results[0]]
    rows = {n: [rep[i] for rep in results] for i, n in enumerate(names)}
    raw = med(p.images_per_s for p in rows[names[0]])
    unbatched = med(p.images_per_s for p in rows["server, no batching"])
    lines = [
        f"{args.variant if not args.model else args.model}, {args.clients} clients x 1 image, {args.duration:g} s per phase, "
        f"median of {len(results)}; batching: max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms; "
        f"torch threads {args.threads}; load average before / after: {args.load_before} / "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        "",
        "| mode | images/s | vs raw | vs unbatched | p50 ms | p95 ms | p99 ms | mean batch | CPU ms/image "
        "(server or raw) | client CPU ms/image | errors / requests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in names:
        ps = rows[n]
        ips = med(p.images_per_s for p in ps)
        server = n.startswith("server")

        def cell(v: float, server: bool = server) -> str:
            return f"{v:.0f}" if server else "-"

        lines.append(
            f"| {n} | {ips:.1f} | {ips / raw:.0%} | {ips / unbatched:.2f}x | "
            f"{cell(med(p.p50_ms for p in ps))} | {cell(med(p.p95_ms for p in ps))} | {cell(med(p.p99_ms for p in ps))} | "
            f"{f'{med(p.mean_batch for p in ps):.1f}' if server else '-'} | "
            f"{med(p.cpu_ms_per_image for p in ps):.1f} | "
            f"{f'{med(p.client_cpu_ms for p in ps):.1f}' if server else '-'} | "
            f"{f'{sum(p.errors for p in ps)} / {sum(p.requests for p in ps)}' if server else '-'} |"
        )
    batched = med(p.images_per_s for p in rows["server, batching"])
    errors = sum(p.errors for n in names for p in rows[n])
    lines += [
        "",
        f"targets: batched/raw = {batched / raw:.1%} (>= 90%: {'met' if batched >= 0.9 * raw else 'MISSED'}), "
        f"batched/unbatched = {batched / unbatched:.2f}x (>= 2x: {'met' if batched >= 2 * unbatched else 'MISSED'}), "
        f"errors = {errors} ({'met' if errors == 0 else 'MISSED'})",
    ]
    if len(results) > 1:
        spread = {n: [round(p.images_per_s, 1) for p in rows[n]] for n in names}
        lines.append("per repeat (images/s): " + "; ".join(f"{n}: {v}" for n, v in spread.items()))
        ratio = [
            b.images_per_s / r.images_per_s
            for b, r in zip(rows["server, batching"], rows[names[0]], strict=True)
        ]
        lines.append("batched / raw per repeat: " + ", ".join(f"{v:.1%}" for v in ratio))
    samples = [s for n in names for p in rows[n] for s in p.error_samples]
    if samples:
        lines.append("error samples: " + " | ".join(samples[:3]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="small_patch16_224", help="model size to build with random weights")
    p.add_argument("--model", default=None, help="an existing checkpoint folder instead of --variant")
    p.add_argument(
        "--clients", type=int, default=16, help="concurrent closed-loop clients, one image per request"
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each server phase")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop a phase after this many requests")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the table shows medians")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="torch intra-op threads (raw and servers)"
    )
    p.add_argument(
        "--nice", type=int, default=10, help="lower this run's priority (other work shares the machine)"
    )
    p.add_argument(
        "--server-args",
        default="",
        help="extra supmae-serve flags for both servers, one string, e.g. --server-args='--backend torch' "
        "(the raw phases always time the torch backend)",
    )
    p.add_argument("--json", type=Path, help="also write every phase of every repeat here")
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)  # internal: one raw measurement, as JSON
    p.add_argument("--raw-batch", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw:
        print(json.dumps(raw_throughput(Path(args.raw), args.raw_batch, args.duration, args.threads)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    if args.nice:
        os.nice(args.nice)
    args.load_before = " ".join(
        f"{v:.1f}" for v in os.getloadavg()
    )  # other work on the machine, for the record
    results = run(args)
    print()
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps([[dataclasses.asdict(p) for p in rep] for rep in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
