"""Which FAISS index for a size and a memory budget, and its search setting tuned to a recall target.

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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from supmae_serve.common.optional import require

KINDS = ("auto", "flat", "hnsw", "ivf")
EXACT_MAX_FLOATS = 1 << 24
RECALL_K = 10
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)


class FeatureIndexError(ValueError):
    """An index that cannot be built, extended or loaded as asked; the message says what and why."""


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


def faiss_key(kind: str, params: dict) -> str:
    return {"flat": "Flat", "hnsw": f"HNSW{params.get('M')}", "ivf": f"IVF{params.get('nlist')},Flat"}[kind]


def create_index(kind: str, params: dict, dim: int):
    faiss = import_faiss()
    index = faiss.index_factory(dim, faiss_key(kind, params), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = int(params["efConstruction"])
    return index


def search_params(kind: str, params: dict, top_k: int):
    faiss = import_faiss()
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(int(params.get("efSearch", 16)), top_k))
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 1)))
    return None


# ---------------------------------------------------------------------------- recall
def held_back(n: int, cfg: IndexConfig) -> tuple[np.ndarray, np.ndarray]:
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
    _, found = index.search(x[positions], k + 1, params=search_params(kind, params, k + 1))
    ms = (time.perf_counter() - t0) * 1000 / max(1, len(positions))
    return _drop_self(found, positions, k), ms


def tune_and_measure(index, kind: str, params: dict, x: np.ndarray, cfg: IndexConfig) -> tuple[dict, dict]:
    """Raise efSearch / nprobe until the tuning sample's recall@10 reaches the target; measure recall@10 on the
    evaluation sample. Returns (parameters with the search setting, the recall record)."""
    k = min(RECALL_K, len(x) - 1)
    tune, evaluate = held_back(len(x), cfg)
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
