"""Datasets for training and evaluation.

`scan_image_folder` (in `supmae_serve.common.files`, shared with the bulk embedding job) and `holdout_split`
are the shared base: an ImageFolder-layout root (`root/<class>/<image>`) listed deterministically, and a
seeded, class-stratified hold-out split.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from supmae_serve.common.files import IMAGE_EXTENSIONS, DataError, scan_image_folder  # noqa: F401 (re-exported)
from supmae_serve.common.optional import require
from supmae_serve.common.shards import image_field, looks_like_shards
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import ImageError, ImageLimits, decode_image, resize_crop


def holdout_split(
    samples: list[tuple[Path, int]], holdout: int | float, seed: int = 0
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Seeded, class-stratified split -> (train, held_out). `holdout` is a count (e.g. 5000) or a
    fraction (e.g. 0.1); each class gives the same share. Deterministic for a seed."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    n = len(samples)
    frac = holdout / n if isinstance(holdout, int) and holdout >= 1 else float(holdout)
    if not 0 < frac < 1:
        raise DataError(f"hold-out must leave both splits non-empty; got {holdout} of {n} samples")
    rng = random.Random(seed)
    train, held = [], []
    for cls in sorted(by_class):
        items = list(by_class[cls])
        rng.shuffle(items)
        k = max(1, round(len(items) * frac))
        if k >= len(items):
            raise DataError(f"class {cls} has {len(items)} images: too few to hold out {k}")
        held.extend(items[:k])
        train.extend(items[k:])
    return train, held


# ------------------------------------------------------------------------------ datasets
DATASET_KINDS = ("folder", "cifar10", "wds", "synthetic")


@dataclass
class TensorImages:
    """A small dataset decoded once: uint8 images (N, 3, S, S) and int64 labels (N,), on any device.
    Augmentation happens on these tensors (training/augment.py), on the GPU when they live there."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device) -> TensorImages:
        return TensorImages(self.images.to(device), self.labels.to(device), self.class_names, self.source)

    def subset(self, idx: torch.Tensor) -> TensorImages:
        idx = idx.to(self.images.device)
        return TensorImages(self.images[idx], self.labels[idx], self.class_names, self.source)


def detect_kind(data: str) -> str:
    """Guess the dataset kind of a `data` string (see DATASET_KINDS)."""
    if data == "synthetic":
        return "synthetic"
    if looks_like_shards(data):
        return "wds"
    p = Path(data)
    if (p / "cifar-10-batches-py").is_dir() or (p / "data_batch_1").is_file():
        return "cifar10"
    return "folder"


def _decode_one(path: Path, prep: Preprocessing) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
    try:
        img = decode_image(data, ImageLimits(min_side=1))
    except ImageError as e:
        raise DataError(f"{path}: unreadable image ({e})") from e
    return np.asarray(resize_crop(img, prep), dtype=np.uint8)  # (S, S, 3)


def decode_samples(
    samples: list[tuple[Path, int]],
    class_names: list[str],
    image_size: int,
    threads: int = 2,
    source: str = "",
) -> TensorImages:
    """Decode every image once (resize + centre crop as the model card's preprocessing says) into a
    uint8 tensor. An unreadable file raises DataError naming it."""
    prep = Preprocessing.for_size(image_size)
    out = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)  # (N, S, S, 3)

    def work(i: int) -> None:
        out[i] = _decode_one(samples[i][0], prep)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in pool.map(work, range(len(samples))):
            pass
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    labels = torch.tensor([c for _, c in samples], dtype=torch.int64)
    return TensorImages(images, labels, class_names, source)


