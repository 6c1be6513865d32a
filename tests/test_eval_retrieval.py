"""supmae-eval retrieval: precision@k and mAP@k of label agreement over a FAISS index of the training images,
against hand-computed values and a brute-force ranking, and its k-NN column against `supmae-eval knn`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from supmae_serve.model import save_checkpoint
from tests.conftest import TINY, tiny_model
from tests.test_eval import RUN, install_colour_features, write_colour_folder
from training import evaluate as ev
from training.eval_cli import main

pytest.importorskip("faiss", reason="the retrieval task needs faiss: pip install 'supmae[features]'")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread on a shared CPU


@pytest.fixture(scope="module")
def data6(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("r6"), per_class=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "mae"
    save_checkpoint(tiny_model(framework="mae", num_classes=0, seed=3), path, variant=TINY)
    return path


def test_clustered_features_give_the_hand_computed_scores(data6, ckpt, monkeypatch):
    """Colour features cluster perfectly: 6 training images per class, all ranked before any other class.
    So P@1 = P@6 = 100, P@10 = 6/10, and AP@10 = 1 (normalised by min(6 relevant, 10))."""
    install_colour_features(monkeypatch)
    r = ev.evaluate_retrieval(
        ckpt, ev.DataSpec(data6, holdout=12), precision_at=(1, 6, 10), map_at=10, run=RUN
    )
    assert r.task == "retrieval" and (r.summary["index"], r.summary["queries"]) == (36, 12)
    assert r.summary["search"] == "Flat" and r.details["index"]["kind"] == "flat"
    assert r.summary["P@1"] == 100.0 and r.summary["P@6"] == 100.0
    assert r.summary["P@10"] == pytest.approx(60.0) and r.summary["mAP@10"] == pytest.approx(100.0)
    assert r.details["class_counts"] == [6] * 6
    knn = ev.evaluate_knn(ckpt, ev.DataSpec(data6, holdout=12), k=20, run=RUN)
    assert r.summary["20-NN top-1"] == knn.details["top1"] == 100.0


def _brute_force(train_x, train_y, test_x, test_y, ks, map_at):
    """Cosine ranking by numpy, precision@k and AP@map_at by the textbook definitions."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    order = np.argsort(-(b @ a.T), axis=1, kind="stable")
    rel = train_y[order] == test_y[:, None]  # (Q, N) relevance of each ranked training image
    prec = {k: 100 * rel[:, :k].mean() for k in ks}
    aps = []
    for q in range(len(rel)):
        r = rel[q, :map_at]
        hits = np.flatnonzero(r)
        p_at_hits = np.arange(1, len(hits) + 1) / (hits + 1)
        aps.append(p_at_hits.sum() / min(int((train_y == test_y[q]).sum()), map_at))
    return prec, 100 * float(np.mean(aps))


def test_real_features_match_a_brute_force_ranking_and_the_knn_task(data6, ckpt):
    """No fake features: the tiny model's own embeddings. The task's numbers equal a brute-force cosine
    ranking's, and its k-NN column is exactly `evaluate_knn`'s on the same split."""
    spec = ev.DataSpec(data6, holdout=12, seed=1)
    r = ev.evaluate_retrieval(ckpt, spec, precision_at=(1, 5, 20), map_at=20, k=7, temperature=0.2, run=RUN)
    loaded = ev.load(ckpt, RUN)
    split = ev.load_split(spec)
    tr = ev.features(loaded, split.rest, RUN, "train")
    te = ev.features(loaded, split.samples, RUN, "test")
    prec, map20 = _brute_force(
        tr.embeddings.numpy(), tr.labels.numpy(), te.embeddings.numpy(), te.labels.numpy(), (1, 5, 20), 20
    )
    for k in (1, 5, 20):
        assert r.summary[f"P@{k}"] == pytest.approx(prec[k], abs=1e-9), k
    assert r.summary["mAP@20"] == pytest.approx(map20, abs=1e-9)
    knn = ev.evaluate_knn(ckpt, spec, k=7, temperature=0.2, run=RUN)
    assert r.details["knn_top1"] == knn.details["top1"] and r.details["knn_top5"] == knn.details["top5"]
    assert r.summary["7-NN top-1"] == knn.summary["top-1"]


def test_an_approximate_index_is_recorded_and_agrees_on_a_small_set(data6, ckpt, monkeypatch):
    install_colour_features(monkeypatch)
    spec = ev.DataSpec(data6, holdout=12)
    r = ev.evaluate_retrieval(ckpt, spec, precision_at=(1, 6), map_at=6, index_kind="hnsw", run=RUN)
    assert r.details["index"]["kind"] == "hnsw" and r.summary["search"].startswith("HNSW")
    assert r.config["index_kind"] == "hnsw" and r.summary["P@6"] == 100.0  # 36 vectors: HNSW finds them all


def test_bad_requests_say_what_is_allowed(data6, ckpt):
    with pytest.raises(ev.EvalError, match="needs labelled training images.*--holdout"):
        ev.evaluate_retrieval(ckpt, ev.DataSpec(data6), run=RUN)
    with pytest.raises(ev.EvalError, match=r"k from 1 to 1000.*got precision at \[0\]"):
        ev.evaluate_retrieval(ckpt, ev.DataSpec(data6, holdout=12), precision_at=(0,), run=RUN)
    with pytest.raises(ev.EvalError, match="mAP at 5000"):
        ev.evaluate_retrieval(ckpt, ev.DataSpec(data6, holdout=12), map_at=5000, run=RUN)
    # settings are checked before anything is loaded or encoded
    with pytest.raises(ev.EvalError, match="index kind must be one of auto, flat, hnsw, ivf"):
        ev.evaluate_retrieval("no/such/checkpoint", ev.DataSpec("nowhere"), index_kind="pq", run=RUN)
    with pytest.raises(ev.EvalError, match="k-NN needs k >= 1"):
        ev.evaluate_retrieval("no/such/checkpoint", ev.DataSpec("nowhere"), k=0, run=RUN)


def test_the_command_line_prints_the_table_and_saves_the_result(data6, ckpt, capsys):
    argv = ["retrieval", "--checkpoint", str(ckpt), "--data", str(data6), "--holdout", "12"]
    argv += ["--precision-at", "1", "3", "--map-at", "6", "--k", "5", "--workers", "0", "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    header = [c.strip() for c in out.splitlines()[0].split("|")[1:-1]]
    assert header == ["checkpoint", "index", "queries", "search", "P@1", "P@3", "mAP@6", "5-NN top-1"]
    saved = json.loads((ckpt / "eval" / f"retrieval-{data6.name}-holdout12-seed0.json").read_text())
    assert saved["task"] == "retrieval" and saved["config"]["precision_at"] == [1, 3]
    assert (
        0 <= saved["details"]["p_at_1"] <= 100 and saved["details"]["index"]["recall"]["recall_at_k"] == 1.0
    )
    assert main([*argv[:-6], "--map-at", "0", "--no-save", "--no-progress"]) == 2
    assert "mAP at 0" in capsys.readouterr().err
