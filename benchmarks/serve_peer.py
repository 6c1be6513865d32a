"""supmae-serve side by side with a peer server (LitServe) on the same model, images and machine.

    nice -n 10 python benchmarks/serve_peer.py --out serve_peer.json              # the measurement (~12 min)
    python benchmarks/serve_peer.py --duration 3 --warmup 1 --repeats 1 --models vit_t4     # a smoke run
    python benchmarks/serve_peer.py --supmae-args="--backend onnxruntime --export-dir {export}"
    python benchmarks/serve_peer.py --supmae-args= --supmae-args="--threads 1 --inference-workers 2"  # 3 servers

The peer (benchmarks/litserve_peer.py, `pip install 'supmae[bench]'`) is LitServe with its own batching
(max batch 16, 10 ms), torch eager fp32, --peer-threads threads, the project's model and preprocessing.
supmae-serve runs with its defaults plus --supmae-args; `{export}` in them stands for a `supmae-export` of
the model (fp32 ONNX) that this script makes first. --supmae-args given several times compares several
supmae-serve configurations with the peer in one run (one server each, all alternated). Both servers take the same request: POST /v1/classify
with JSON `{"image": "<base64 JPEG>"}`, answered with the top-5 classes.

Per model: both servers start once; a correctness pass posts --check images to each and aborts unless every
top-1 class agrees; then, per repeat and client count, each server is loaded in turn (the order alternates)
by closed-loop clients on loopback that walk a list of real CIFAR-10 JPEGs (--data); the server not being
measured is paused (SIGSTOP), so its idle threads take no CPU. Per phase: images/s, p50/p99 latency, errors,
the server's CPU use in cores (CPU seconds of its process tree / wall seconds, warm-up included) and the
mean batch size. Models: `vit_t4` is the bundled ViT-T/4 with the 32-px JPEGs as stored; `vit_s16` is
ViT-S/16 at 224 px with random weights (a checkpoint made here with the project's create_model and
save_checkpoint) with the same CIFAR-10 images upscaled to 224 px (bicubic, JPEG quality 90).
Prints a markdown table last (medians over the repeats, with the range); --out writes every phase as JSON.
Targets (issue 13): vit_t4 >= 1.3x the peer's images/s at 16 clients and >= 1.5x at 1 client with p99 no
worse; vit_s16 >= 1.2x at 16 clients.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from loadgen import (  # noqa: E402
    closed_loop,
    free_port,
    pause_tree,
    post_each,
    start_supmae,
    stop,
    supmae_batch_stats,
    tree_cpu_s,
    wait_ready,
)

from supmae_serve.common.system import cpu_flags, cpu_name  # noqa: E402
from supmae_serve.common.versions import software_versions  # noqa: E402
from supmae_serve.settings import DEFAULT_MODEL  # noqa: E402

ROUTE = "/v1/classify"
PEER_LABEL = "LitServe peer"
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
MODELS = {
    "vit_t4": "the bundled ViT-T/4 (CIFAR-10), 32-px JPEGs as stored",
    "vit_s16": "ViT-S/16 224 px, random weights, CIFAR-10 JPEGs upscaled to 224 px",
}


@dataclass
class Phase:
    model: str
    server: str
    clients: int
    repeat: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    cores_busy: float  # CPU seconds of the server's process tree / wall seconds of the phase
    mean_batch: float
    errors: int
    requests: int
    error_samples: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- inputs
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` JPEGs from an ImageFolder tree, the same for every run (seeded), drawn across its classes."""
    files = sorted(root.rglob("*.jpg"))
    if len(files) < n:
        raise SystemExit(f"{root}: {len(files)} JPEGs, need {n} (--data, --images)")
    return sorted(random.Random(seed).sample(files, n))


def request_bodies(paths: list[Path], size: int | None) -> list[bytes]:
    """JSON `{"image": base64}` bodies of the JPEGs, re-encoded at `size` x `size` px (bicubic) when given."""
    from PIL import Image

    bodies = []
    for path in paths:
        data = path.read_bytes()
        if size is not None:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC).save(
                buf, format="JPEG", quality=90
            )
            data = buf.getvalue()
        bodies.append(json.dumps({"image": base64.b64encode(data).decode("ascii")}).encode())
    return bodies


