"""The training engine: data -> model -> optimiser -> loop -> checkpoints -> final model card.

`train(cfg, out_dir)` is the one entry point (the CLI is a thin wrapper). One loop serves the three
stages; what differs per stage is the model (training/stages.py) and the recipe's numbers.

Determinism: the data order of an epoch depends only on (seed, epoch); the augmentation and the mask
of a step only on (seed, step), drawn for the whole global batch, each process taking its own rows.
So a run resumed from `last.pt` repeats the uninterrupted run's batches exactly, and N processes see
the same global batches as one process with the same global batch (the in-memory path; a streaming
DataLoader path keeps the order but its worker-side augmentation differs after a resume).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from supmae_serve.model import SupMAE, save_checkpoint
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import normalize, to_tensor

from . import data as D
from .augment import ClampedRandomResizedCrop, random_resized_crop, step_generator
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    convert_sync_batchnorm,
    init_distributed,
)
from .observe import MetricsLog, Progress, TensorBoard, reconstruction_grid
from .optim import EMA, build_optimizer, param_groups
from .recipes import TrainConfig
from .run_state import LAST, atomic_save, load_state, rng_state, set_rng_state
from .schedule import WarmupCosine, scaled_lr, set_lr
from .stages import continue_pretraining, export_model, finetune_model, linprobe_model, pretrain_model

FINAL = "final"  # the contract checkpoint folder inside the run folder
PATH_FIELDS = ("data", "val_data", "checkpoint")  # TrainConfig fields holding paths (card_path applies)


def card_path(path: str, start: str | os.PathLike | None = None, *, always: bool = False) -> str:
    """`path` as the model card records it: relative to the directory the run was started in (`start`,
    default the current one), so a card names no user's home or machine layout and its command re-runs
    from the same place. URLs and `synthetic` stay as given, relative paths too unless `always`, and so
    does an absolute path outside `start` (a shared dataset such as /data/imagenet/train: that is where
    the data is) unless `always` (the run folder, whose absolute place only names the machine)."""
    if not path or not (always or os.path.isabs(path)):
        return path
    start = os.path.abspath(start if start is not None else os.getcwd())
    p = os.path.abspath(path)
    try:
        inside = os.path.commonpath([p, start]) == start
    except ValueError:  # another drive (Windows)
        return path
    return os.path.relpath(p, start) if inside or always else path


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the intact checkpoint."""


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # the final contract checkpoint (rank 0), None on other ranks
    metrics: dict
    epochs: int  # completed epochs
    steps: int
    stopped: str  # completed | time_budget | max_steps
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------ batch sources
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

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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

    def epoch(self, epoch: int, start_step: int = 0):
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

    def epoch(self, epoch: int, start_step: int = 0):
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
    train: object  # TensorBatches | LoaderBatches | StreamBatches
    val: object  # D.TensorImages | torch Dataset | None
    class_names: list[str]
    description: dict


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (N, 3, H, W) stack to size x size (bicubic, antialiased), in chunks."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(1024):
        x = F.interpolate(
            chunk.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )
        out.append(x.clamp(0, 255).round().to(torch.uint8))
    return torch.cat(out)


def _timm_train_transform(cfg: TrainConfig, size: int, prep: Preprocessing):
    """The streaming path's transform: timm's (torchvision's crop rule, RandAug, erasing, jitter), or
    for crop=clamp the official linear probe's (MAE util/crop.py crop + flip)."""
    if cfg.crop == "clamp":
        from torchvision import transforms

        return transforms.Compose(
            [
                ClampedRandomResizedCrop(size, (cfg.scale_min, cfg.scale_max), cfg.interpolation),
                transforms.RandomHorizontalFlip(0.5 if cfg.hflip else 0.0),
                transforms.ToTensor(),
                transforms.Normalize(prep.mean, prep.std),
            ]
        )
    from timm.data import create_transform

    return create_transform(
        input_size=size,
        is_training=True,
        scale=(cfg.scale_min, cfg.scale_max),
        hflip=0.5 if cfg.hflip else 0.0,
        color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.randaug or None,
        interpolation=cfg.interpolation,
        re_prob=cfg.reprob,
        re_mode="pixel",
        mean=prep.mean,
        std=prep.std,
    )


