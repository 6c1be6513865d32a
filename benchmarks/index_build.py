"""Index build time, memory and recall: a real feature set (e.g. the 50,000 CIFAR-10 training images
embedded by supmae-embed) and 1,000,000 synthetic 192-d vectors drawn around 1,000 cluster centres.

    flock /tmp/supmae-bench.lock python benchmarks/index_build.py --features /tmp/cifar-feats --json index.json
    python benchmarks/index_build.py --synthetic 20000 --kinds auto     # quick look

Each index is built by `supmae-embed index` in its own process (so the peak RSS it records in index.json is
that build's alone), with the kind `auto` picks and, for comparison, the kinds given by --kinds. Columns:
- build s: adding (and for IVF training) only; "with tuning" adds the efSearch / nprobe search;
- index MiB: the index file (what search holds in memory); peak RSS: the building process's peak, which
  includes the feature set read into memory;
- recall@10 (manifest): what the build recorded, leave-one-out on held-back indexed vectors;
- recall@10 (fresh): queries that are not in the index (synthetic: new points around the same centres; a
  feature set: a held-out slice of it, indexed without that slice), against exact search;
- search ms: one query at a time, p50 and p99 over the fresh queries, in this process, one thread.
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

from supmae_serve.features.featureset import Features, FeatureSet, write_feature_set  # noqa: E402
from supmae_serve.features.identity import ModelIdentity  # noqa: E402
from supmae_serve.features.index import FeatureIndex, import_faiss, recall_at_k  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def synthetic(
    n: int, dim: int, centres: int, sigma: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors (n, dim), labels (n,), fresh queries (1000, dim)) around `centres` Gaussian centres."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    lab = rng.integers(0, centres, n)
    x = c[lab] + sigma * rng.standard_normal((n, dim), dtype=np.float32)
    q = c[rng.integers(0, centres, 1000)] + sigma * rng.standard_normal((1000, dim), dtype=np.float32)
    return x, lab, q


def write_synthetic(out: Path, n: int, dim: int, centres: int, sigma: float, seed: int) -> np.ndarray:
    x, lab, q = synthetic(n, dim, centres, sigma, seed)
    if not (out / "features.json").exists():
        ident = ModelIdentity("synthetic", "avg", False, dim, {}, "synthetic", "synthetic")
        feats = Features([f"{i:07d}" for i in range(n)], [f"c{v}" for v in lab], [""] * n, x)
        write_feature_set(
            out,
            feats,
            ident,
            shard_size=250_000,
            extra={"input": {"kind": "synthetic", "centres": centres, "sigma": sigma, "seed": seed}},
        )
    return q


def split_feature_set(src: Path, out: Path, held: int, seed: int) -> np.ndarray:
    """The feature set without `held` random rows (written to `out`), and those rows as fresh queries."""
    fs = FeatureSet.open(src)
    f = fs.read()
    rng = np.random.default_rng(seed)
    pick = np.zeros(len(f), bool)
    pick[rng.choice(len(f), held, replace=False)] = True
    if not (out / "features.json").exists():
        keep = np.flatnonzero(~pick)
        sub = Features(
            [f.ids[i] for i in keep],
            [f.labels[i] for i in keep],
            [f.sources[i] for i in keep],
            f.embeddings[keep],
        )
        write_feature_set(out, sub, fs.identity, shard_size=100_000)
    return f.embeddings[pick]


def build(features: Path, out: Path, kind: str, threads: int) -> dict:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [
        sys.executable,
        "-m",
        "supmae_serve.features.cli",
        "index",
        str(features),
        "--out",
        str(out),
        "--kind",
        kind,
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    t = time.perf_counter()
    r = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    m = json.loads((out / "index.json").read_text())
    m["command_wall_s"] = time.perf_counter() - t
    return m


def fresh_recall(index_dir: Path, features: Path, queries: np.ndarray) -> dict:
    faiss = import_faiss()
    idx = FeatureIndex.load(index_dir)
    x = FeatureSet.open(features).read().embeddings
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    _, exact = faiss.knn(
        qn, np.ascontiguousarray(xn, dtype=np.float32), 10, metric=faiss.METRIC_INNER_PRODUCT
    )
    _, approx = idx.search_arrays(qn, 10)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    lat = []
    for q in qn[:1000]:
        t = time.perf_counter()
        idx.search_arrays(q, 10)
        lat.append((time.perf_counter() - t) * 1000)
    faiss.omp_set_num_threads(threads)
    return {
        "recall_at_10": recall_at_k(approx, exact),
        "queries": len(qn),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--features", type=Path, help="a feature set to index (e.g. CIFAR-10 embedded by supmae-embed)"
    )
    p.add_argument("--held-out", type=int, default=1000, help="rows of --features kept out as fresh queries")
    p.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic vectors (0: none)")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument(
        "--sigma", type=float, default=0.5, help="per-dimension spread around a centre (centres are N(0, 1))"
    )
    p.add_argument("--kinds", nargs="+", default=["auto", "hnsw"], help="kinds to build for each data set")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/supmae-index-bench"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sets = []
    if args.features:
        log(f"splitting {args.features}: {args.held_out} rows held out as fresh queries")
        sub = args.work / f"{args.features.name}-minus{args.held_out}"
        sets.append(
            (args.features.name, sub, split_feature_set(args.features, sub, args.held_out, args.seed))
        )
    if args.synthetic:
        name = f"synthetic-{args.synthetic}x{args.dim}-c{args.centres}-s{args.sigma}"
        log(f"writing {name}")
        sets.append(
            (
                name,
                args.work / name,
                write_synthetic(
                    args.work / name, args.synthetic, args.dim, args.centres, args.sigma, args.seed
                ),
            )
        )
    rows = []
    load_before = os.getloadavg()
    for name, features, queries in sets:
        for kind in args.kinds:
            if kind != "auto" and any(r["data"] == name and r["kind"] == kind for r in rows):
                log(f"{name}: auto already built {kind}")
                continue
            log(f"{name}: building {kind}")
            out = args.work / f"{name}-index-{kind}"
            m = build(features, out, kind, args.threads)
            log(f"{name}: {m['kind']} built in {m['build']['seconds']} s; fresh-query recall")
            fresh = fresh_recall(out, features, queries)
            rows.append({
                "data": name, "asked": kind, "kind": m["kind"], "faiss": m["faiss"], "count": m["count"],
                "params": m["params"], "why": m["choice"]["why"], "build_s": m["build"]["seconds"],
                "build_with_tuning_s": m["build"]["seconds_with_tuning"], "command_wall_s": round(m["command_wall_s"], 1),
                "index_bytes": m["build"]["index_bytes"], "peak_rss_bytes": m["build"]["peak_rss_bytes"],
                "threads": m["build"]["threads"], "recall_manifest": m["recall"]["recall_at_k"],
                "recall_queries": m["recall"].get("queries"), "recall_fresh": fresh["recall_at_10"],
                "fresh_queries": fresh["queries"], "search_p50_ms": fresh["p50_ms"], "search_p99_ms": fresh["p99_ms"],
            })  # fmt: skip
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "command": " ".join(sys.argv),
    }
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\nload {load_before[0]:.1f} -> {env['loadavg_after'][0]:.1f}")
    print(
        "| data | N | kind | params | build s (+ tuning) | index MiB | peak RSS MiB | recall@10 manifest | recall@10 fresh | search p50 / p99 ms |"
    )
    print(
        "| ---- | - | ---- | ------ | ------------------ | --------- | ------------ | ------------------ | --------------- | ------------------- |"
    )
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        print(
            f"| {r['data']} | {r['count']:,} | {r['faiss']} ({r['asked']}) | {params} | {r['build_s']:.1f} ({r['build_with_tuning_s']:.1f}) | "
            f"{r['index_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['recall_manifest']:.4f} | "
            f"{r['recall_fresh']:.4f} | {r['search_p50_ms']:.3f} / {r['search_p99_ms']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