def model_checkpoint(name: str, work: Path) -> tuple[Path, int | None]:
    """(checkpoint folder, the side the JPEGs are upscaled to or None) for a --models name."""
    if name == "vit_t4":
        return DEFAULT_MODEL, None
    if name == "vit_s16":
        import torch

        from supmae_serve.model import create_model, save_checkpoint

        folder = work / "vit_s16"
        if not (folder / "model.json").exists():
            torch.manual_seed(0)  # random weights: throughput does not depend on them
            save_checkpoint(create_model("small_patch16_224").eval(), folder, variant="small_patch16_224")
        return folder, 224
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def export_model(model: Path, out: Path, log_path: Path) -> Path:
    """An fp32 ONNX `supmae-export` of `model` (verified against torch, as the export always is)."""
    if not (out / "manifest.json").exists():
        cmd = [sys.executable, "-m", "export.cli", "--checkpoint", str(model), "--out", str(out)]
        cmd += ["--precision", "fp32", "--no-reconstruct", "--no-latency", "--verify-images", "8"]
        with log_path.open("w") as f:
            subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return out


# ---------------------------------------------------------------------------- servers
@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base: str
    stats_file: Path | None = None  # the peer's "<batches> <images>"; supmae-serve has /metrics

    def batch_counters(self) -> tuple[float, float]:
        """(images, batches) run so far."""
        if self.stats_file is None:
            return supmae_batch_stats(self.base)
        text = self.stats_file.read_text().split() if self.stats_file.exists() else []
        return (float(text[1]), float(text[0])) if len(text) == 2 else (0.0, 0.0)