def build_data(cfg: TrainConfig, size: int, prep: Preprocessing, dist: DistInfo) -> TrainData:
    """Read the training and validation data the config names (see training/data.py for kinds)."""
    kind = D.detect_kind(cfg.data) if cfg.dataset == "auto" else cfg.dataset
    desc = {"data": cfg.data, "kind": kind}
    val = None
    needs_pil = bool(cfg.randaug or cfg.color_jitter or cfg.reprob)

    if kind == "wds":
        if cfg.wds_samples <= 0:
            raise ValueError("WebDataset shards do not say how many images they hold: set wds_samples=N")
        pipe = D.webdataset_pipeline(
            cfg.data, _timm_train_transform(cfg, size, prep), cfg.batch_size, seed=cfg.seed
        )
        src = StreamBatches(
            pipe, samples=cfg.wds_samples, batch_size=cfg.batch_size, dist=dist, num_workers=cfg.num_workers
        )
        if cfg.val_data:
            samples, names = D.scan_image_folder(cfg.val_data)
            val = D.FolderDataset(samples, names, lambda im: to_tensor(im, prep))
            desc["val"] = cfg.val_data
            return TrainData(src, val, names, desc)
        raise ValueError("WebDataset training needs val_data=FOLDER (an ImageFolder) for validation")

    # ---- map-style sources: decide in-memory vs streaming
    train_mem: D.TensorImages | None = None
    samples: list = []
    class_names: list[str] = []
    if kind == "synthetic":
        train_mem = D.synthetic_images(cfg.synthetic_images, cfg.synthetic_classes, size, seed=cfg.seed)
    elif kind == "cifar10":
        train_mem = D.load_cifar10(cfg.data, train=True)
        if not cfg.val_data and cfg.holdout <= 0:
            val = D.load_cifar10(cfg.data, train=False)
            desc["val"] = "cifar10 test batch"
    elif kind == "folder":
        samples, class_names = D.scan_image_folder(cfg.data)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {D.DATASET_KINDS}")

    held_samples: list = []
    if cfg.holdout > 0 and not cfg.val_data:  # a validation set replaces the recipe's hold-out
        h = int(cfg.holdout) if cfg.holdout >= 1 else cfg.holdout
        if train_mem is not None:
            tr_idx, ho_idx = D.holdout_indices(train_mem.labels, h, cfg.holdout_seed)
            val = train_mem.subset(ho_idx)
            train_mem = train_mem.subset(tr_idx)
        else:
            samples, held_samples = D.holdout_split(samples, h, cfg.holdout_seed)
        desc["val"] = (
            f"hold-out of {cfg.holdout:g} images from data (seed {cfg.holdout_seed}, class-stratified)"
        )
        desc["holdout"] = cfg.holdout
        desc["holdout_seed"] = cfg.holdout_seed

    if cfg.val_data:
        vkind = D.detect_kind(cfg.val_data)
        if vkind == "cifar10":
            val = D.load_cifar10(cfg.val_data, train=False)
        else:
            vs, vnames = D.scan_image_folder(cfg.val_data)
            D.check_class_folders(
                class_names or (train_mem.class_names if train_mem else []), vnames, cfg.data, cfg.val_data
            )
            held_samples = vs
        desc["val"] = cfg.val_data

    if train_mem is None:  # an ImageFolder: decode into memory if small enough
        decoded_gb = len(samples) * 3 * size * size / 1e9
        in_mem = cfg.in_memory == "true" or (cfg.in_memory == "auto" and decoded_gb <= cfg.in_memory_max_gb)
        if in_mem:
            t0 = time.perf_counter()
            train_mem = D.decode_samples(
                samples, class_names, size, threads=max(1, (os.cpu_count() or 2)), source=cfg.data
            )
            if held_samples:
                val = D.decode_samples(
                    held_samples, class_names, size, threads=max(1, os.cpu_count() or 2), source=cfg.data
                )
            desc["decode_s"] = round(time.perf_counter() - t0, 1)
        else:
            ds = D.FolderDataset(samples, class_names, _timm_train_transform(cfg, size, prep))
            src = LoaderBatches(
                ds, batch_size=cfg.batch_size, dist=dist, seed=cfg.seed, num_workers=cfg.num_workers
            )
            if held_samples:
                val = D.FolderDataset(held_samples, class_names, lambda im: to_tensor(im, prep))
            desc["in_memory"] = False
            return TrainData(src, val, class_names, desc)

    desc["in_memory"] = True
    desc["train_images"] = len(train_mem)
    if isinstance(val, D.TensorImages):
        val = D.TensorImages(_resize_uint8(val.images, size), val.labels, val.class_names, val.source).to(
            dist.device
        )
        desc["val_images"] = len(val)
    if needs_pil:  # RandAugment / colour jitter / random erasing: timm's PIL transforms in workers
        ds = PILTensorDataset(train_mem, _timm_train_transform(cfg, size, prep))
        src = LoaderBatches(
            ds, batch_size=cfg.batch_size, dist=dist, seed=cfg.seed, num_workers=cfg.num_workers
        )
    else:
        src = TensorBatches(
            train_mem.to(dist.device),
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
    return TrainData(src, val, train_mem.class_names, desc)


# ------------------------------------------------------------------------------ evaluation
def _val_batches(val, batch_size: int, dist: DistInfo, prep: Preprocessing, limit: int | None = None):
    """This process's share of the validation set, in batches of normalised images."""
    if isinstance(val, D.TensorImages):
        idx = torch.arange(len(val) if limit is None else min(limit, len(val)))[dist.rank :: dist.world_size]
        for chunk in idx.split(batch_size):
            chunk = chunk.to(val.images.device)
            yield normalize(val.images[chunk], prep), val.labels[chunk]
    else:
        n = len(val) if limit is None else min(limit, len(val))
        shard = torch.utils.data.Subset(val, list(range(dist.rank, n, dist.world_size)))
        for x, y in D.batches(shard, batch_size=batch_size, num_workers=2):  # a bad image: DataError
            yield x.to(dist.device), y.to(dist.device)


@torch.no_grad()
def evaluate_head(
    model: SupMAE, val, batch_size: int, dist: DistInfo, prep: Preprocessing, amp_dtype
) -> dict:
    """Top-1/top-5 of the classification head on whole images (no masking), eval-mode BatchNorm:
    what a served checkpoint answers. Percentages, from the evaluator's top-k code."""
    from training.evaluate.metrics import percent, topk_correct  # one top-k code and unit with supmae-eval

    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=dist.device)  # correct@1, correct@5, n
    for x, y in _val_batches(val, batch_size, dist, prep):
        with torch.autocast(
            dist.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model.forward_features(x).logits
        hits = topk_correct(logits.float(), y, (1, 5))
        counts += torch.cat([hits, hits.new_tensor([len(y)])]).double()
    counts = all_reduce_sum(counts).tolist()
    model.train(was_training)
    n = max(counts[2], 1)
    return {"top1": percent(counts[0], n), "top5": percent(counts[1], n), "images": int(counts[2])}


# ------------------------------------------------------------------------------ the loop
def _amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """-> (autocast dtype or None, use a GradScaler)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        return torch.float16, device.type == "cuda"
    return None, False


def _build_model(cfg: TrainConfig, num_classes: int) -> tuple[SupMAE, str | None, dict]:
    """-> (model, its variant name or None for a shape outside the table, what it was initialised from)."""
    if cfg.stage == "pretrain":
        recipe = dict(
            framework=cfg.framework,
            mask_ratio=cfg.mask_ratio,
            norm_pix_loss=cfg.norm_pix_loss,
            cls_loss_ratio=cfg.cls_loss_ratio,
            cls_temperature=cfg.cls_temperature,
            cls_pool=cfg.pool,
            drop_path_rate=cfg.drop_path,
            label_smoothing=cfg.label_smoothing,
        )
        if not cfg.checkpoint:
            return pretrain_model(cfg.variant, num_classes, **recipe), cfg.variant, {}
        model, variant, parts = continue_pretraining(cfg.checkpoint, num_classes, cfg.img_size, **recipe)
        return model, variant, {"init_checkpoint": card_path(cfg.checkpoint), **parts}
    smoothing = 0.0 if (cfg.mixup > 0 or cfg.cutmix > 0) else cfg.label_smoothing  # Mixup smooths itself
    if cfg.stage == "finetune":
        model, variant = finetune_model(
            cfg.checkpoint, num_classes, cfg.drop_path, smoothing, pool=cfg.pool, img_size=cfg.img_size
        )
    else:
        model, variant = linprobe_model(cfg.checkpoint, num_classes, pool=cfg.pool, img_size=cfg.img_size)
    return model, variant, {"init_checkpoint": card_path(cfg.checkpoint)}


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    command: str | None = None,
    dist: DistInfo | None = None,
) -> TrainResult:
    """Run a recipe end to end; returns the final checkpoint and metrics.

    Writes into `out_dir`: `last.pt` (run state, every epoch), `epoch_NNNN.pt` (every `save_every`),
    `metrics.jsonl`, `tb/` (TensorBoard), `recon/epoch_NNNN.png`, `config.json`, and `final/`
    (model.safetensors + model.json: the checkpoint every other tool reads)."""
    cfg.validate()
    dist = dist or init_distributed()
    out = Path(out_dir)
    command = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    main = dist.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + dist.rank)
    t_start = time.perf_counter()
    device = dist.device

    # ---- data and model
    from supmae_serve.model import model_config

    if cfg.checkpoint:
        from supmae_serve.model import load_model_card

        size = cfg.img_size or load_model_card(cfg.checkpoint).config.img_size
    else:
        size = model_config(cfg.variant).img_size
    prep = Preprocessing.for_size(size)
    data = build_data(cfg, size, prep, dist)
    num_classes = cfg.num_classes or len(data.class_names)
    if num_classes != len(data.class_names):
        raise ValueError(f"num_classes={num_classes} but the data has {len(data.class_names)} classes")
    model, variant, init_info = _build_model(cfg, num_classes)
    model.to(device)
    if dist.distributed and cfg.sync_bn:
        model = convert_sync_batchnorm(model, device)
    mcfg = model.config
    masked = mcfg.has_decoder

    # ---- optimisation
    src = data.train
    steps_per_epoch = src.steps_per_epoch
    global_batch = cfg.batch_size * dist.world_size
    peak_lr = cfg.lr if cfg.lr > 0 else scaled_lr(cfg.blr, global_batch)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, decay_tokens=cfg.decay_tokens)
    opt = build_optimizer(
        groups, cfg.optimizer, peak_lr, (cfg.beta1, cfg.beta2), cfg.momentum, fused=device.type == "cuda"
    )
    amp_dtype, use_scaler = _amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    total_steps = cfg.epochs * steps_per_epoch
    sched = WarmupCosine(peak_lr, cfg.min_lr, round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )

    # ---- run state
    metrics_log = MetricsLog(out / "metrics.jsonl", enabled=main)
    epoch, step_in_epoch, step = 0, 0, 0
    history: list[dict] = []
    elapsed_before = 0.0
    if resume:
        state = load_state(out / LAST)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        history = list(state.get("history", []))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rngs = state["rng"]
        set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
        metrics_log.truncate_after(step)
    elif main:
        (out / LAST).unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if main:
        import json

        (out / "config.json").write_text(json.dumps({"command": command, **cfg.to_dict()}, indent=2) + "\n")

    train_model: nn.Module = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    if cfg.stage == "linprobe":
        model.encoder.eval()

    tb = TensorBoard(out / "tb", enabled=main and cfg.tensorboard)
    end_step = total_steps if cfg.max_steps <= 0 else min(total_steps, cfg.max_steps)
    progress = Progress(cfg.progress, end_step, step, enabled=main)
    terms = ["loss"] + (["loss_rec"] if masked else []) + (["loss_cls"] if masked and mcfg.has_head else [])
    if main:
        progress.message(
            f"supmae-train: {cfg.recipe} ({cfg.stage}, {variant or 'custom'}, {mcfg.framework}) on {device} x{dist.world_size} | "
            f"{data.description} | {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global batch {global_batch}, "
            f"lr {peak_lr:.3g} | out {out}"
        )

    def save_state(path: Path) -> None:
        rngs = all_gather_objects(rng_state())
        if main:
            atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "step": step,
                    "rng": rngs,
                    "config": cfg.to_dict(),
                    "class_names": data.class_names,
                    "history": history,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                },
                path,
            )
        barrier()

    def evaluate() -> dict:
        t_eval = time.perf_counter()
        res = {}
        if data.val is not None and mcfg.has_head:
            ev = evaluate_head(model, data.val, cfg.eval_batch_size, dist, prep, amp_dtype)
            res = {"top1": ev["top1"], "top5": ev["top5"], "images": ev["images"]}
            if ema is not None:
                shadow = SupMAE(mcfg).to(device) if not _is_probe(model) else None
                if shadow is not None:
                    shadow.load_state_dict(ema.state_dict())
                    res["ema_top1"] = evaluate_head(
                        shadow, data.val, cfg.eval_batch_size, dist, prep, amp_dtype
                    )["top1"]
        if main and masked and cfg.recon_images > 0 and isinstance(data.val, D.TensorImages):
            x = normalize(data.val.images[: cfg.recon_images], prep)
            was = model.training
            model.eval()
            reconstruction_grid(model, x, prep, out / "recon" / f"epoch_{epoch:04d}.png")
            model.train(was)
        rec = {
            "kind": "eval",
            "epoch": epoch,
            "step": step,
            **res,
            "eval_s": round(time.perf_counter() - t_eval, 2),
        }
        history.append(rec)
        metrics_log.write(rec)
        tb.scalars(res, step, "val")
        if main and res:
            progress.message(
                f"epoch {epoch}: holdout top-1 {res['top1']:.4f} top-5 {res['top5']:.4f} ({res['images']} images)"
            )
        return res

    stopped = "completed"
    last_eval: dict | None = None
    buf: list[torch.Tensor] = []
    buf_first = step
    t_int, imgs_int = time.perf_counter(), 0

    def flush() -> None:
        nonlocal buf, buf_first, t_int, imgs_int
        if not buf:
            return
        vals = all_reduce_mean(torch.stack(buf)).cpu()  # (k, T): the global-batch means
        bad = (~torch.isfinite(vals)).any(1).nonzero()
        if len(bad):
            at = buf_first + int(bad[0])
            msg = (
                f"non-finite loss ({vals[int(bad[0])].tolist()}) at step {at} (epoch {epoch}); run stopped. "
                f"The last good run state {out / LAST} is untouched"
                + (" (none was written yet)" if not (out / LAST).exists() else "")
                + ". Lower the lr (blr), set clip_grad, or use amp=bf16/fp32, then --resume."
            )
            metrics_log.write({"kind": "error", "step": at, "epoch": epoch, "message": msg})
            raise NonFiniteLossError(msg)
        dt = time.perf_counter() - t_int
        mean = vals.mean(0).tolist()
        rec = {"kind": "train", "epoch": epoch, "step": step, **dict(zip(terms, mean, strict=True))}
        rec["lr"] = sched(step - 1)
        rec["img_s"] = imgs_int / max(dt, 1e-9)
        metrics_log.write(rec)
        tb.scalars({k: v for k, v in rec.items() if k not in ("kind", "step")}, step, "train")
        progress.update(
            step, {"ep": epoch, **{k: rec[k] for k in terms}, "lr": rec["lr"], "img/s": round(rec["img_s"])}
        )
        buf, buf_first, t_int, imgs_int = [], step, time.perf_counter(), 0

    L = mcfg.num_patches
    try:
        while epoch < cfg.epochs and stopped == "completed":
            t_epoch = time.perf_counter()
            train_model.train()
            if cfg.stage == "linprobe":
                model.encoder.eval()
            for x, y in src.epoch(epoch, step_in_epoch):
                set_lr(opt, sched(step))
                noise = None
                if masked:  # the mask of every image of the global batch comes from (seed, step)
                    g = step_generator(cfg.seed + 1, step, device)
                    off = dist.rank * cfg.batch_size
                    noise = torch.rand(global_batch, L, generator=g, device=device)[off : off + x.shape[0]]
                if mixup is not None:
                    x, y = mixup(x, y)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    o = train_model(x, y, noise=noise)
                loss = o.loss
                if step == cfg.inject_nan_at_step:
                    loss = loss * float("nan")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad > 0:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(opt)
                scaler.update()
                if ema is not None:
                    ema.update(model)
                parts = [loss.detach().float()]
                if masked:
                    parts.append(o.loss_rec.detach().float())
                    if mcfg.has_head:
                        parts.append(o.loss_cls.detach().float())
                buf.append(torch.stack(parts))
                step += 1
                step_in_epoch += 1
                imgs_int += global_batch
                if step % cfg.log_every == 0:
                    flush()
                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    flush()
                    save_state(out / LAST)
                if cfg.max_steps and step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
            flush()
            if step_in_epoch >= steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            last_step_of_run = epoch >= cfg.epochs or stopped != "completed"
            if epoch % cfg.eval_every == 0 or last_step_of_run:
                last_eval = evaluate()
            save_state(out / LAST)
            if main and cfg.save_every and epoch % cfg.save_every == 0 and step_in_epoch == 0:
                atomic_save(load_state(out / LAST), out / f"epoch_{epoch:04d}.pt")
            if cfg.max_minutes > 0 and not last_step_of_run:
                spent = time.perf_counter() - t_start
                over = spent + (time.perf_counter() - t_epoch) > cfg.max_minutes * 60
                if broadcast_object(over):
                    stopped = "time_budget"
                    progress.message(
                        f"time budget of {cfg.max_minutes:g} min reached after epoch {epoch}; stopping"
                    )
        if not history or history[-1]["step"] != step:
            last_eval = evaluate()
            save_state(out / LAST)
    finally:
        progress.close()
        tb.close()

    # ---- the final checkpoint: the contract every other tool reads
    final_model = export_model(model)
    weights = "model"
    if ema is not None and not _is_probe(model):
        final_model = SupMAE(mcfg)
        final_model.load_state_dict(ema.state_dict())
        weights = "ema"
    split = "holdout" if "holdout" in data.description else "val"
    metrics = {}
    if last_eval and "top1" in last_eval:
        metrics = {
            f"{split}_top1": round(last_eval["top1"], 5),
            f"{split}_top5": round(last_eval["top5"], 5),
            f"{split}_images": last_eval["images"],
            "metric_source": "classification head on whole images (no masking), eval-mode BatchNorm",
        }
        if weights == "ema" and "ema_top1" in last_eval:
            metrics[f"{split}_top1"] = round(last_eval["ema_top1"], 5)
    wall = elapsed_before + time.perf_counter() - t_start
    training = {
        "recipe": cfg.recipe,
        "stage": cfg.stage,
        "data": {k: card_path(v) if k in ("data", "val") else v for k, v in data.description.items()},
        "command": command,
        "epochs": epoch,
        "planned_epochs": cfg.epochs,
        "steps": step,
        "global_batch": global_batch,
        "world_size": dist.world_size,
        "images_seen": step * global_batch,
        "stopped": stopped,
        "weights": weights,
        "wall_clock_s": round(wall, 1),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "config": {
            k: card_path(v) if k in PATH_FIELDS else v
            for k, v in cfg.to_dict().items()
            if k != "inject_nan_at_step"
        },
        **init_info,
    }
    ckpt = None
    if main:
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            cfg.save_dtype
        ]
        save_checkpoint(
            final_model.cpu() if final_model is not model else _cpu_copy(final_model),
            out / FINAL,
            variant=variant,
            class_names=data.class_names if mcfg.has_head else None,
            preprocessing=prep,
            training=training,
            metrics=metrics,
            dtype=dtype,
        )
        ckpt = out / FINAL
        progress.message(f"final checkpoint {ckpt} ({stopped} after {epoch} epochs, {step} steps): {metrics}")
    barrier()
    return TrainResult(out, ckpt, metrics, epoch, step, stopped, history)


def _is_probe(model: nn.Module) -> bool:
    return hasattr(getattr(model, "cls_head", None), "folded")


def _cpu_copy(model: SupMAE) -> SupMAE:
    m = SupMAE(model.config)
    m.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return m


def config_from_state(out_dir: str | os.PathLike) -> TrainConfig:
    """The config a run was started with (for `--resume` without repeating the recipe)."""
    state = load_state(Path(out_dir) / LAST)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in state["config"].items() if k in known})


__all__ = [
    "FINAL",
    "PATH_FIELDS",
    "NonFiniteLossError",
    "TrainResult",
    "build_data",
    "card_path",
    "config_from_state",
    "evaluate_head",
    "train",
]
