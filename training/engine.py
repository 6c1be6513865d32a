"""The training engine: data -> model -> optimiser -> loop -> checkpoints -> final model card.

`train(cfg, out_dir)` is the one entry point (the CLI is a thin wrapper). One loop serves the three
stages; what differs per stage is the model (training/stages.py) and the recipe's numbers. The parts
live beside it: the batch sources (training/batches.py), the step (training/step.py), validation
(training/validate.py), the run state and `last.pt` (training/run_state.py), the records
(training/observe.py).

Determinism: the data order of an epoch depends only on (seed, epoch); the augmentation and the mask
of a step only on (seed, step), drawn for the whole global batch, each process taking its own rows.
So a run resumed from `last.pt` repeats the uninterrupted run's batches exactly, and N processes see
the same global batches as one process with the same global batch (the in-memory path; a streaming
DataLoader path keeps the order but its worker-side augmentation differs after a resume).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from supmae_serve.model import SupMAE, create_model, save_checkpoint
from supmae_serve.model.checkpoint import Preprocessing

from .batches import TrainData, build_data
from .distributed import DistInfo, barrier, broadcast_object, convert_sync_batchnorm, init_distributed
from .observe import MetricsLog, NonFiniteLossError, Progress, TensorBoard, TrainLog
from .optim import EMA, build_optimizer, param_groups
from .recipes import TrainConfig
from .run_state import LAST, Checkpointer, RunState, load_state
from .schedule import WarmupCosine, scaled_lr, set_lr
from .stages import continue_pretraining, export_model, finetune_model, linprobe_model, pretrain_model
from .step import StepParts, mask_noise, train_step
from .validate import Validator, evaluate_head, is_probe

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


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # the final contract checkpoint (rank 0), None on other ranks
    metrics: dict
    epochs: int  # completed epochs
    steps: int
    stopped: str  # completed | time_budget | max_steps
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the evaluation record with the highest top-1 (RunState.best)


# ------------------------------------------------------------------------------ set-up
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


@dataclass
class Run:
    """Everything the loop uses, built once by `_setup` (torchtitan's Trainer attributes, as one value)."""

    cfg: TrainConfig
    dist: DistInfo
    out: Path
    prep: Preprocessing
    data: TrainData
    model: SupMAE  # the bare model (saved, evaluated, EMA'd)
    variant: str | None
    init_info: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    sched: WarmupCosine
    mixup: object | None  # timm Mixup (fine-tuning)
    amp_dtype: torch.dtype | None
    peak_lr: float
    validator: Validator
    checkpointer: Checkpointer
    train_model: nn.Module | None = None  # `model` under DDP / torch.compile: what the step calls
    parts: StepParts | None = None
    log: TrainLog | None = None

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.data.train.steps_per_epoch

    @property
    def terms(self) -> list[str]:
        """The loss terms logged: the total, and for a masked model its reconstruction and classification parts."""
        mcfg = self.model.config
        masked = mcfg.has_decoder
        return (
            ["loss"] + (["loss_rec"] if masked else []) + (["loss_cls"] if masked and mcfg.has_head else [])
        )


def _image_size(cfg: TrainConfig) -> int:
    from supmae_serve.model import load_model_card, model_config

    if cfg.checkpoint:
        return cfg.img_size or load_model_card(cfg.checkpoint).config.img_size
    return model_config(cfg.variant).img_size


def _setup(cfg: TrainConfig, out: Path, dist: DistInfo) -> Run:
    """Data, model, optimiser, schedule, validation and checkpointing for `cfg` (no run state yet)."""
    device = dist.device
    size = _image_size(cfg)
    prep = Preprocessing.for_size(size)
    data = build_data(cfg, size, prep, dist)
    num_classes = cfg.num_classes or len(data.class_names)
    if num_classes != len(data.class_names):
        raise ValueError(f"num_classes={num_classes} but the data has {len(data.class_names)} classes")
    model, variant, init_info = _build_model(cfg, num_classes)
    model.to(device)
    if dist.distributed and cfg.sync_bn:
        model = convert_sync_batchnorm(model, device)

    global_batch = cfg.batch_size * dist.world_size
    peak_lr = cfg.lr if cfg.lr > 0 else scaled_lr(cfg.blr, global_batch)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, decay_tokens=cfg.decay_tokens)
    opt = build_optimizer(
        groups, cfg.optimizer, peak_lr, (cfg.beta1, cfg.beta2), cfg.momentum, fused=device.type == "cuda"
    )
    amp_dtype, use_scaler = _amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    spe = data.train.steps_per_epoch
    sched = WarmupCosine(peak_lr, cfg.min_lr, round(cfg.warmup_epochs * spe), cfg.epochs * spe)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
    validator = Validator(
        data.val, cfg.eval_batch_size, dist, prep, amp_dtype, cfg.recon_images, out / "recon"
    )
    parts = {"model": model, "optimizer": opt, "scaler": scaler, "ema": ema}
    extra = {"config": cfg.to_dict(), "class_names": data.class_names}
    checkpointer = Checkpointer(out, parts, extra, rank=dist.rank, is_main=dist.is_main)
    return Run(
        cfg=cfg, dist=dist, out=out, prep=prep, data=data, model=model, variant=variant, init_info=init_info,
        optimizer=opt, scaler=scaler, ema=ema, sched=sched, mixup=mixup, amp_dtype=amp_dtype, peak_lr=peak_lr,
        validator=validator, checkpointer=checkpointer,
    )  # fmt: skip


