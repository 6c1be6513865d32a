"""Search latency over HTTP: /v1/search by vector at 1M indexed vectors against the in-process FAISS call and an
empty HTTP round trip (/healthz), and /v1/search by image against the same request on /v1/embed, in one run.

    flock /tmp/supmae-bench.lock python benchmarks/search_latency.py --json search.json      # 1,000,000 vectors
    python benchmarks/search_latency.py --synthetic 50000 --requests 300                       # a smoke run

The vectors are synthetic 192-d points around 1,000 centres (`benchmarks/index_build.py`'s generator),
written as a feature set that carries the bundled model's identity (its weights digest, pooling, dimension),
so that `supmae-serve --index` accepts the index for the bundled model and the image queries embed with the
model that the index claims (the neighbours of an image in a synthetic index mean nothing; their cost is
real). The index is built by `supmae-embed index` (auto: exact up to 87k vectors of 192-d, HNSW above).

One client, one request at a time, keep-alive, on loopback; the server runs with --threads (default 1) and
the benchmark's own process with one faiss thread. Phases, each over --requests requests after a warm-up:
1. faiss: `FeatureIndex.search_arrays(q, top_k)` in this process, one fresh query at a time;
2. healthz: GET /healthz (the HTTP floor: connection, routing, middleware, JSON);
3. search by vector: POST /v1/search {"vectors": [q], "top_k": k}, the same fresh queries;
4. embed vs search by image: POST /v1/embed and POST /v1/search with the same JPEG body, interleaved
   request by request so that load drift hits both alike.
Target (issue 16): search by image adds at most 10% to the latency of the same request on /v1/embed (p50).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from index_build import build, log, synthetic  # noqa: E402
from serve_load import start_server, test_image, wait_ready  # noqa: E402

from supmae_serve.features.featureset import Features, write_feature_set  # noqa: E402
from supmae_serve.features.identity import model_identity  # noqa: E402
from supmae_serve.features.index import FeatureIndex, import_faiss  # noqa: E402
from supmae_serve.model import load_model_card  # noqa: E402
from supmae_serve.settings import DEFAULT_MODEL  # noqa: E402


def write_set(out: Path, n: int, centres: int, sigma: float, seed: int) -> np.ndarray:
    """The synthetic feature set with the bundled model's identity (written once per size); fresh queries."""
    card = load_model_card(DEFAULT_MODEL / "model.json")
    ident = model_identity(card, DEFAULT_MODEL, pooling="avg", normalized=False)
    x, lab, q = synthetic(n, ident.dim, centres, sigma, seed)
    if not (out / "features.json").exists():
        feats = Features([f"{i:07d}" for i in range(n)], [f"c{v}" for v in lab], [""] * n, x)
        extra = {"input": {"kind": "synthetic", "centres": centres, "sigma": sigma, "seed": seed}}
        write_feature_set(out, feats, ident, shard_size=250_000, extra=extra)
    return q


def pct(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(np.mean(values)),
        "n": len(values),
    }


def time_faiss(index_dir: Path, queries: np.ndarray, top_k: int, n: int) -> dict[str, float]:
    faiss = import_faiss()
    faiss.omp_set_num_threads(1)
    idx = FeatureIndex.load(index_dir)
    for q in queries[:20]:
        idx.search_arrays(q, top_k)
    lat = []
    for q in queries[:n]:
        t = time.perf_counter()
        idx.search_arrays(q, top_k)
        lat.append((time.perf_counter() - t) * 1000)
    return pct(lat)


