"""One optimisation step: forward under autocast, loss, backward (loss-scaled), clip, optimiser, EMA.

`train_step` is the step the trainer runs and the one `benchmarks/train_throughput.py` times (with its
compile and CUDA-graph levers around it), so the benchmark measures the training code itself. It never
reads a value back to the host (no `.item()`): the losses come back as a device tensor, and the caller
decides when to synchronise (the trainer every `log_every` steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Forward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]


@dataclass
class StepParts:
    """What every step uses, built once per run.

    `forward(x, y, noise)` returns the model's output: an object with a `loss` tensor (and, for
    `terms` beyond "loss", those too: SupMAE's `loss_rec`, `loss_cls`). It may be a compiled callable."""

    forward: Forward
    optimizer: torch.optim.Optimizer
    device_type: str = "cpu"
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32, no autocast
    autocast_cache: bool = True  # False inside a CUDA-graph capture (its casts must be replayed)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (enabled or not)
    clip_grad: float = 0.0  # max grad norm; 0 = off
    clip_params: Sequence[nn.Parameter] | None = None  # the parameters to clip (required when clip_grad > 0)
    ema: Any = None  # training.optim.EMA (`update(model)`), with `ema_model` its source
    ema_model: nn.Module | None = None
    optimizer_step: Callable[[], Any] | None = None  # e.g. a compiled `optimizer.step`; default the plain one
    terms: tuple[str, ...] = ("loss",)  # output fields returned, detached, as one (T,) tensor


def train_step(
    parts: StepParts,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    nan_loss: bool = False,
) -> torch.Tensor:
    """One step on the batch (x, y) -> the loss terms of `parts.terms`, detached float32 (T,), on the
    device. `noise` is the per-patch masking noise (None: the model draws it); `nan_loss` turns the loss
    into NaN (fault injection for the trainer's non-finite-loss guard)."""
    opt = parts.optimizer
    # gradients freed before the forward, not after it: the last step's do not sit beside the activations
    opt.zero_grad(set_to_none=True)
    with torch.autocast(
        parts.device_type,
        dtype=parts.amp_dtype or torch.float32,
        enabled=parts.amp_dtype is not None,
        cache_enabled=parts.autocast_cache,
    ):
        out = parts.forward(x, y, noise)
    loss = out.loss
    if nan_loss:
        loss = loss * float("nan")
    scaler = parts.scaler
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if parts.clip_grad > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(parts.clip_params, parts.clip_grad)
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        if parts.clip_grad > 0:
            nn.utils.clip_grad_norm_(parts.clip_params, parts.clip_grad)
        (parts.optimizer_step or opt.step)()
    if parts.ema is not None:
        parts.ema.update(parts.ema_model)
    return torch.stack([loss.detach().float(), *(getattr(out, t).detach().float() for t in parts.terms[1:])])


def mask_noise(
    seed: int, step: int, global_batch: int, num_patches: int, offset: int, rows: int, device: torch.device
) -> torch.Tensor:
    """The masking noise of this process's `rows` images of a step: drawn for the whole global batch from
    (seed, step), this process taking rows [offset, offset + rows), so the masks do not depend on the
    number of processes and a resumed run draws the same ones. (rows, num_patches)."""
    from .augment import step_generator

    g = step_generator(seed, step, device)
    return torch.rand(global_batch, num_patches, generator=g, device=device)[offset : offset + rows]