def start_peer(model: Path, args: argparse.Namespace, work: Path) -> Server:
    port, stats = free_port(), work / f"peer_{model.name}.stats"
    cmd = [sys.executable, str(BENCH / "litserve_peer.py"), "--model", str(model), "--port", str(port)]
    cmd += ["--threads", str(args.peer_threads), "--stats", str(stats)]
    log_file = (work / f"peer_{model.name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log_file, stderr=subprocess.STDOUT)
    return Server(PEER_LABEL, proc, f"http://127.0.0.1:{port}", stats)


def supmae_label(extra: str, args: argparse.Namespace) -> str:
    return "supmae-serve" if len(args.supmae_args) == 1 else f"supmae-serve {extra or '(defaults)'}"


def start_servers(name: str, model: Path, args: argparse.Namespace, work: Path) -> list[Server]:
    servers = []
    for i, extra in enumerate(args.supmae_args):
        flags = shlex.split(extra)
        if any("{export}" in f for f in flags):
            if not (work / f"export_{name}" / "manifest.json").exists():
                log(f"{name}: exporting {model} to ONNX for --supmae-args")
            export = export_model(model, work / f"export_{name}", work / f"export_{name}.log")
            flags = [f.replace("{export}", str(export)) for f in flags]
        proc, base = start_supmae(model, flags, work / f"supmae_{name}_{i}.log")
        servers.append(Server(supmae_label(extra, args), proc, base))
    servers.append(start_peer(model, args, work))
    for s in servers:
        wait_ready(s.proc, s.base, path="/readyz" if s.stats_file is None else "/health")
    log(f"{name}: {len(servers)} servers ready (logs in {work})")
    return servers


# ---------------------------------------------------------------------------- measuring
def top1(answers: list[tuple[int, bytes]], server: str) -> list[int]:
    out = []
    for i, (status, body) in enumerate(answers):
        if status != 200:
            raise SystemExit(
                f"correctness pass: {server} answered HTTP {status} to image {i}: {body[:200]!r}"
            )
        doc = json.loads(body)
        preds = doc["data"][0]["predictions"] if "data" in doc else doc["predictions"]
        out.append(int(preds[0]["class_index"]))
    return out


def check_agreement(answers: dict[str, list[int]]) -> None:
    """Abort (SystemExit) unless every server gave the same top-1 class for every image."""
    first, *others = answers.values()
    disagree = [i for i in range(len(first)) if any(o[i] != first[i] for o in others)]
    if disagree:
        detail = "; ".join(
            f"image {i}: " + ", ".join(f"{k} {v[i]}" for k, v in answers.items()) for i in disagree[:5]
        )
        raise SystemExit(
            f"correctness pass FAILED: top-1 differs on {len(disagree)} of {len(first)} images ({detail})"
        )


def correctness(servers: list[Server], bodies: list[bytes], n: int) -> dict:
    """Post the first `n` images to every server; abort unless all top-1 classes agree."""
    answers = {}
    for s in servers:
        pause_tree(s.proc.pid, False)
        answers[s.name] = top1(post_each(s.base, ROUTE, bodies[:n], "application/json"), s.name)
        pause_tree(s.proc.pid, True)
    check_agreement(answers)
    return {"images": n, "top1_agree": 1.0, "servers": list(answers)}


def measure(server: Server, model: str, bodies: list[bytes], clients: int, repeat: int, args) -> Phase:
    pause_tree(server.proc.pid, False)
    try:
        images0, batches0 = server.batch_counters()
        cpu0, t0 = tree_cpu_s(server.proc.pid), time.perf_counter()
        load = closed_loop(
            server.base, ROUTE, bodies, "application/json", clients, args.duration, args.warmup
        )
        cpu1, t1 = tree_cpu_s(server.proc.pid), time.perf_counter()
        images1, batches1 = server.batch_counters()
    finally:
        pause_tree(server.proc.pid, True)
    ms = sorted(v * 1000 for v in load.latencies) or [float("nan")]
    pct = lambda q: ms[min(len(ms) - 1, int(round(q / 100 * (len(ms) - 1))))]  # noqa: E731
    return Phase(
        model,
        server.name,
        clients,
        repeat,
        len(load.latencies) / load.window_s,
        pct(50),
        pct(99),
        (cpu1 - cpu0) / (t1 - t0),
        (images1 - images0) / max(batches1 - batches0, 1),
        len(load.errors),
        len(load.latencies) + len(load.errors),
        load.errors[:3],
    )


def run_model(name: str, args: argparse.Namespace, work: Path, paths: list[Path]) -> tuple[list[Phase], dict]:
    model, size = model_checkpoint(name, work)
    bodies = request_bodies(paths, size)
    servers = start_servers(name, model, args, work)
    phases = []
    try:
        for s in servers:
            pause_tree(s.proc.pid, True)
        check = correctness(servers, bodies, args.check)
        log(f"{name}: correctness pass: same top-1 on {args.check} images")
        for rep in range(args.repeats):
            for ci, clients in enumerate(args.clients):
                turn = (rep * len(args.clients) + ci) % len(servers)  # who goes first rotates
                for s in servers[turn:] + servers[:turn]:
                    p = measure(s, name, bodies, clients, rep, args)
                    phases.append(p)
                    log(
                        f"{name} repeat {rep + 1}/{args.repeats}, {clients} clients, {s.name}: "
                        f"{p.images_per_s:.1f} img/s, p99 {p.p99_ms:.0f} ms, {p.cores_busy:.2f} cores, "
                        f"batch {p.mean_batch:.1f}, errors {p.errors}"
                    )
    finally:
        for s in servers:
            stop(s.proc)
    return phases, check


# ---------------------------------------------------------------------------- report
def med(values) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def spread(values) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else "-"


def table_row(model: str, clients: int, server: str, ps: list[Phase], peer: list[Phase] | None) -> str:
    ips = [p.images_per_s for p in ps]
    vs = "1.00x"
    if peer is not None:
        ratios = [div(a.images_per_s, b.images_per_s) for a, b in zip(ps, peer, strict=True)]
        vs = f"{div(med(ips), med(p.images_per_s for p in peer)):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    return (
        f"| {model} | {clients} | {server} | {med(ips):.1f} ({spread(ips)}) | {vs} | "
        f"{med(p.p50_ms for p in ps):.1f} | {med(p.p99_ms for p in ps):.1f} | "
        f"{med(p.cores_busy for p in ps):.2f} | {med(p.mean_batch for p in ps):.1f} | "
        f"{sum(p.errors for p in ps)} / {sum(p.requests for p in ps)} |"
    )


TARGETS = {("vit_t4", 16): 1.3, ("vit_t4", 1): 1.5, ("vit_s16", 16): 1.2}  # x the peer's images/s (issue 13)