def _start(r: Run, state: RunState, resume: bool, command: str) -> None:
    """Resume (or clear the run folder of an earlier run), write config.json, wrap the model for DDP and
    torch.compile, and build the step and the log."""
    cfg, dist, out, model = r.cfg, r.dist, r.out, r.model
    metrics_log = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main)
    if resume:
        r.checkpointer.resume(state)
        metrics_log.truncate_after(state.step)
    elif dist.is_main:
        (out / LAST).unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if dist.is_main:
        (out / "config.json").write_text(json.dumps({"command": command, **cfg.to_dict()}, indent=2) + "\n")

    train_model: nn.Module = model
    if dist.distributed:
        device = dist.device
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    r.train_model = train_model
    r.parts = StepParts(
        forward=lambda x, y, noise: train_model(x, y, noise=noise),
        optimizer=r.optimizer,
        device_type=dist.device.type,
        amp_dtype=r.amp_dtype,
        scaler=r.scaler,
        clip_grad=cfg.clip_grad,
        clip_params=list(model.parameters()),
        ema=r.ema,
        ema_model=model,
        terms=tuple(r.terms),
    )
    total = cfg.epochs * r.steps_per_epoch
    end_step = total if cfg.max_steps <= 0 else min(total, cfg.max_steps)
    progress = Progress(cfg.progress, end_step, state.step, enabled=dist.is_main)
    tb = TensorBoard(out / "tb", enabled=dist.is_main and cfg.tensorboard)
    r.log = TrainLog(metrics_log, tb, progress, r.terms, r.sched, out / LAST)
    r.log.start(state.step)
    if dist.is_main:
        mcfg = model.config
        progress.message(
            f"supmae-train: {cfg.recipe} ({cfg.stage}, {r.variant or 'custom'}, {mcfg.framework}) on {dist.device} x{dist.world_size} | "
            f"{r.data.description} | {r.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global batch {r.global_batch}, "
            f"lr {r.peak_lr:.3g} | out {out}"
        )


# ------------------------------------------------------------------------------ the loop
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
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + dist.rank)
    state = RunState()  # its clock starts here: data loading counts as run time

    # ---- set-up: data, model, optimiser; then resume, or start afresh
    r = _setup(cfg, out, dist)
    _start(r, state, resume, command)

    stopped = "completed"
    try:
        while state.epoch < cfg.epochs and stopped == "completed":
            t_epoch = time.perf_counter()
            # ---- train: one epoch of steps (or to max_steps)
            stopped = _train_epoch(r, state)
            state.end_epoch(r.steps_per_epoch)
            last_of_run = state.epoch >= cfg.epochs or stopped != "completed"
            # ---- validate every eval_every epochs and at the end
            if state.epoch % cfg.eval_every == 0 or last_of_run:
                _validate(r, state)
            # ---- checkpoint: last.pt every epoch, a kept copy every save_every epochs
            r.checkpointer.save(state)
            if (
                dist.is_main
                and cfg.save_every
                and state.epoch % cfg.save_every == 0
                and state.step_in_epoch == 0
            ):
                r.checkpointer.keep_epoch(state.epoch)
            # ---- time budget: stop where the next epoch would overrun it (every process agrees)
            if cfg.max_minutes > 0 and not last_of_run:
                spent = time.perf_counter() - state.started
                over = spent + (time.perf_counter() - t_epoch) > cfg.max_minutes * 60
                if broadcast_object(over):
                    stopped = "time_budget"
                    r.log.progress.message(
                        f"time budget of {cfg.max_minutes:g} min reached after epoch {state.epoch}; stopping"
                    )
        if not state.history or state.history[-1]["step"] != state.step:  # the final weights, evaluated
            _validate(r, state)
            r.checkpointer.save(state)
    finally:
        r.log.close()

    # ---- the final checkpoint: the contract every other tool reads
    ckpt, metrics = save_final(r, state, stopped, command)
    barrier()
    return TrainResult(out, ckpt, metrics, state.epoch, state.step, stopped, state.history, state.best)