def time_http(base: str, queries: np.ndarray, image: bytes, top_k: int, n: int, warmup: int) -> dict:
    import httpx

    out: dict[str, list[float]] = {"healthz": [], "search_vector": [], "embed_image": [], "search_image": []}
    search_ms: list[float] = []
    jpeg = {"content-type": "image/jpeg"}
    with httpx.Client(base_url=base, timeout=60) as c:

        def timed(name: str | None, method: str, path: str, **kw) -> httpx.Response:
            t = time.perf_counter()
            r = c.request(method, path, **kw)
            ms = (time.perf_counter() - t) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
            if name:
                out[name].append(ms)
            return r

        for i in range(warmup + n):
            timed("healthz" if i >= warmup else None, "GET", "/healthz")
        for i in range(warmup + n):
            q = queries[i % len(queries)].tolist()
            r = timed(
                "search_vector" if i >= warmup else None,
                "POST",
                "/v1/search",
                json={"vectors": [q], "top_k": top_k},
            )
            if i >= warmup:
                search_ms.append(float(r.headers["x-search-time-ms"]))
        for i in range(warmup + n):
            keep = i >= warmup
            first, second = ("embed", "search") if i % 2 == 0 else ("search", "embed")
            for what in (first, second):
                path = "/v1/embed" if what == "embed" else f"/v1/search?top_k={top_k}"
                timed(f"{what}_image" if keep else None, "POST", path, content=image, headers=jpeg)
    res = {k: pct(v) for k, v in out.items()}
    res["search_vector_faiss_in_server"] = pct(search_ms)
    return res


def report(r: dict, args) -> str:
    rows = [
        ("FAISS search_arrays, in process", r["faiss"]),
        ("GET /healthz (HTTP floor)", r["http"]["healthz"]),
        ("POST /v1/search by vector", r["http"]["search_vector"]),
        ("  of which FAISS in the server (X-Search-Time-Ms)", r["http"]["search_vector_faiss_in_server"]),
        ("POST /v1/embed, one JPEG", r["http"]["embed_image"]),
        ("POST /v1/search, the same JPEG", r["http"]["search_image"]),
    ]
    lines = [
        f"{r['index']['count']:,} vectors x {r['index']['dim']}, {r['index']['faiss']} "
        f"({r['index']['params']}), top_k {args.top_k}, {args.requests} requests per phase",
        "",
        "| phase | p50 ms | p99 ms | mean ms |",
        "| ----- | ------ | ------ | ------- |",
    ]
    lines += [f"| {name} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['mean_ms']:.3f} |" for name, v in rows]
    added = r["image_search_added_pct_p50"]
    lines.append("")
    lines.append(
        f"search by image adds {added:+.1f}% to /v1/embed at p50 (target <= 10%: "
        f"{'met' if added <= 10 else 'not met'}); search by vector is "
        f"{r['http']['search_vector']['p50_ms'] - r['http']['healthz']['p50_ms']:.3f} ms over /healthz at p50"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", type=int, default=1_000_000, help="indexed vectors")
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", default="auto", help="index kind for supmae-embed index (default: auto)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--requests", type=int, default=1000, help="timed requests per phase")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (torch intra-op)")
    p.add_argument("--work", type=Path, default=Path("/tmp/supmae-search-bench"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    name = f"bundled-synthetic-{args.synthetic}-c{args.centres}-s{args.sigma}"
    log(f"feature set {name}")
    queries = write_set(args.work / name, args.synthetic, args.centres, args.sigma, args.seed)
    index_dir = args.work / f"{name}-index-{args.kind}"
    if not (index_dir / "index.json").exists():
        log(f"building the index ({args.kind})")
        build(args.work / name, index_dir, args.kind, 0)
    manifest = json.loads((index_dir / "index.json").read_text())
    load_before = os.getloadavg()
    log("in-process FAISS")
    faiss_lat = time_faiss(index_dir, queries, args.top_k, args.requests)
    log("starting supmae-serve")
    server_log = args.work / "server.log"
    extra = ["--index", str(index_dir), "--search-threads", "1"]
    proc, base = start_server(DEFAULT_MODEL, extra, args.threads, server_log)
    try:
        wait_ready(proc, base)
        log("HTTP phases")
        http = time_http(base, queries, test_image(32), args.top_k, args.requests, args.warmup)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    embed_p50, search_p50 = http["embed_image"]["p50_ms"], http["search_image"]["p50_ms"]
    result = {
        "index": {k: manifest[k] for k in ("count", "dim", "kind", "faiss", "params")},
        "faiss": faiss_lat,
        "http": http,
        "image_search_added_pct_p50": 100 * (search_p50 - embed_p50) / embed_p50,
        "env": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "command": " ".join(sys.argv),
            "server_threads": args.threads,
        },
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(report(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
