"""The FAISS index over feature sets: build, extend, load, search.

Similarity is cosine: vectors are L2-normalised and searched by inner product. Which index a size gets
(exact, HNSW or IVF-Flat), the search setting tuned to a recall target and the recall recorded in the
manifest: `features/index_choice.py`.

The folder: `index.json` (the manifest: kind, faiss key, parameters, count, dim, build time and memory,
recall, the model's identity, the feature sets it holds), `index-NNNNNN.faiss` and `meta-NNNNNN.parquet`
(id, label, source per vector, in index order). Adding feature sets writes generation N + 1 and then
the manifest, so a reader (or a crash) only ever sees a complete generation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supmae_serve.common.files import atomic_write, atomic_write_text
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
from .index_choice import (
    EXACT_MAX_FLOATS,  # noqa: F401 - the index's public names stay importable from here
    KINDS,  # noqa: F401
    FeatureIndexError,
    IndexConfig,
    choose_index,
    create_index,
    faiss_key,
    held_back,
    import_faiss,
    ivf_nlist,  # noqa: F401
    recall_at_k,  # noqa: F401
    search_params,
    tune_and_measure,
)

FORMAT = "supmae-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
MAX_TOP_K = 1000


class QueryError(ValueError):
    """Bad search input (wrong dimension, non-finite values, top_k out of range); the message says what is
    expected. A server answers it with 422."""


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
    """A FAISS index over (N, D) vectors (L2-normalised here), chosen, built and tuned by the rules in
    `index_choice`'s docstring: (the index, its facts for a manifest: kind, faiss key, params, choice, build, recall).
    `build_index` writes it to a folder; an evaluation that searches once can keep it in memory."""
    n, dim = vectors.shape
    kind, params, why = choose_index(n, dim, cfg)
    started, t0 = now_iso(), time.perf_counter()
    x = np.ascontiguousarray(l2_normalize(vectors))  # (N, D) float32
    index = create_index(kind, params, dim)
    if kind == "ivf":
        tune, evaluate = held_back(n, cfg)
        rest = np.setdiff1d(np.arange(n), np.concatenate([tune, evaluate]))
        rng = np.random.default_rng(cfg.seed + 1)
        train = rng.choice(rest, size=min(len(rest), params["train_size"]), replace=False)
        index.train(x[np.sort(train)])
    index.add(x)
    build_s = time.perf_counter() - t0
    params, recall = tune_and_measure(index, kind, params, x, cfg)
    return index, {
        "kind": kind,
        "faiss": faiss_key(kind, params),
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
    params, recall = tune_and_measure(idx.index, old["kind"], old.get("params", {}), x, cfg)
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
            q, k, params=search_params(self.kind, self.manifest.get("params", {}), k)
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