def _train_epoch(r: Run, state: RunState) -> str:
    """The steps of epoch `state.epoch` from `state.step_in_epoch` on -> "completed" or "max_steps"."""
    cfg, dist = r.cfg, r.dist
    r.train_model.train()
    if cfg.stage == "linprobe":
        r.model.encoder.eval()
    masked = r.model.config.has_decoder
    for x, y in r.data.train.epoch(state.epoch, state.step_in_epoch):
        set_lr(r.optimizer, r.sched(state.step))
        noise = None
        if masked:  # the mask of every image of the global batch comes from (seed, step)
            off = dist.rank * cfg.batch_size
            L = r.model.config.num_patches
            noise = mask_noise(cfg.seed + 1, state.step, r.global_batch, L, off, x.shape[0], dist.device)
        if r.mixup is not None:
            x, y = r.mixup(x, y)
        losses = train_step(r.parts, x, y, noise, nan_loss=state.step == cfg.inject_nan_at_step)
        r.log.add(losses, r.global_batch)
        state.advance()
        if state.step % cfg.log_every == 0:
            r.log.flush(state.epoch, state.step)
        if cfg.save_every_steps and state.step % cfg.save_every_steps == 0:
            r.log.flush(state.epoch, state.step)
            r.checkpointer.save(state)
        if cfg.max_steps and state.step >= cfg.max_steps:
            r.log.flush(state.epoch, state.step)
            return "max_steps"
    r.log.flush(state.epoch, state.step)
    return "completed"


def _validate(r: Run, state: RunState) -> dict:
    """Evaluate the current weights; the record goes to the log and the run's history."""
    res = r.validator(r.model, r.ema, state.epoch)
    rec = r.log.evaluation(res, state.epoch, state.step, r.dist.is_main)
    state.history.append(rec)
    return rec


# ------------------------------------------------------------------------------ the final checkpoint
def final_metrics(last_eval: dict | None, split: str, weights: str) -> dict:
    """The model card's metrics from the last evaluation record (the EMA's top-1 when EMA weights are saved)."""
    if not last_eval or "top1" not in last_eval:
        return {}
    metrics = {
        f"{split}_top1": round(last_eval["top1"], 5),
        f"{split}_top5": round(last_eval["top5"], 5),
        f"{split}_images": last_eval["images"],
        "metric_source": "classification head on whole images (no masking), eval-mode BatchNorm",
    }
    if weights == "ema" and "ema_top1" in last_eval:
        metrics[f"{split}_top1"] = round(last_eval["ema_top1"], 5)
    return metrics


def _training_record(r: Run, state: RunState, stopped: str, weights: str, command: str) -> dict:
    """The model card's `training` section: how the weights were made."""
    cfg, dist = r.cfg, r.dist
    device = dist.device
    return {
        "recipe": cfg.recipe,
        "stage": cfg.stage,
        "data": {k: card_path(v) if k in ("data", "val") else v for k, v in r.data.description.items()},
        "command": command,
        "epochs": state.epoch,
        "planned_epochs": cfg.epochs,
        "steps": state.step,
        "global_batch": r.global_batch,
        "world_size": dist.world_size,
        "images_seen": state.step * r.global_batch,
        "stopped": stopped,
        "weights": weights,
        "wall_clock_s": round(state.elapsed(), 1),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "config": {
            k: card_path(v) if k in PATH_FIELDS else v
            for k, v in cfg.to_dict().items()
            if k != "inject_nan_at_step"
        },
        **r.init_info,
    }


def save_final(r: Run, state: RunState, stopped: str, command: str) -> tuple[Path | None, dict]:
    """Write `final/` (weights + model card; the EMA weights when the run kept an EMA) on the main
    process -> (its path or None on other processes, the card's metrics)."""
    model, mcfg = r.model, r.model.config
    final_model = export_model(model)
    weights = "model"
    if r.ema is not None and not is_probe(model):
        final_model = create_model(mcfg)
        final_model.load_state_dict(r.ema.state_dict())
        weights = "ema"
    split = "holdout" if "holdout" in r.data.description else "val"
    metrics = final_metrics(state.last_eval, split, weights)
    training = _training_record(r, state, stopped, weights, command)
    if not r.dist.is_main:
        return None, metrics
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[r.cfg.save_dtype]
    save_checkpoint(
        final_model.cpu() if final_model is not model else _cpu_copy(final_model),
        r.out / FINAL,
        variant=r.variant,
        class_names=r.data.class_names if mcfg.has_head else None,
        preprocessing=r.prep,
        training=training,
        metrics=metrics,
        dtype=dtype,
    )
    ckpt = r.out / FINAL
    r.log.progress.message(
        f"final checkpoint {ckpt} ({stopped} after {state.epoch} epochs, {state.step} steps): {metrics}"
    )
    return ckpt, metrics


def _cpu_copy(model: SupMAE) -> SupMAE:
    m = create_model(model.config)
    m.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return m


def config_from_state(out_dir: str | os.PathLike) -> TrainConfig:
    """The config a run was started with (for `--resume` without repeating the recipe); a run saved
    with the flat config of earlier versions reads the same."""
    return TrainConfig.from_dict(load_state(Path(out_dir) / LAST)["config"])


__all__ = [
    "FINAL",
    "PATH_FIELDS",
    "NonFiniteLossError",
    "TrainResult",
    "build_data",
    "card_path",
    "config_from_state",
    "evaluate_head",
    "save_final",
    "train",
]
