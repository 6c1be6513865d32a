"""Running a checkpoint over a split: how to run (`RunConfig`), loading (`load`), one pass over a dataset
(`run_model`, `features`, `head_outputs`), the streamed top-1 of a multi-pass dataset, and the training/test
splits of the feature tasks (`train_test`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from supmae_serve.common.progress import track
from supmae_serve.common.system import resolve_device
from supmae_serve.model import ModelCard, load_checkpoint
from supmae_serve.preprocess import normalize
from training.corruptions import CorruptionError
from training.data import batches

from .datasets import DataSpec, ImageDataset, Split, load_split, map_classes, resolve_spec
from .errors import EvalError


@dataclass
class RunConfig:
    """How to run: device, batching, workers. Shared by every task."""

    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    batch_size: int = 256
    workers: int = 0  # DataLoader worker processes decoding images
    amp: bool = False  # bf16 autocast on CUDA (fp32 otherwise)
    feature: str = (
        "embedding"  # knn/linprobe/fewshot/retrieval features: embedding (the card's pooling) | cls
    )
    progress: bool = False  # progress bars on stderr
    cache_gb: float = 4.0  # robustness: keep decoded, cropped images in memory up to this size

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise EvalError(f"workers must be >= 0, got {self.workers}")
        if self.feature not in ("embedding", "cls"):
            raise EvalError(f"feature must be 'embedding' or 'cls', got {self.feature!r}")


@dataclass
class Loaded:
    model: torch.nn.Module
    card: ModelCard
    path: str
    name: str
    device: torch.device


def load(checkpoint: str | os.PathLike, run: RunConfig, name: str | None = None) -> Loaded:
    device = resolve_device(run.device, EvalError)
    model, card = load_checkpoint(checkpoint, device=device)
    return Loaded(model, card, str(checkpoint), name or str(checkpoint), device)


def require_head(loaded: Loaded, task: str) -> list[str]:
    """The head's class names; EvalError when the checkpoint has no head or no class names."""
    cfg = loaded.card.config
    if not cfg.has_head:
        raise EvalError(
            f"{loaded.path}: {task} needs a classification head, but this is a {cfg.framework!r} checkpoint "
            f"without one (num_classes={cfg.num_classes}); evaluate its features with knn, linprobe or "
            "fewshot (or retrieval) instead"
        )
    names = loaded.card.class_names
    if not names:
        raise EvalError(
            f"{loaded.path}: the model card has no class_names, so eval folders cannot be matched to the "
            f'head\'s {cfg.num_classes} classes; add "class_names" to model.json'
        )
    return list(names)


def _batches(dataset: Dataset, run: RunConfig, device: torch.device, desc: str):
    """Batches of `dataset` in order, decoded by `run.workers` processes; an error reading an image
    (named) is raised as itself, not as the DataLoader's re-raised worker traceback."""
    return track(
        batches(
            dataset,
            (EvalError, CorruptionError),
            batch_size=run.batch_size,
            shuffle=False,
            num_workers=run.workers,
            pin_memory=device.type == "cuda",
        ),
        total=math.ceil(len(dataset) / run.batch_size),
        desc=desc,
        enabled=run.progress,
    )


def _autocast(run: RunConfig, device: torch.device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if run.amp and device.type == "cuda" else nullcontext()
    )


@dataclass
class Outputs:
    labels: torch.Tensor  # (N,) int64
    embeddings: torch.Tensor | None = None  # (N, D) float32 on the CPU
    logits: torch.Tensor | None = None  # (N, C) float32 on the CPU


