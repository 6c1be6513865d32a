"""knn: weighted k-NN classification of the test split by the training split's L2-normalised features
(k=20, votes weighted exp(sim / 0.07), as in InstDisc and DINO)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch

from .common import Loaded, Outputs, RunConfig, feature_task, load
from .datasets import DataSpec
from .metrics import knn_votes, topk_accuracy
from .results import EvalResult, make_result


def knn_accuracy(
    loaded: Loaded,
    tr: Outputs,
    te: Outputs,
    test_y: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> dict[int, float]:
    """Top-1 / top-5 (percent) of the k-NN votes for the test features (`test_y`: training-class labels).
    The knn and retrieval tasks both score with it, so they agree on the same features."""
    votes = knn_votes(
        tr.embeddings.to(loaded.device),
        tr.labels.to(loaded.device),
        te.embeddings.to(loaded.device),
        num_classes,
        k,
        temperature,
    ).cpu()
    return topk_accuracy(votes, test_y, (1, 5))


def evaluate_knn(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """Weighted k-NN classification of the test split by the training split's embeddings."""
    t0 = time.perf_counter()
    loaded = load(checkpoint, run, name)
    ft = feature_task(loaded, data, train, run, "knn")
    acc = knn_accuracy(loaded, ft.tr, ft.te, ft.test_y, len(ft.train.class_names), k, temperature)
    summary = {
        "train": len(ft.tr.labels),
        "test": len(ft.te.labels),
        "k": k,
        "top-1": acc[1],
        "top-5": acc[5],
    }
    details = {"top1": acc[1], "top5": acc[5], "seconds": time.perf_counter() - t0}
    config = {"k": k, "temperature": temperature, "run": asdict(run)}
    return make_result("knn", loaded, summary, details, config, ft.data, ft.tag)