def load_cifar10(root: str | Path, train: bool = True) -> TensorImages:
    """The torchvision CIFAR-10 on-disk format (`root/cifar-10-batches-py/data_batch_*`), read by
    torchvision.datasets.CIFAR10 without downloading."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    base = root.parent if root.name == "cifar-10-batches-py" else root
    try:
        ds = CIFAR10(str(base), train=train, download=False)
    except RuntimeError as e:
        raise DataError(
            f"{base}: not a CIFAR-10 python folder (expected {base / 'cifar-10-batches-py'} with "
            f"data_batch_1..5 and test_batch; {e})"
        ) from e
    images = (
        torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    )  # (N, 3, 32, 32)
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    return TensorImages(images, labels, list(ds.classes), str(base))


def synthetic_images(n: int, num_classes: int, image_size: int, seed: int = 0) -> TensorImages:
    """A learnable labelled dataset for tests: each class is a coloured stripe pattern of its own
    orientation and frequency, plus per-image noise and a random shift."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    k = torch.arange(num_classes, dtype=torch.float32)
    angle = k / num_classes * torch.pi  # (K,)
    freq = 2 * torch.pi * (1 + k % 3) / image_size * 2
    color = torch.rand(num_classes, 3, generator=g) * 0.8 + 0.2  # (K, 3)
    shift = torch.rand(n, generator=g) * 2 * torch.pi
    a, f = angle[labels].view(n, 1, 1), freq[labels].view(n, 1, 1)
    wave = torch.sin(f * (xx * torch.cos(a) + yy * torch.sin(a)) + shift.view(n, 1, 1))  # (N, S, S)
    img = 0.5 + 0.4 * wave.unsqueeze(1) * color[labels].view(n, 3, 1, 1)  # (N, 3, S, S)
    img = img + 0.08 * torch.randn(img.shape, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorImages(images, labels, [f"class_{i}" for i in range(num_classes)], "synthetic")


def holdout_indices(
    labels: torch.Tensor, holdout: int | float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`holdout_split` for an in-memory dataset: -> (train indices, held-out indices)."""
    samples = [(Path(str(i)), int(c)) for i, c in enumerate(labels.tolist())]
    train, held = holdout_split(samples, holdout, seed)
    to_idx = lambda s: torch.tensor(sorted(int(str(p)) for p, _ in s), dtype=torch.int64)  # noqa: E731
    return to_idx(train), to_idx(held)


class FolderDataset(torch.utils.data.Dataset):
    """A streaming ImageFolder (ImageNet layout) for datasets too large to decode into memory.
    `transform` maps an RGB PIL image to a tensor (timm's create_transform for training)."""

    def __init__(self, samples: list[tuple[Path, int]], class_names: list[str], transform):
        self.samples, self.class_names, self.transform = samples, class_names, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = decode_image(path.read_bytes(), ImageLimits(min_side=1))
        except OSError as e:
            raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
        except ImageError as e:
            raise DataError(f"{path}: unreadable image ({e})") from e
        return self.transform(img), label


class Failed:
    """An error raised while reading an item, returned as a value (see `batches`)."""

    def __init__(self, error: Exception):
        self.error = error


class CarryErrors(torch.utils.data.Dataset):
    """`dataset`'s items, with its errors of the types `errors` returned as `Failed` instead of raised."""

    def __init__(self, dataset, errors: tuple[type[Exception], ...]):
        self.dataset, self.errors = dataset, errors

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except self.errors as e:
            return Failed(e)


def _collate(items: list):
    failed = next((it for it in items if isinstance(it, Failed)), None)
    return failed if failed is not None else torch.utils.data.default_collate(items)


def batches(dataset, errors: tuple[type[Exception], ...] = (DataError,), **loader_args):
    """Batches of `dataset` from a DataLoader (`loader_args` as DataLoader takes them), where an error of
    the types `errors` raised while reading an item (a corrupt image, named) is raised here as itself,
    whichever worker process read it. A DataLoader re-raises a worker's exception with the worker's
    whole traceback as its message (a 40-line "error:" line); carried as a value, the error crosses the
    process boundary intact. Other exceptions (bugs) keep torch's traceback."""
    loader = torch.utils.data.DataLoader(CarryErrors(dataset, errors), collate_fn=_collate, **loader_args)
    for batch in loader:
        if isinstance(batch, Failed):
            raise batch.error
        yield batch


def check_class_folders(train_classes: list[str], val_classes: list[str], train_root, val_root) -> None:
    """Training and validation folders must name the same classes in the same order."""
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"class folders differ between {train_root} and {val_root}: only in training {only_t or '-'}, "
            f"only in validation {only_v or '-'}"
        )


def webdataset_pipeline(urls: str, transform, batch_size: int, shuffle: int = 1000, seed: int = 0):
    """WebDataset tar shards (local paths, brace patterns or URLs) -> batches of (images, labels).
    Each sample needs an image (jpg/png/webp) and a `cls` integer. Shards are split across processes
    and workers by webdataset's node/worker splitters."""
    wds = require("webdataset", "WebDataset shards")

    def decode(sample):
        key = image_field(sample)
        where = sample.get("__url__", "?") + ":" + sample.get("__key__", "?")
        if key is None or "cls" not in sample:
            raise DataError(f"{where}: a WebDataset sample needs an image (jpg/png/webp) and a 'cls' label")
        try:
            img = decode_image(sample[key], ImageLimits(min_side=1))
        except ImageError as e:
            raise DataError(f"{where}: unreadable image ({e})") from e
        return transform(img), int(sample["cls"])

    return (
        wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=100, seed=seed)
        .shuffle(shuffle)
        .map(decode)
        .batched(batch_size, partial=False)
    )