@torch.no_grad()  # not inference_mode: the features feed the linear probe's autograd
def run_model(
    loaded: Loaded, dataset: ImageDataset, run: RunConfig, *, logits: bool, embeddings: bool, desc: str = ""
) -> Outputs:
    """One pass over a dataset -> labels and the requested outputs, in dataset order."""
    if len(dataset) == 0:
        raise EvalError(f"{desc or 'evaluation'}: no images to evaluate")
    prep, dev = loaded.card.preprocessing, loaded.device
    ys, embs, outs = [], [], []
    for x, y in _batches(dataset, run, dev, desc):
        x = normalize(x.to(dev, non_blocking=True), prep)  # uint8 (N, 3, S, S) -> normalised float32
        with _autocast(run, dev):
            f = loaded.model.forward_features(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
        if embeddings:
            e = f.embedding if run.feature == "embedding" else f.cls_token
            embs.append(e.float().cpu())
        if logits:
            outs.append(f.logits.float().cpu())
    return Outputs(
        labels=torch.cat(ys),
        embeddings=torch.cat(embs) if embeddings else None,
        logits=torch.cat(outs) if logits else None,
    )


def features(loaded: Loaded, samples, run: RunConfig, desc: str) -> Outputs:
    """Labels and features (`run.feature`) of the images in `samples`, in order."""
    return run_model(
        loaded,
        ImageDataset(samples, loaded.card.preprocessing),
        run,
        logits=False,
        embeddings=True,
        desc=desc,
    )


def head_outputs(
    loaded: Loaded, split: Split, class_map, run: RunConfig, desc: str, dataset: ImageDataset | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Logits restricted to the eval set's classes, labels indexing those columns, and the columns."""
    model_names = require_head(loaded, "accuracy")
    cols = map_classes(split.class_names, model_names, class_map, source=f"eval set {split.spec.root}")
    ds = dataset or ImageDataset(split.samples, loaded.card.preprocessing)
    out = run_model(loaded, ds, run, logits=True, embeddings=False, desc=desc)
    # folder c is model class cols[c]; a subset keeps only those columns (ImageNet-A/-R evaluation),
    # so column j of the restricted logits is eval folder j and the folder labels index it directly
    logits = out.logits if cols == list(range(len(model_names))) else out.logits[:, cols]
    return logits, out.labels, cols


@torch.no_grad()
def top1_hits_per_pass(
    loaded: Loaded, dataset: ImageDataset, cols: Sequence[int], run: RunConfig, desc: str
) -> np.ndarray:
    """Stream a multi-pass dataset through the head -> correct top-1 predictions per pass (no logits
    kept, so memory does not grow with the number of passes). `cols`: the head's column of each eval
    folder; the arg-max is taken over those columns only."""
    n, prep, dev = len(dataset.samples), loaded.card.preprocessing, loaded.device
    cols_t = torch.as_tensor(list(cols), device=dev)
    hits = np.zeros(len(dataset.passes), dtype=np.int64)
    start = 0
    for x, y in _batches(dataset, run, dev, desc):
        x = normalize(x.to(dev, non_blocking=True), prep)  # (B, 3, S, S)
        with _autocast(run, dev):
            logits = loaded.model.forward_features(x).logits.float()  # (B, classes)
        pred = logits[:, cols_t].argmax(1).cpu()  # (B,) index of the eval folder
        np.add.at(hits, (start + np.arange(len(y))) // n, (pred == y).numpy())
        start += len(y)
    return hits


def decode_all(dataset: ImageDataset, run: RunConfig, desc: str = "decode") -> np.ndarray:
    """Decode and crop every image once: (N, S, S, 3) uint8 (for the many passes of robustness)."""
    s = dataset.prep.image_size
    out = np.empty((len(dataset), s, s, 3), dtype=np.uint8)
    i = 0
    for x, _ in _batches(dataset, run, torch.device("cpu"), desc):
        out[i : i + len(x)] = x.permute(0, 2, 3, 1).numpy()
        i += len(x)
    return out


def train_test(
    loaded: Loaded, data: DataSpec, train: DataSpec | None, task: str
) -> tuple[Split, Split, list[int], str]:
    """The training and test splits of a feature task, the test folders mapped onto training classes,
    and the result's tag. Without `train`, `data`'s hold-out is the test set and its complement the
    training set (the trainer's split)."""
    spec = resolve_spec(data, loaded.card, loaded.path)
    test = load_split(spec)
    if train is None:
        if test.rest is None:
            raise EvalError(
                f"{task} needs labelled training images: pass a training folder (--train-data PATH), or a "
                "hold-out (--holdout 5000 --seed 0) to split --data into a training part and a held-out test part"
            )
        train_split = Split(test.rest, test.class_names, None, spec)
        tag = spec.tag()
    else:
        train_split = load_split(replace(train, holdout=None))
        overlap = {str(p.resolve()) for p, _ in train_split.samples} & {
            str(p.resolve()) for p, _ in test.samples
        }
        if overlap:
            raise EvalError(
                f"{len(overlap)} images are in both the training set ({train.root}) and the test set "
                f"({data.root}), e.g. {sorted(overlap)[0]}; use separate folders, or one folder with --holdout"
            )
        tag = f"{spec.tag()}-from-{train.tag()}"
    cols = map_classes(test.class_names, train_split.class_names, source="test set", target="training set")
    return train_split, test, cols, tag


@dataclass
class FeatureTask:
    """What a feature task (knn, linprobe, retrieval) works on: the training and test splits, their features,
    the test labels as training-class indices, the result's tag and its data description."""

    train: Split
    test: Split
    tr: Outputs
    te: Outputs
    test_y: torch.Tensor  # (N_test,) index into train.class_names
    tag: str
    data: dict[str, str]


def feature_task(
    loaded: Loaded,
    data: DataSpec,
    train: DataSpec | None,
    run: RunConfig,
    task: str,
    parts: tuple[str, str] = ("train", "test"),
) -> FeatureTask:
    """Split (`train_test`), then the features of both parts (`parts` names them in progress bars)."""
    train_split, test, cols, tag = train_test(loaded, data, train, task)
    tr = features(loaded, train_split.samples, run, f"{task} {parts[0]}")
    te = features(loaded, test.samples, run, f"{task} {parts[1]}")
    test_y = torch.as_tensor(cols)[te.labels]  # test folder -> training class
    described = {"test": test.spec.describe(), "train": (train or test.spec).describe()}
    return FeatureTask(train_split, test, tr, te, test_y, tag, described)
