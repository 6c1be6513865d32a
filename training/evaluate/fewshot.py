"""fewshot: k-shot linear probes (k = 5, 20, 50) over several seeds: mean +- std of the test top-1."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np
import torch

import training.evaluate as _package

from .common import RunConfig, load, train_test
from .datasets import DataSpec
from .errors import EvalError
from .linear_probe import ProbeConfig
from .metrics import topk_accuracy
from .results import EvalResult, make_result


def sample_few_shot(
    labels: Sequence[int], k: int, seed: int, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """Exactly k indices per class, drawn without replacement with a seeded generator (sorted)."""
    if k < 1:
        raise EvalError(f"shots must be >= 1, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            name = class_names[c] if class_names is not None else c
            raise EvalError(f"class {name!r} has {len(idx)} training images; {k}-shot needs at least {k}")
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def evaluate_fewshot(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    shots: Sequence[int] = (5, 20, 50),
    seeds: Sequence[int] = (0, 1, 2),
    probe: ProbeConfig = ProbeConfig(),
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """k-shot linear probes: for each k and seed, exactly k training images per class, a probe fitted
    on their features, top-1 on the whole test split; mean +- std over seeds.

    The feature extraction and the probe fit are looked up on the package (`training.evaluate._features`,
    `training.evaluate.fit_linear_probe`) when called, so a caller can wrap them (the tests count what
    they are given that way)."""
    t0 = time.perf_counter()
    if not shots or not seeds:
        raise EvalError("fewshot needs at least one shot count and one seed")
    loaded = load(checkpoint, run, name)
    train_split, test, cols, tag = train_test(loaded, data, train, "fewshot")
    labels = [y for _, y in train_split.samples]
    picks = {(k, s): sample_few_shot(labels, k, s, train_split.class_names) for k in shots for s in seeds}
    union = np.unique(np.concatenate(list(picks.values())))  # features only for images some run uses
    pos = {int(i): j for j, i in enumerate(union)}
    tr = _package._features(loaded, [train_split.samples[i] for i in union], run, "fewshot train")
    te = _package._features(loaded, test.samples, run, "fewshot test")
    test_y = torch.as_tensor(cols)[te.labels]
    per_k: dict[str, dict] = {}
    for k in shots:
        accs = []
        for s in seeds:
            rows = torch.as_tensor([pos[int(i)] for i in picks[(k, s)]])
            clf = _package.fit_linear_probe(
                tr.embeddings[rows],
                tr.labels[rows],
                len(train_split.class_names),
                replace(probe, seed=s),
                loaded.device,
            )
            accs.append(topk_accuracy(clf.logits(te.embeddings).cpu(), test_y, (1,))[1])
        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        per_k[str(k)] = {"mean": float(np.mean(accs)), "std": std, "top1_per_seed": accs}
    summary = {"test": len(te.labels), "seeds": len(seeds)}
    summary.update({f"{k}-shot": f"{per_k[str(k)]['mean']:.2f} ± {per_k[str(k)]['std']:.2f}" for k in shots})
    details = {"shots": per_k, "seconds": time.perf_counter() - t0}
    config = {"shots": list(shots), "seeds": list(seeds), "probe": asdict(probe), "run": asdict(run)}
    data_d = {"test": test.spec.describe(), "train": (train or test.spec).describe()}
    return make_result("fewshot", loaded, summary, details, config, data_d, tag)
