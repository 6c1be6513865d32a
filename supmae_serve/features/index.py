"""The FAISS index over feature sets: build, extend, load, search.

Similarity is cosine: vectors are L2-normalised and searched by inner product. Which index:

- **exact** (`IndexFlatIP`) while N x D <= `exact_max_floats` (2^24 = 16.8 M floats, 64 MiB: 87k vectors
  of 192-d, 22k of 768-d). A query then scans at most 64 MiB, a few milliseconds on one core of the 2-core
  dev CPU (measured with faiss 1.15: 2.2 ms for 50k x 192, 8.5 ms for 100k x 192), with recall 1 and no
  training. The threshold is on N x D, not N, because that is what a query costs. (autofaiss switches
  at 1,000 vectors, where an exact scan stops being the fastest; we keep exact results while they are cheap.)
- **HNSW** (`IndexHNSWFlat`, M links per vector) above it, autofaiss's first choice when memory allows: about
  4 x (D + 2M) bytes per vector; M = min(32, (budget / 4N - D) / 2), needing M >= 8. No training, fast
  queries; efSearch is tuned after the build.
- **IVF-Flat** when HNSW does not fit the memory budget: nlist clusters as autofaiss picks them
  (4 sqrt(N) rounded to a power of two below 1M vectors, 16,384 up to 10M, 65,536 beyond), k-means trained on
  100 points per cluster (faiss wants 30 to 256); nprobe is tuned after the build. Compressed (PQ) indexes are
  not built: if IVF-Flat does not fit either, the build stops and says how much memory it needs.

Tuning and the recall in the manifest: two disjoint seeded samples of the vectors are held back from the
k-means training; on the first, efSearch / nprobe is raised until recall@10 against exact search reaches the
target (0.95); the second measures the recall@10 recorded in `index.json`. Each query is one of the indexed
vectors, so its own entry is dropped from both result lists (leave-one-out): the recall is over its ten true
neighbours, not inflated by finding itself.

The folder: `index.json` (the manifest: kind, faiss key, parameters, count, dim, build time and memory,
recall, the model's identity, the feature sets it holds), `index-NNNNNN.faiss` and `meta-NNNNNN.parquet`
(id, label, source per vector, in index order). Adding feature sets writes generation N + 1 and then
the manifest, so a reader (or a crash) only ever sees a complete generation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supmae_serve.common.files import atomic_write, atomic_write_text
from supmae_serve.common.optional import require
from supmae_serve.common.system import peak_rss_bytes
from supmae_serve.common.versions import package_versions

from .featureset import (
    Features,
    FeatureSet,
    ManifestFacts,
    import_pyarrow,
    l2_normalize,
    now_iso,
    read_manifest,
)
from .gallery import merge_sources, relative_sources, sources_record
from .identity import ModelIdentity, check_identity

FORMAT = "supmae-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
KINDS = ("auto", "flat", "hnsw", "ivf")
EXACT_MAX_FLOATS = 1 << 24
RECALL_K = 10
MAX_TOP_K = 1000
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)


class FeatureIndexError(ValueError):
    """An index that cannot be built, extended or loaded as asked; the message says what and why."""


class QueryError(ValueError):
    """Bad search input (wrong dimension, non-finite values, top_k out of range); the message says what is
    expected. A server answers it with 422."""


def import_faiss():
    return require("faiss", "the index")


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # auto | flat | hnsw | ivf
    exact_max_floats: int = EXACT_MAX_FLOATS
    max_memory_bytes: int = 16 << 30  # autofaiss's default budget
    recall_target: float = 0.95
    tune_queries: int = 500
    eval_queries: int = 1000
    hnsw_m: int = 0  # 0: from the size and the memory budget
    ef_construction: int = 40  # faiss's default
    nlist: int = 0  # 0: from the size
    seed: int = 0
    threads: int = 0  # faiss OpenMP threads (0: faiss's default)
    relative_sources: bool = False  # store sources relative to the index folder (features/gallery.py)
    command: str = ""  # the command line that built the index, recorded in its manifest

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FeatureIndexError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.recall_target <= 1:
            raise FeatureIndexError(f"recall target must be in (0, 1], got {self.recall_target}")


# ---------------------------------------------------------------------------- choosing the index
def ivf_nlist(n: int) -> int:
    """autofaiss's first recommendation for the number of IVF clusters."""
    if n < 1_000_000:
        return max(1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return 16_384 if n < 10_000_000 else 65_536


def choose_index(n: int, dim: int, cfg: IndexConfig = IndexConfig()) -> tuple[str, dict[str, Any], str]:
    """(kind, parameters, why) for n vectors of dim, by the rules in this module's docstring."""
    floats = n * dim
    kind = cfg.kind
    if kind == "auto" and floats <= cfg.exact_max_floats:
        return "flat", {}, f"N x D = {floats:,} <= {cfg.exact_max_floats:,}: exact search is cheap enough"
    if kind == "flat":
        return "flat", {}, "asked for"
    budget = cfg.max_memory_bytes
    m = cfg.hnsw_m or min(32, int((budget / (4 * n) - dim) // 2))
    if kind == "hnsw" or (kind == "auto" and m >= 8):
        m = max(m, 4)
        need = 4 * n * (dim + 2 * m)
        why = (
            "asked for"
            if kind == "hnsw"
            else (
                f"N x D = {floats:,} > {cfg.exact_max_floats:,}; HNSW{m} needs about {need / 2**20:,.0f} MiB, "
                f"within the {budget / 2**30:g} GiB budget"
            )
        )
        return "hnsw", {"M": m, "efConstruction": cfg.ef_construction}, why
    nlist = cfg.nlist or min(ivf_nlist(n), max(1, n // 39))
    need = n * (4 * dim + 8)
    if kind == "auto" and need > budget:
        raise FeatureIndexError(
            f"{n:,} vectors of {dim} floats need about {need / 2**30:.1f} GiB as IVF-Flat (HNSW needs more), over "
            f"the {budget / 2**30:g} GiB budget; raise --max-memory (compressed PQ indexes are not built here)"
        )
    why = (
        "asked for"
        if kind == "ivf"
        else (
            f"HNSW does not fit the {budget / 2**30:g} GiB budget (M would be {m} < 8); IVF-Flat needs about "
            f"{need / 2**20:,.0f} MiB"
        )
    )
    return "ivf", {"nlist": nlist, "train_size": min(n, 100 * nlist)}, why


def _faiss_key(kind: str, params: dict) -> str:
    return {"flat": "Flat", "hnsw": f"HNSW{params.get('M')}", "ivf": f"IVF{params.get('nlist')},Flat"}[kind]


def _create(kind: str, params: dict, dim: int):
    faiss = import_faiss()
    index = faiss.index_factory(dim, _faiss_key(kind, params), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = int(params["efConstruction"])
    return index


def _search_params(kind: str, params: dict, top_k: int):
    faiss = import_faiss()
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(int(params.get("efSearch", 16)), top_k))
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 1)))
    return None


# ---------------------------------------------------------------------------- recall
def _held_back(n: int, cfg: IndexConfig) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded samples of positions: for tuning, and for the recall recorded (shrunk in
    proportion when there are fewer vectors than both ask for)."""
    wanted = cfg.tune_queries + cfg.eval_queries
    total = min(n, wanted)
    pick = np.random.default_rng(cfg.seed).choice(n, size=total, replace=False)
    n_tune = round(total * cfg.tune_queries / wanted) if wanted else 0
    return np.sort(pick[:n_tune]), np.sort(pick[n_tune:])


def _drop_self(found: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """(Q, k + 1) results -> (Q, k) without each query's own position (or the last, when it was not found)."""
    out = np.empty((found.shape[0], k), dtype=np.int64)
    for r, (row, own) in enumerate(zip(found, positions, strict=True)):
        keep = row[row != own]
        out[r] = keep[:k]
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    k = exact.shape[1]
    return float(
        np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact, strict=True)])
    )


