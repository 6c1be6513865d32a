"""retrieval: image retrieval by label agreement. The held-out queries search a FAISS index of the training
images' features (supmae_serve.features.index, the index `supmae-embed index` builds, here held in memory);
a neighbour is relevant when its class is the query's. Reported: precision@k, mAP@k (each query's AP divided
by min(images of its class in the index, k)), and, next to them, the k-NN accuracy that `knn` gives on the
same features and split. All in percent."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch

from supmae_serve.common.optional import MissingDependency
from supmae_serve.features.index import KINDS, MAX_TOP_K, FeatureIndex, IndexConfig, QueryError, index_vectors
from supmae_serve.features.retrieval import mean_average_precision, precision_at_k

from .common import Outputs, RunConfig, feature_task, load
from .datasets import DataSpec, Split
from .errors import EvalError
from .knn import knn_accuracy
from .results import EvalResult, make_result


def _check_depths(precision_at: Sequence[int], map_at: int) -> int:
    depths = [*precision_at, map_at]
    if not precision_at or any(isinstance(d, bool) or not 1 <= int(d) <= MAX_TOP_K for d in depths):
        raise EvalError(
            f"precision@k and mAP@k need k from 1 to {MAX_TOP_K} (the index's top_k limit), "
            f"got precision at {list(precision_at)} and mAP at {map_at}"
        )
    return max(int(d) for d in depths)


def _check_settings(precision_at: Sequence[int], map_at: int, k: int, temperature: float, kind: str) -> None:
    """Refuse a bad setting before any image is encoded."""
    _check_depths(precision_at, map_at)
    if kind not in KINDS:
        raise EvalError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if k < 1 or temperature <= 0:
        raise EvalError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")


def build_memory_index(tr: Outputs, split: Split, kind: str = "auto") -> FeatureIndex:
    """The training features in a FAISS index chosen and built as `supmae-embed index` builds one (exact
    below its size threshold, HNSW or IVF above), kept in memory; labels are class names, ids the paths."""
    try:
        index, facts = index_vectors(tr.embeddings.numpy(), IndexConfig(kind=kind))
    except MissingDependency as e:
        raise EvalError(str(e)) from e
    ids = [str(p) for p, _ in split.samples]
    labels = [split.class_names[int(y)] for y in tr.labels]
    manifest = {"count": int(index.ntotal), "dim": int(index.d), **facts}
    return FeatureIndex(None, manifest, index, ids, labels, list(ids))


def retrieval_scores(
    index: FeatureIndex,
    queries: torch.Tensor,
    query_labels: Sequence[str],
    precision_at: Sequence[int],
    map_at: int,
) -> dict[str, float]:
    """{"P@k": ..., "mAP@k": ...} in percent: each query searches `index`; relevance is label agreement."""
    depth = _check_depths(precision_at, map_at)
    try:
        _, pos = index.search_arrays(queries.numpy(), depth)
    except QueryError as e:  # e.g. an all-zero embedding
        raise EvalError(f"cannot search with the test features: {e}") from e
    found = [[index.labels[p] for p in row if p >= 0] for row in pos]  # neighbour class names, best first
    in_index = Counter(index.labels)
    out = {f"P@{k}": 100.0 * precision_at_k(query_labels, found, int(k)) for k in precision_at}
    relevant = [in_index.get(q, 0) for q in query_labels]
    out[f"mAP@{map_at}"] = 100.0 * mean_average_precision(
        query_labels, [row[:map_at] for row in found], num_relevant=relevant
    )
    return out


def evaluate_retrieval(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    precision_at: Sequence[int] = (1, 10, 100),
    map_at: int = 100,
    k: int = 20,
    temperature: float = 0.07,
    index_kind: str = "auto",
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """Precision@k and mAP@`map_at` of label agreement for the test split's images searching an index of the
    training split's, and the weighted k-NN top-1 (`k`, `temperature`, as the knn task) on the same features."""
    t0 = time.perf_counter()
    _check_settings(precision_at, map_at, k, temperature, index_kind)
    loaded = load(checkpoint, run, name)
    ft = feature_task(loaded, data, train, run, "retrieval", parts=("index", "queries"))
    t1 = time.perf_counter()
    index = build_memory_index(ft.tr, ft.train, index_kind)
    t2 = time.perf_counter()
    query_labels = [ft.train.class_names[y] for y in ft.test_y.tolist()]
    scores = retrieval_scores(index, ft.te.embeddings, query_labels, precision_at, map_at)
    search_s = time.perf_counter() - t2
    knn = knn_accuracy(loaded, ft.tr, ft.te, ft.test_y, len(ft.train.class_names), k, temperature)
    summary = {"index": len(index), "queries": len(ft.te.labels), "search": index.manifest["faiss"], **scores}
    summary[f"{k}-NN top-1"] = knn[1]
    details = {
        **{key.lower().replace("@", "_at_"): v for key, v in scores.items()},
        "knn_top1": knn[1],
        "knn_top5": knn[5],
        "index": {key: index.manifest[key] for key in ("kind", "faiss", "params", "choice", "recall")},
        "index_seconds": t2 - t1,
        "search_seconds": search_s,
        "queries_per_second": len(ft.te.labels) / search_s if search_s > 0 else None,
        "class_counts": np.bincount(ft.tr.labels.numpy(), minlength=len(ft.train.class_names)).tolist(),
        "seconds": time.perf_counter() - t0,
    }
    config = {
        "precision_at": [int(x) for x in precision_at],
        "map_at": map_at,
        "k": k,
        "temperature": temperature,
        "index_kind": index_kind,
        "relevance": "label agreement (the neighbour's class is the query's)",
        "run": asdict(run),
    }
    return make_result("retrieval", loaded, summary, details, config, ft.data, ft.tag)
