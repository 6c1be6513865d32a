"""linprobe: a linear classifier (linear_probe.py) on frozen, standardised features: train and test top-1."""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from .common import RunConfig, feature_task, load
from .datasets import DataSpec
from .linear_probe import ProbeConfig, fit_linear_probe
from .metrics import topk_accuracy
from .results import EvalResult, make_result


def evaluate_linprobe(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    probe: ProbeConfig = ProbeConfig(),
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """A linear classifier on frozen, standardised features: train and test top-1."""
    t0 = time.perf_counter()
    loaded = load(checkpoint, run, name)
    ft = feature_task(loaded, data, train, run, "linprobe")
    tr, te = ft.tr, ft.te
    t1 = time.perf_counter()
    clf = fit_linear_probe(tr.embeddings, tr.labels, len(ft.train.class_names), probe, loaded.device)
    fit_s = time.perf_counter() - t1
    train_acc = topk_accuracy(clf.logits(tr.embeddings).cpu(), tr.labels, (1,))[1]
    test_acc = topk_accuracy(clf.logits(te.embeddings).cpu(), ft.test_y, (1, 5))
    summary = {
        "train": len(tr.labels),
        "test": len(te.labels),
        "weight decay": f"{clf.weight_decay:g}",
        "train top-1": train_acc,
        "test top-1": test_acc[1],
    }
    details = {
        "train_top1": train_acc,
        "test_top1": test_acc[1],
        "test_top5": test_acc[5],
        "weight_decay": clf.weight_decay,
        "weight_decay_selection": clf.selection,
        "fit_seconds": fit_s,
        "seconds": time.perf_counter() - t0,
    }
    config = {"probe": asdict(probe), "run": asdict(run)}
    return make_result("linprobe", loaded, summary, details, config, ft.data, ft.tag)
