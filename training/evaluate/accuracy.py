"""accuracy: top-1 / top-5 of the classification head on an ImageFolder split."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict

import numpy as np

from .common import RunConfig, head_outputs, load, require_head
from .datasets import DataSpec, load_split, resolve_spec
from .metrics import per_class_accuracy, topk_accuracy
from .results import EvalResult, make_result


def evaluate_accuracy(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    *,
    class_map: Mapping[str, str] | None = None,
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """Top-1 / top-5 of the classification head on an ImageFolder split.

    Eval folders are matched to the model's classes by name (through `class_map` if given); when they
    are a subset, the prediction is the arg-max over that subset's logits, as ImageNet-A and
    ImageNet-R (200 of the 1000 classes) are scored."""
    t0 = time.perf_counter()
    loaded = load(checkpoint, run, name)
    model_names = require_head(loaded, "accuracy")
    spec = resolve_spec(data, loaded.card, loaded.path)
    split = load_split(spec)
    logits, labels, cols = head_outputs(loaded, split, class_map, run, "accuracy")
    acc = topk_accuracy(logits, labels, (1, 5))
    per_class = per_class_accuracy(logits.argmax(1), labels, len(cols))
    present = [a for a in per_class if a is not None]
    subset = len(cols) < len(model_names)
    summary = {
        "images": len(labels),
        "classes": len(cols) if not subset else f"{len(cols)} of {len(model_names)}",
        "top-1": acc[1],
        f"top-{min(5, len(cols))}": acc[5],
        "mean per-class": float(np.mean(present)),
    }
    details = {
        "top1": acc[1],
        "top5": acc[5],
        "top5_k": min(5, len(cols)),
        "mean_per_class": float(np.mean(present)),
        "per_class": dict(zip(split.class_names, per_class, strict=True)),
        "images": len(labels),
        "class_subset": [model_names[c] for c in cols] if subset else None,
        "seconds": time.perf_counter() - t0,
    }
    return make_result(
        "accuracy",
        loaded,
        summary,
        details,
        {"class_map": dict(class_map) if class_map else None, "run": asdict(run)},
        {"eval": spec.describe()},
        spec.tag(),
    )