def target_line(
    model: str, clients: int, server: str, ps: list[Phase], peer: list[Phase], named: bool
) -> list[str]:
    goal = TARGETS.get((model, clients))
    if goal is None:
        return []
    ratio = div(med(p.images_per_s for p in ps), med(p.images_per_s for p in peer))
    p99_ok = med(p.p99_ms for p in ps) <= med(p.p99_ms for p in peer)
    p99 = f", p99 {'no worse' if p99_ok else 'WORSE'} than the peer's" if model == "vit_t4" else ""
    met = ratio >= goal and (p99_ok or model != "vit_t4")
    who = f" [{server}]" if named else ""
    return [f"{model}, {clients} clients{who}: {ratio:.2f}x (>= {goal}x){p99}: {'met' if met else 'MISSED'}"]


def report(phases: list[Phase], meta: dict, args: argparse.Namespace) -> str:
    peer = PEER_LABEL
    ours = [supmae_label(extra, args) for extra in args.supmae_args]
    lines = [
        f"serve_peer {meta['date']}: {meta['cpu']} ({meta['cores']} cores; {' '.join(meta['cpu_flags']) or 'no AVX2'}), "
        f"{args.duration:g} s per phase after {args.warmup:g} s warm-up, median of {args.repeats} (range); "
        f"supmae-serve args: {' | '.join(a or '(defaults)' for a in args.supmae_args)}; load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}",
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items() if k not in ("cpu",)),
        "",
        "| model | clients | server | images/s (range) | vs peer | p50 ms | p99 ms | cores busy | mean batch | errors / requests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    targets = []
    for model in dict.fromkeys(p.model for p in phases):
        for clients in args.clients:
            rows = {
                s: [p for p in phases if (p.model, p.clients, p.server) == (model, clients, s)]
                for s in (*ours, peer)
            }
            base = rows[peer]
            if not base:  # (a run cut short)
                continue
            for s, ps in rows.items():
                lines.append(table_row(model, clients, s, ps, None if s == peer else base))
            for s in ours:
                targets += target_line(model, clients, s, rows[s], base, len(ours) > 1)
    errors = sum(p.errors for p in phases)
    samples = [e for p in phases for e in p.error_samples][:3]
    caveats = []
    if args.repeats < 3 or args.duration < 10:
        caveats.append("SMOKE SETTINGS (fewer than 3 repeats or under 10 s per phase)")
    busy = float(meta["load_before"].split()[0])
    if busy > 0.5 * (meta["cores"] or 1):
        caveats.append(f"BUSY MACHINE (load average {busy:.1f} before the run)")
    caveat = f" [{'; '.join(caveats)}: not a measurement]" if caveats else ""
    lines += ["", f"targets (issue 13){caveat}: " + "; ".join(targets or ["none for these models/clients"])]
    lines.append(f"errors: {errors}" + (f" (e.g. {' | '.join(samples)})" if samples else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_t4,vit_s16", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--clients", default="16,1", help="comma-separated closed-loop client counts")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--data", type=Path, default=Path("/work/shared/data/cifar10/train"), help="JPEG folder tree"
    )
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs the clients walk through")
    p.add_argument("--check", type=int, default=50, help="images in the correctness pass")
    p.add_argument(
        "--supmae-args",
        action="append",
        help="extra supmae-serve flags, one string (write --supmae-args='--backend ...'); {export} = an fp32 "
        "ONNX export of the model made first; repeat it to compare several configurations (default: none)",
    )
    p.add_argument("--peer-threads", type=int, default=2, help="the peer's torch intra-op threads")
    p.add_argument("--nice", type=int, default=0, help="lower this run's priority (servers inherit it)")
    p.add_argument("--out", type=Path, help="write every phase and the run's metadata here (JSON)")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.supmae_args = args.supmae_args or [""]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.check > args.images:
        p.error("--check cannot exceed --images")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    if args.nice:
        os.nice(args.nice)
    flags = cpu_flags()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "versions": software_versions(
            ("onnxruntime", "litserve", "fastapi", "uvicorn", "pillow"), system=True
        ),
        "load_before": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "models": {m: MODELS[m] for m in models},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    paths = sample_images(args.data, args.images)
    work = Path(tempfile.mkdtemp(prefix="serve_peer_"))
    phases, checks = [], {}
    for m in models:
        ps, checks[m] = run_model(m, args, work, paths)
        phases += ps
    meta["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    doc = {"meta": meta, "correctness": checks, "phases": [asdict(p) for p in phases]}
    if args.out:  # written before the report, so a report bug never costs the measurements
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    text = report(phases, meta, args)
    if args.out:
        args.out.write_text(json.dumps({**doc, "table": text}, indent=2) + "\n")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
