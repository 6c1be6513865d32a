"""The FAISS index: the choice of index, exact and approximate search against brute force, the recall in the
manifest, adding feature sets (and the refusals), query errors, and the model-identity check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from supmae_serve.features.featureset import Features, write_feature_set
from supmae_serve.features.identity import IdentityError, ModelIdentity, compare_identity, model_identity
from supmae_serve.features.index import (
    MAX_TOP_K,
    FeatureIndex,
    FeatureIndexError,
    IndexConfig,
    QueryError,
    add_to_index,
    build_index,
    choose_index,
    ivf_nlist,
    recall_at_k,
)
from supmae_serve.model import load_model_card, save_checkpoint

from .conftest import tiny_model

pytest.importorskip("faiss", reason="the index needs faiss: pip install 'supmae[features]'")
pytest.importorskip("pyarrow", reason="feature sets need pyarrow: pip install 'supmae[features]'")

DIM = 32
IDENT = ModelIdentity("ab" * 32, "avg", True, DIM, {"image_size": 32}, "micro_patch4_32", "supmae")


def clustered(n: int, seed: int = 0, centres: int = 50, dim: int = DIM) -> np.ndarray:
    """Points around the same `centres` cluster centres whatever the seed (the seed draws the points)."""
    c = np.random.default_rng(12345).standard_normal((centres, dim))
    rng = np.random.default_rng(seed)
    return (c[rng.integers(0, centres, n)] + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)


def feature_set(path: Path, x: np.ndarray, prefix: str = "img", identity: ModelIdentity = IDENT):
    n = len(x)
    feats = Features(
        ids=[f"{prefix}/{i:05d}.png" for i in range(n)],
        labels=[f"c{i % 7}" for i in range(n)],
        sources=[f"/data/{prefix}/{i:05d}.png" for i in range(n)],
        embeddings=x,
    )
    return write_feature_set(path, feats, identity, shard_size=700)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


def test_choice_follows_the_size_and_the_memory_budget():
    assert choose_index(80_000, 192)[0] == "flat"  # N x D = 15.4 M <= 2^24
    kind, params, why = choose_index(1_000_000, 192)
    assert (kind, params["M"]) == ("hnsw", 32) and "HNSW32" in why
    kind, params, _ = choose_index(
        1_000_000, 192, IndexConfig(max_memory_bytes=1 << 30)
    )  # 1 GiB: M = 38 -> 32
    assert (kind, params["M"]) == ("hnsw", 32)
    kind, params, why = choose_index(
        1_000_000, 192, IndexConfig(max_memory_bytes=780 << 20)
    )  # M = 6 < 8: IVF
    assert (
        kind == "ivf"
        and params["nlist"] == 16_384
        and params["train_size"] == 1_000_000
        and "IVF-Flat" in why
    )
    assert ivf_nlist(50_000) == 1024 and ivf_nlist(1_000) == 128
    with pytest.raises(FeatureIndexError, match=r"need about .* GiB .*raise --max-memory"):
        choose_index(1_000_000, 192, IndexConfig(max_memory_bytes=100 << 20))
    assert choose_index(10, 8, IndexConfig(kind="hnsw"))[0] == "hnsw"


def test_exact_index_searches_like_brute_force(tmp_path):
    x = clustered(600)
    feature_set(tmp_path / "fs", x)
    m = build_index([tmp_path / "fs"], tmp_path / "idx")
    assert (m["kind"], m["count"], m["dim"], m["recall"]["recall_at_k"]) == ("flat", 600, DIM, 1.0)
    assert m["model"]["weights_sha256"] == IDENT.weights_sha256 and m["build"]["index_bytes"] > 600 * DIM * 4
    idx = FeatureIndex.load(tmp_path / "idx")
    q = clustered(5, seed=9)
    res = idx.search(q * 3.0, top_k=4)  # queries of any scale
    want = brute_force(x, q, 4)
    assert [[int(n.id[4:9]) for n in r] for r in res] == want.tolist()
    n = res[0][0]
    assert n.label == f"c{int(n.id[4:9]) % 7}" and n.source == f"/data/{n.id}" and -1 <= n.score <= 1.0001
    assert len(idx.search(q[0], top_k=MAX_TOP_K)[0]) == 600  # fewer vectors than top_k: all of them
    d = idx.describe()  # what a server shows about its index
    assert (d["kind"], d["count"], d["dim"], d["recall"]["recall_at_k"]) == ("flat", 600, DIM, 1.0)
    assert d["model"]["weights_sha256"] == IDENT.weights_sha256 and d["model"]["pooling"] == "avg"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_is_tuned_to_the_recall_target(tmp_path, kind):
    x = clustered(4000, seed=1)
    feature_set(tmp_path / "fs", x)
    cfg = IndexConfig(kind=kind, recall_target=0.95, tune_queries=200, eval_queries=300)
    m = build_index([tmp_path / "fs"], tmp_path / "idx", cfg)
    rec = m["recall"]
    assert m["kind"] == kind and rec["queries"] == 300 and rec["tuning_queries"] == 200
    assert rec["met"] and rec["recall_at_k"] >= 0.95
    tuned = rec["tuned"]
    assert m["params"][tuned] == rec["tuning"][-1][tuned] and rec["tuning"][-1]["recall_at_k"] >= 0.95
    # the recorded recall is what an independent check finds on fresh queries from the same distribution
    idx = FeatureIndex.load(tmp_path / "idx")
    q = clustered(300, seed=7)
    _, pos = idx.search_arrays(q, 10)
    assert recall_at_k(pos, brute_force(x, q, 10)) >= 0.9


def test_adding_a_feature_set_of_the_same_model(tmp_path):
    a, b = clustered(500, seed=2), clustered(300, seed=3)
    feature_set(tmp_path / "a", a, "a")
    feature_set(tmp_path / "b", b, "b")
    build_index([tmp_path / "a"], tmp_path / "idx")
    first = sorted(p.name for p in (tmp_path / "idx").iterdir())
    m = add_to_index(tmp_path / "idx", [tmp_path / "b"])
    assert (
        m["count"] == 800 and m["generation"] == 2 and [h["action"] for h in m["history"]] == ["build", "add"]
    )
    assert [s["count"] for s in m["feature_sets"]] == [500, 300]
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["index-000002.faiss", "index.json", "meta-000002.parquet"] and first != files
    idx = FeatureIndex.load(tmp_path / "idx")
    top = idx.search(b[:3], top_k=1)
    assert [r[0].id for r in top] == ["b/00000.png", "b/00001.png", "b/00002.png"]
    with pytest.raises(FeatureIndexError, match="already in this index"):
        add_to_index(tmp_path / "idx", [tmp_path / "b"])


def test_adding_is_refused_for_another_model_or_repeated_ids(tmp_path):
    feature_set(tmp_path / "a", clustered(200), "a")
    build_index([tmp_path / "a"], tmp_path / "idx")
    other = ModelIdentity("cd" * 32, "cls", True, DIM, {"image_size": 32})
    feature_set(tmp_path / "other", clustered(50), "o", identity=other)
    with pytest.raises(
        IdentityError, match=r"weights digest.*abababababab vs .*cdcdcdcdcdcd.*pooling: .*'avg' vs .*'cls'"
    ):
        add_to_index(tmp_path / "idx", [tmp_path / "other"])
    feature_set(tmp_path / "same-ids", clustered(50, seed=5), "a")
    with pytest.raises(FeatureIndexError, match=r"50 ids would be in the index twice.*a/00000.png"):
        add_to_index(tmp_path / "idx", [tmp_path / "same-ids"])
    assert FeatureIndex.load(tmp_path / "idx").manifest["generation"] == 1  # untouched
    with pytest.raises(IdentityError, match="dimension"):
        feature_set(
            tmp_path / "wide",
            clustered(20, dim=48),
            "w",
            ModelIdentity("ab" * 32, "avg", True, 48, {"image_size": 32}),
        )
        build_index([tmp_path / "a", tmp_path / "wide"], tmp_path / "idx2")
    with pytest.raises(FeatureIndexError, match="already holds an index"):
        build_index([tmp_path / "a"], tmp_path / "idx")


def test_query_errors_say_what_is_expected(tmp_path):
    feature_set(tmp_path / "fs", clustered(50))
    build_index([tmp_path / "fs"], tmp_path / "idx")
    idx = FeatureIndex.load(tmp_path / "idx")
    good = np.ones(DIM, np.float32)
    with pytest.raises(QueryError, match=rf"dimension {DIM}.*got shape \(1, 31\)"):
        idx.search(np.ones((1, 31)), 5)
    bad = good.copy()
    bad[3] = np.nan
    with pytest.raises(QueryError, match="query vector 1 has NaN or infinite"):
        idx.search(np.stack([good, bad]), 5)
    with pytest.raises(QueryError, match="all zeros"):
        idx.search(np.zeros(DIM), 5)
    for k in (0, MAX_TOP_K + 1, 2.5, True):
        with pytest.raises(QueryError, match=f"top_k must be an integer from 1 to {MAX_TOP_K}"):
            idx.search(good, k)
    with pytest.raises(QueryError, match="must be numbers"):
        idx.search(["a"] * DIM, 5)


def test_a_damaged_index_folder_is_refused(tmp_path):
    feature_set(tmp_path / "fs", clustered(50))
    build_index([tmp_path / "fs"], tmp_path / "idx")
    with pytest.raises(FeatureIndexError, match="not an index"):
        FeatureIndex.load(tmp_path / "fs")
    manifest = json.loads((tmp_path / "idx/index.json").read_text())
    (tmp_path / "idx/index.json").write_text(json.dumps({**manifest, "count": 51}))
    with pytest.raises(FeatureIndexError, match="manifest says 51 vectors, the index holds 50"):
        FeatureIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / manifest["files"]["meta"]).unlink()
    with pytest.raises(FeatureIndexError, match="missing"):
        FeatureIndex.load(tmp_path / "idx")


def test_index_manifest_against_a_model_card(tmp_path):
    torch_model = tiny_model()
    save_checkpoint(torch_model, tmp_path / "ckpt", variant="micro_patch4_32")
    card = load_model_card(tmp_path / "ckpt")
    mine = model_identity(card, tmp_path / "ckpt")
    assert compare_identity(mine, model_identity(card, tmp_path / "ckpt")) == []
    other_weights = model_identity(card, tmp_path / "ckpt", digest="0" * 64)
    card.preprocessing.image_size = 64
    diffs = compare_identity(mine, model_identity(card, tmp_path / "ckpt", pooling="cls", normalized=False))
    assert [d.split(":")[0] for d in diffs] == ["pooling", "L2-normalised", "preprocessing image_size"]
    assert compare_identity(mine, other_weights)[0].startswith("weights digest")
    assert "none recorded" in compare_identity(mine, model_identity(card, tmp_path / "nowhere"))[0]
