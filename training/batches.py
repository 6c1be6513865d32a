"""Batch sources: what the training loop iterates, one epoch at a time, behind the `BatchSource` protocol.

`build_data(cfg, ...)` reads the data a config names (training/data.py for the kinds) and picks one:

- `TensorBatches`: a dataset decoded once into a uint8 tensor (on the GPU if any), augmented there.
- `LoaderBatches`: a map-style dataset through DataLoader workers (a large ImageFolder, or RandAugment's
  PIL transforms over an in-memory dataset).
- `StreamBatches`: WebDataset shards, resampled, cut into epochs of `wds_samples` images.

Determinism: the data order of an epoch depends only on (seed, epoch), the augmentation of a step only on
(seed, step), drawn for the whole global batch with each process taking its own rows, so a resumed run
repeats the uninterrupted run's batches and N processes see the same global batches as one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import torch

from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import normalize, normalize_image, resize_uint8, to_tensor

from . import data as D
from .augment import ClampedRandomResizedCrop, random_resized_crop, step_generator
from .distributed import DistInfo
from .recipes import AugmentSettings, DataSettings, TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised images (B, 3, S, S), labels (B,)) on the device


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop needs from its data: `steps_per_epoch` batches of `global_batch` images
    (this process yields its `global_batch / world_size` rows of each), and for epoch `e` the batches from
    step `start_step` on (a resumed run starts mid-epoch)."""

    steps_per_epoch: int
    global_batch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class TensorBatches:
    """Global batches from an in-memory uint8 dataset, augmented on its device.

    Step s of epoch e takes the global batch perm_e[s*G:(s+1)*G] and this process its rows
    [rank*B, (rank+1)*B): the DistributedSampler contract, laid out so that the global batch does not
    depend on the number of processes."""

    def __init__(
        self,
        data: D.TensorImages,
        *,
        batch_size: int,
        dist: DistInfo,
        seed: int,
        image_size: int,
        scale: tuple[float, float],
        hflip: bool,
        mode: str,
        prep: Preprocessing,
        crop: str = "torchvision",
    ):
        self.data, self.b, self.dist, self.seed = data, batch_size, dist, seed
        self.global_batch = batch_size * dist.world_size
        self.size, self.scale, self.hflip, self.mode, self.prep = image_size, scale, hflip, mode, prep
        self.crop = crop
        self.steps_per_epoch = len(data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise D.DataError(
                f"{data.source}: {len(data)} training images are fewer than one global batch of "
                f"{self.global_batch}; lower batch_size"
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        perm = epoch_permutation(len(self.data), self.seed, epoch).to(self.data.images.device)
        off = self.dist.rank * self.b
        for s in range(start_step, self.steps_per_epoch):
            idx = perm[s * self.global_batch + off : s * self.global_batch + off + self.b]
            g = step_generator(self.seed, epoch * self.steps_per_epoch + s, self.data.images.device)
            x = random_resized_crop(
                self.data.images[idx],
                self.size,
                self.scale,
                self.hflip,
                g,
                self.global_batch,
                off,
                self.mode,
                self.crop,
            )  # (B, 3, S, S) in [0, 1]
            yield normalize(x, self.prep), self.data.labels[idx]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The same order as TensorBatches, as a DataLoader batch sampler (the DistributedSampler role)."""

    def __init__(self, n: int, batch_size: int, dist: DistInfo, seed: int):
        self.n, self.b, self.dist, self.seed = n, batch_size, dist, seed
        self.global_batch = batch_size * dist.world_size
        self.steps_per_epoch = n // self.global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        off = self.dist.rank * self.b
        for s in range(self.start, self.steps_per_epoch):
            yield perm[s * self.global_batch + off : s * self.global_batch + off + self.b].tolist()


class LoaderBatches:
    """Global batches from a map-style dataset through DataLoader workers (decode + timm transforms)."""

    def __init__(self, dataset, *, batch_size: int, dist: DistInfo, seed: int, num_workers: int):
        self.dataset, self.dist, self.seed, self.num_workers = dataset, dist, seed, num_workers
        self.sampler = GlobalBatchSampler(len(dataset), batch_size, dist, seed)
        self.global_batch = self.sampler.global_batch
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise D.DataError(
                f"{len(dataset)} training images are fewer than one global batch of {self.global_batch}"
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start_step)
        loader = D.batches(  # a bad image raises its DataError (file named) here, from any worker
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed * 7 + epoch),
        )
        for x, y in loader:
            yield x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)


class StreamBatches:
    """WebDataset shards, resampled: an endless stream cut into epochs of `samples` images."""

    def __init__(self, pipeline, *, samples: int, batch_size: int, dist: DistInfo, num_workers: int):
        self.global_batch = batch_size * dist.world_size
        self.steps_per_epoch = samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise D.DataError(f"wds_samples={samples} is fewer than one global batch of {self.global_batch}")
        self.dist = dist
        self.loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers)
        self.it = None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self.it is None:
            self.it = iter(self.loader)
        for _ in range(start_step, self.steps_per_epoch):
            try:
                x, y = next(self.it)
            except StopIteration:  # every shard read: start another pass (reshuffled by webdataset)
                self.it = iter(self.loader)
                x, y = next(self.it)
            yield x.to(self.dist.device, non_blocking=True), torch.as_tensor(y).to(self.dist.device)


class PILTensorDataset(torch.utils.data.Dataset):
    """An in-memory uint8 dataset fed through a PIL transform (timm's RandAugment path)."""

    def __init__(self, data: D.TensorImages, transform):
        self.images, self.labels, self.transform = data.images.cpu(), data.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy())), int(self.labels[i])


@dataclass
class TrainData:
    train: BatchSource
    val: D.TensorImages | torch.utils.data.Dataset | None  # in memory (on the device) or read per batch
    class_names: list[str]
    description: dict  # what the model card records under training.data


# ------------------------------------------------------------------------------ building the sources
def train_transform(aug: AugmentSettings, size: int, prep: Preprocessing):
    """The worker-side (PIL) transform: timm's (torchvision's crop rule, RandAug, erasing, jitter), or
    for crop=clamp the official linear probe's (MAE util/crop.py crop + flip)."""
    if aug.crop == "clamp":
        from torchvision import transforms

        return transforms.Compose(
            [
                ClampedRandomResizedCrop(size, (aug.scale_min, aug.scale_max), aug.interpolation),
                transforms.RandomHorizontalFlip(0.5 if aug.hflip else 0.0),
                partial(normalize_image, prep=prep),
            ]
        )
    from timm.data import create_transform

    return create_transform(  # normalises with the card's mean/std itself: random erasing needs it first
        input_size=size,
        is_training=True,
        scale=(aug.scale_min, aug.scale_max),
        hflip=0.5 if aug.hflip else 0.0,
        color_jitter=aug.color_jitter or None,
        auto_augment=aug.randaug or None,
        interpolation=aug.interpolation,
        re_prob=aug.reprob,
        re_mode="pixel",
        mean=prep.mean,
        std=prep.std,
    )


def _threads() -> int:
    return max(1, os.cpu_count() or 2)


def _stream_data(cfg: TrainConfig, size: int, prep: Preprocessing, dist: DistInfo, desc: dict) -> TrainData:
    """WebDataset shards for training, an ImageFolder for validation."""
    if cfg.wds_samples <= 0:
        raise ValueError("WebDataset shards do not say how many images they hold: set wds_samples=N")
    if not cfg.val_data:
        raise ValueError("WebDataset training needs val_data=FOLDER (an ImageFolder) for validation")
    pipe = D.webdataset_pipeline(cfg.data, train_transform(cfg, size, prep), cfg.batch_size, seed=cfg.seed)
    src = StreamBatches(
        pipe, samples=cfg.wds_samples, batch_size=cfg.batch_size, dist=dist, num_workers=cfg.num_workers
    )
    samples, names = D.scan_image_folder(cfg.val_data)
    desc["val"] = cfg.val_data
    return TrainData(src, D.FolderDataset(samples, names, partial(to_tensor, prep=prep)), names, desc)


@dataclass
class _Split:
    """The map-style sources while they are being read: in memory or a list of files, + validation."""

    train_mem: D.TensorImages | None = None
    samples: list | None = None  # (path, label) of an ImageFolder not (yet) decoded
    class_names: list[str] | None = None
    val: D.TensorImages | None = None
    held_samples: list | None = None  # validation files to decode or stream alongside `samples`


def _read_split(cfg: DataSettings, kind: str, size: int, seed: int, desc: dict) -> _Split:
    """The training set, the hold-out taken from it (`holdout`) or the separate validation set (`val_data`)."""
    sp = _Split(samples=[], class_names=[], held_samples=[])
    if kind == "synthetic":
        sp.train_mem = D.synthetic_images(cfg.synthetic_images, cfg.synthetic_classes, size, seed=seed)
    elif kind == "cifar10":
        sp.train_mem = D.load_cifar10(cfg.data, train=True)
        if not cfg.val_data and cfg.holdout <= 0:
            sp.val = D.load_cifar10(cfg.data, train=False)
            desc["val"] = "cifar10 test batch"
    elif kind == "folder":
        sp.samples, sp.class_names = D.scan_image_folder(cfg.data)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {D.DATASET_KINDS}")

    if cfg.holdout > 0 and not cfg.val_data:  # a validation set replaces the recipe's hold-out
        h = int(cfg.holdout) if cfg.holdout >= 1 else cfg.holdout
        if sp.train_mem is not None:
            tr_idx, ho_idx = D.holdout_indices(sp.train_mem.labels, h, cfg.holdout_seed)
            sp.val = sp.train_mem.subset(ho_idx)
            sp.train_mem = sp.train_mem.subset(tr_idx)
        else:
            sp.samples, sp.held_samples = D.holdout_split(sp.samples, h, cfg.holdout_seed)
        desc["val"] = (
            f"hold-out of {cfg.holdout:g} images from data (seed {cfg.holdout_seed}, class-stratified)"
        )
        desc["holdout"] = cfg.holdout
        desc["holdout_seed"] = cfg.holdout_seed

    if cfg.val_data:
        if D.detect_kind(cfg.val_data) == "cifar10":
            sp.val = D.load_cifar10(cfg.val_data, train=False)
        else:
            vs, vnames = D.scan_image_folder(cfg.val_data)
            train_names = sp.class_names or (sp.train_mem.class_names if sp.train_mem else [])
            D.check_class_folders(train_names, vnames, cfg.data, cfg.val_data)
            sp.held_samples = vs
        desc["val"] = cfg.val_data
    return sp


def build_data(cfg: TrainConfig, size: int, prep: Preprocessing, dist: DistInfo) -> TrainData:
    """Read the training and validation data the config names (see training/data.py for kinds). Reads the
    `data` and `augment` settings, and `seed`."""
    kind = D.detect_kind(cfg.data) if cfg.dataset == "auto" else cfg.dataset
    desc = {"data": cfg.data, "kind": kind}
    if kind == "wds":
        return _stream_data(cfg, size, prep, dist, desc)
    sp = _read_split(cfg, kind, size, cfg.seed, desc)
    loader_args = dict(batch_size=cfg.batch_size, dist=dist, seed=cfg.seed, num_workers=cfg.num_workers)

    if sp.train_mem is None:  # an ImageFolder: decode into memory if small enough
        decoded_gb = len(sp.samples) * 3 * size * size / 1e9
        in_mem = cfg.in_memory == "true" or (cfg.in_memory == "auto" and decoded_gb <= cfg.in_memory_max_gb)
        if not in_mem:
            ds = D.FolderDataset(sp.samples, sp.class_names, train_transform(cfg, size, prep))
            val = sp.val  # a CIFAR-10 val_data, or the held-out / val_data files read per batch
            if sp.held_samples:
                val = D.FolderDataset(sp.held_samples, sp.class_names, partial(to_tensor, prep=prep))
            desc["in_memory"] = False
            return TrainData(LoaderBatches(ds, **loader_args), val, sp.class_names, desc)
        t0 = time.perf_counter()
        sp.train_mem = D.decode_samples(sp.samples, sp.class_names, size, threads=_threads(), source=cfg.data)
        if sp.held_samples:
            sp.val = D.decode_samples(
                sp.held_samples, sp.class_names, size, threads=_threads(), source=cfg.data
            )
        desc["decode_s"] = round(time.perf_counter() - t0, 1)

    desc["in_memory"] = True
    desc["train_images"] = len(sp.train_mem)
    val = sp.val
    if isinstance(val, D.TensorImages):  # validation images at the model's size (the preprocessing rule)
        val = D.TensorImages(resize_uint8(val.images, size), val.labels, val.class_names, val.source)
        val = val.to(dist.device)
        desc["val_images"] = len(val)
    if cfg.randaug or cfg.color_jitter or cfg.reprob:  # timm's PIL transforms, in DataLoader workers
        ds = PILTensorDataset(sp.train_mem, train_transform(cfg, size, prep))
        return TrainData(LoaderBatches(ds, **loader_args), val, sp.train_mem.class_names, desc)
    src = TensorBatches(
        sp.train_mem.to(dist.device),
        batch_size=cfg.batch_size,
        dist=dist,
        seed=cfg.seed,
        image_size=size,
        scale=(cfg.scale_min, cfg.scale_max),
        hflip=cfg.hflip,
        mode=cfg.interpolation,
        prep=prep,
        crop=cfg.crop,
    )
    return TrainData(src, val, sp.train_mem.class_names, desc)