def _exact_neighbours(x: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    faiss = import_faiss()
    _, found = faiss.knn(x[positions], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _drop_self(found, positions, k)


def _approx_neighbours(index, kind, params, x, positions, k) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    _, found = index.search(x[positions], k + 1, params=_search_params(kind, params, k + 1))
    ms = (time.perf_counter() - t0) * 1000 / max(1, len(positions))
    return _drop_self(found, positions, k), ms


def _tune_and_measure(index, kind: str, params: dict, x: np.ndarray, cfg: IndexConfig) -> tuple[dict, dict]:
    """Raise efSearch / nprobe until the tuning sample's recall@10 reaches the target; measure recall@10 on the
    evaluation sample. Returns (parameters with the search setting, the recall record)."""
    k = min(RECALL_K, len(x) - 1)
    tune, evaluate = _held_back(len(x), cfg)
    if kind == "flat" or k < 1 or len(evaluate) == 0:
        return params, {"k": RECALL_K, "recall_at_k": 1.0, "method": "exact search", "queries": 0}
    name, values = ("efSearch", EF_SEARCH) if kind == "hnsw" else ("nprobe", _nprobes(params["nlist"]))
    tuning, chosen = [], values[-1]
    if len(tune):
        truth = _exact_neighbours(x, tune, k)
        for v in values:
            found, ms = _approx_neighbours(index, kind, {**params, name: v}, x, tune, k)
            r = recall_at_k(found, truth)
            tuning.append({name: v, "recall_at_k": round(r, 4), "ms_per_query": round(ms, 4)})
            if r >= cfg.recall_target:
                chosen = v
                break
    params = {**params, name: chosen}
    found, ms = _approx_neighbours(index, kind, params, x, evaluate, k)
    r = recall_at_k(found, _exact_neighbours(x, evaluate, k))
    record = {
        "k": k,
        "recall_at_k": round(r, 4),
        "target": cfg.recall_target,
        "met": r >= cfg.recall_target,
        "queries": len(evaluate),
        "tuning_queries": len(tune),
        "tuned": name,
        "tuning": tuning,
        "ms_per_query_batched": round(ms, 4),
        "method": "leave-one-out: held-back indexed vectors as queries, each one's own entry dropped; "
        "tuned on one sample, measured on another",
        "seed": cfg.seed,
    }
    return params, record


def _nprobes(nlist: int) -> list[int]:
    out, v = [], 1
    while v < nlist:
        out.append(v)
        v *= 2
    return out + [nlist]


# ---------------------------------------------------------------------------- building
def _read_sets(paths: Sequence[str | Path]) -> tuple[list[FeatureSet], Features, ModelIdentity]:
    if not paths:
        raise FeatureIndexError("no feature sets given")
    sets = [FeatureSet.open(p) for p in paths]
    first = sets[0].identity.with_normalized(True)  # the index normalises every vector
    for s in sets[1:]:
        check_identity(
            first,
            s.identity.with_normalized(True),
            what=f"feature set {sets[0].path}",
            other=f"feature set {s.path}",
        )
    parts = [s.read() for s in sets]
    feats = Features(
        ids=[i for p in parts for i in p.ids],
        labels=[x for p in parts for x in p.labels],
        sources=[x for p in parts for x in p.sources],
        embeddings=np.concatenate([p.embeddings for p in parts])
        if parts
        else np.zeros((0, first.dim), np.float32),
    )
    return sets, feats, first


def _duplicates(ids: Sequence[str], existing: set[str] | None = None) -> list[str]:
    seen, dup = set(existing or ()), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    return dup


def _refuse_duplicates(dup: list[str], where: str) -> None:
    if dup:
        raise FeatureIndexError(
            f"{len(dup)} ids would be in the index twice ({where}), e.g. {', '.join(sorted(set(dup))[:5])}; "
            "ids identify search results, so each must be unique: embed the collections with distinct roots"
        )


def _set_threads(cfg: IndexConfig) -> None:
    if cfg.threads:
        import_faiss().omp_set_num_threads(cfg.threads)


def index_vectors(vectors: np.ndarray, cfg: IndexConfig = IndexConfig()) -> tuple[Any, dict[str, Any]]:
    """A FAISS index over (N, D) vectors (L2-normalised here), chosen, built and tuned by the rules in this
    module's docstring: (the index, its facts for a manifest: kind, faiss key, params, choice, build, recall).
    `build_index` writes it to a folder; an evaluation that searches once can keep it in memory."""
    n, dim = vectors.shape
    kind, params, why = choose_index(n, dim, cfg)
    started, t0 = now_iso(), time.perf_counter()
    x = np.ascontiguousarray(l2_normalize(vectors))  # (N, D) float32
    index = _create(kind, params, dim)
    if kind == "ivf":
        tune, evaluate = _held_back(n, cfg)
        rest = np.setdiff1d(np.arange(n), np.concatenate([tune, evaluate]))
        rng = np.random.default_rng(cfg.seed + 1)
        train = rng.choice(rest, size=min(len(rest), params["train_size"]), replace=False)
        index.train(x[np.sort(train)])
    index.add(x)
    build_s = time.perf_counter() - t0
    params, recall = _tune_and_measure(index, kind, params, x, cfg)
    return index, {
        "kind": kind,
        "faiss": _faiss_key(kind, params),
        "params": params,
        "choice": {
            "rule": f"exact while N x D <= {cfg.exact_max_floats:,}, else HNSW, else IVF-Flat",
            "why": why,
        },
        "build": {
            "seconds": round(build_s, 3),
            "seconds_with_tuning": round(time.perf_counter() - t0, 3),
            "threads": _faiss_threads(),
            "started": started,
        },
        "recall": recall,
    }


def build_index(
    feature_sets: Sequence[str | Path], out: str | Path, cfg: IndexConfig = IndexConfig()
) -> dict[str, Any]:
    """Build an index over one or more feature sets of the same model; returns the manifest written."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise FeatureIndexError(
            f"{out} already holds an index; add to it with --add, or choose another --out"
        )
    _set_threads(cfg)
    sets, feats, identity = _read_sets(feature_sets)
    _refuse_duplicates(_duplicates(feats.ids), "within the feature sets given")
    n = len(feats.embeddings)
    if n == 0:
        raise FeatureIndexError("the feature sets hold no vectors")
    rss0 = peak_rss_bytes()
    index, facts = index_vectors(feats.embeddings, cfg)
    return _write_generation(
        out,
        index,
        relative_sources(feats, out) if cfg.relative_sources else feats,
        {
            **facts,
            "build": {**facts["build"], "peak_rss_bytes": peak_rss_bytes(), "peak_rss_bytes_before": rss0},
            "model": identity.to_dict(),
            "feature_sets": [_describe_set(s) for s in sets],
            "sources": sources_record(sets, out, cfg.relative_sources),
            "command": cfg.command,
            "history": [
                {"action": "build", "count": n, "at": now_iso(), "feature_sets": [str(s.path) for s in sets]}
            ],
        },
        generation=1,
    )


def _faiss_threads() -> int:
    return int(import_faiss().omp_get_max_threads())


def _describe_set(s: FeatureSet) -> dict[str, Any]:
    return {"path": str(s.path.resolve()), "count": len(s), "finished": s.manifest.get("finished")}


def _write_generation(
    out: Path, index, meta: Features, manifest: dict, generation: int, old: dict | None = None
) -> dict:
    """Write index-G.faiss + meta-G.parquet, then index.json pointing at them, then drop the old generation."""
    faiss, pa = import_faiss(), import_pyarrow()
    out.mkdir(parents=True, exist_ok=True)
    files = {"index": f"index-{generation:06d}.faiss", "meta": f"meta-{generation:06d}.parquet"}
    atomic_write(out / files["index"], lambda tmp: faiss.write_index(index, str(tmp)))
    table = pa.table(
        {
            "id": pa.array(meta.ids, pa.string()),
            "label": pa.array(meta.labels, pa.string()),
            "source": pa.array(meta.sources, pa.string()),
        }
    )
    atomic_write(out / files["meta"], lambda tmp: pa.parquet.write_table(table, tmp))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "files": files,
        "metric": "inner product on L2-normalised vectors (cosine similarity)",
        "count": int(index.ntotal),
        "dim": int(index.d),
        **manifest,
        "software": package_versions(["supmae", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy"]),
        "updated": now_iso(),
    }
    manifest["build"] = {**manifest.get("build", {}), "index_bytes": (out / files["index"]).stat().st_size}
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    if old is not None:
        for name in old.get("files", {}).values():
            if name not in files.values():
                (out / name).unlink(missing_ok=True)
    return manifest


def read_index_manifest(path: str | Path) -> dict[str, Any]:
    return read_manifest(
        Path(path) / MANIFEST_NAME,
        FORMAT,
        FORMAT_VERSION,
        FeatureIndexError,
        "an index; build one with `supmae-embed index`",
    )


def add_to_index(
    path: str | Path, feature_sets: Sequence[str | Path], cfg: IndexConfig = IndexConfig()
) -> dict[str, Any]:
    """Add feature sets of the same model to an existing index (flat, HNSW or IVF: faiss adds to each without
    rebuilding). Refused, with the reason, for another model's vectors, ids already in the index, or a set
    already added. Recall is measured again (and efSearch / nprobe raised if it fell below the target)."""
    path = Path(path)
    _set_threads(cfg)
    idx = FeatureIndex.load(path)
    old = idx.manifest
    have = {s["path"] for s in old.get("feature_sets", [])}
    again = [str(Path(p).resolve()) for p in feature_sets if str(Path(p).resolve()) in have]
    if again:
        raise FeatureIndexError(f"already in this index: {', '.join(again)}")
    sets, feats, identity = _read_sets(feature_sets)
    check_identity(idx.identity, identity, what=f"index {path}", other=f"feature set {sets[0].path}")
    _refuse_duplicates(_duplicates(feats.ids, set(idx.ids)), f"between {path} and the sets added")
    relative = bool((old.get("sources") or {}).get("relative_to_index"))
    feats = relative_sources(feats, path) if relative else feats
    t0 = time.perf_counter()
    idx.index.add(np.ascontiguousarray(l2_normalize(feats.embeddings)))
    add_s = time.perf_counter() - t0
    x = _all_vectors(idx.index, old["kind"])
    params, recall = _tune_and_measure(idx.index, old["kind"], old.get("params", {}), x, cfg)
    merged = Features(
        idx.ids + feats.ids, idx.labels + feats.labels, idx.sources + feats.sources, np.zeros((0, 0))
    )
    notes = []
    n, dim = x.shape
    if old["kind"] == "flat" and n * dim > cfg.exact_max_floats:
        notes.append(
            f"now N x D = {n * dim:,} > {cfg.exact_max_floats:,}: still exact, but queries cost more; build a new "
            "index over all the feature sets for an approximate one"
        )
    if old["kind"] == "ivf":
        notes.append(
            "IVF clusters were trained on the first build's vectors; rebuild if the new data differs a lot"
        )
    fields = {k: v for k, v in old.items() if k not in ("files", "generation", "count", "dim")}
    fields.update(
        params=params,
        recall=recall,
        feature_sets=old.get("feature_sets", []) + [_describe_set(s) for s in sets],
        sources=merge_sources(old.get("sources"), sources_record(sets, path, relative)),
        history=old.get("history", [])
        + [
            {
                "action": "add",
                "count": len(feats),
                "seconds": round(add_s, 3),
                "at": now_iso(),
                "feature_sets": [str(s.path) for s in sets],
            }
        ],
        notes=notes,
    )
    return _write_generation(path, idx.index, merged, fields, int(old["generation"]) + 1, old)


def _all_vectors(index, kind: str) -> np.ndarray:
    if kind == "ivf":
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


# ---------------------------------------------------------------------------- loading and searching
@dataclass(frozen=True)
class Neighbor:
    id: str
    label: str | None
    score: float  # cosine similarity
    source: str


@dataclass
class FeatureIndex(ManifestFacts):
    """A loaded index: `search(vectors, top_k)`, its manifest, and the model identity it was built from."""

    path: Path | None  # None: an index held in memory only (built with `index_vectors`)
    manifest: dict[str, Any]
    index: Any  # the faiss index
    ids: list[str] = field(repr=False)
    labels: list[str | None] = field(repr=False)
    sources: list[str] = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> FeatureIndex:
        path = Path(path)
        manifest = read_index_manifest(path)
        faiss, pa = import_faiss(), import_pyarrow()
        files = manifest["files"]
        for f in files.values():
            if not (path / f).exists():
                raise FeatureIndexError(f"{path / f}: listed in {MANIFEST_NAME} but missing")
        index = faiss.read_index(str(path / files["index"]))
        meta = pa.parquet.read_table(path / files["meta"])
        if index.ntotal != manifest["count"] or len(meta) != manifest["count"]:
            raise FeatureIndexError(
                f"{path}: the manifest says {manifest['count']} vectors, the index holds {index.ntotal} and the "
                f"metadata {len(meta)}; rebuild the index"
            )
        return cls(
            path,
            manifest,
            index,
            meta.column("id").to_pylist(),
            meta.column("label").to_pylist(),
            meta.column("source").to_pylist(),
        )

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def describe(self) -> dict[str, Any]:
        """What a server's /v1/info shows about the index."""
        m = self.manifest
        return {
            "path": str(self.path),
            "kind": m["kind"],
            "faiss": m.get("faiss"),
            "count": m["count"],
            "dim": m["dim"],
            "params": m.get("params", {}),
            "recall": {k: m.get("recall", {}).get(k) for k in ("k", "recall_at_k", "queries")},
            "model": {
                k: m["model"].get(k) for k in ("variant", "weights_sha256", "pooling", "normalized", "dim")
            },
            "updated": m.get("updated"),
        }

    def check_queries(self, vectors: Any, top_k: int) -> np.ndarray:
        """Validate and L2-normalise query vectors -> (Q, D) float32; QueryError says what is expected."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= MAX_TOP_K:
            raise QueryError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
        try:
            q = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise QueryError(f"query vectors must be numbers: {e}") from e
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] != self.dim:
            raise QueryError(
                f"expected query vectors of dimension {self.dim} (this index's embeddings), got shape {tuple(np.shape(vectors))}"
            )
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        if len(bad):
            raise QueryError(
                f"query vector {int(bad[0])} has NaN or infinite values; every value must be finite"
            )
        zero = np.flatnonzero(np.linalg.norm(q, axis=1) == 0)
        if len(zero):
            raise QueryError(f"query vector {int(zero[0])} is all zeros: it has no direction to compare")
        return np.ascontiguousarray(l2_normalize(q))

    def search_arrays(self, vectors: Any, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), positions (Q, k)); position -1 where the index holds fewer than k vectors."""
        q = self.check_queries(vectors, top_k)
        k = min(top_k, len(self))
        scores, pos = self.index.search(
            q, k, params=_search_params(self.kind, self.manifest.get("params", {}), k)
        )
        return scores, pos

    def search(self, vectors: Any, top_k: int = 10) -> list[list[Neighbor]]:
        """The top_k most similar indexed images for each query vector (any scale: they are normalised)."""
        scores, pos = self.search_arrays(vectors, top_k)
        return [
            [
                Neighbor(self.ids[p], self.labels[p], float(s), self.sources[p])
                for s, p in zip(srow, prow, strict=True)
                if p >= 0
            ]
            for srow, prow in zip(scores, pos, strict=True)
        ]
