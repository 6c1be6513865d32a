"""The linear probe: a linear classifier on frozen, standardised features (linprobe and fewshot fit it).

CE + weight_decay / 2 * |W|^2, fitted with full-batch L-BFGS (or minibatch Adam); without a given weight
decay, the L2 strength is picked from WD_GRID by accuracy on a stratified validation split."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EvalError
from .metrics import percent

WD_GRID = (1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # L2 strengths tried (strong to weak)
DEFAULT_WD = 1e-3  # when no validation split can be made (one image per class)


@dataclass
class ProbeConfig:
    """The linear classifier of linprobe and fewshot: CE + weight_decay / 2 * |W|^2 on standardised
    features."""

    optimizer: str = "lbfgs"  # lbfgs (full batch) | adam (minibatches: bounded memory on very large sets)
    weight_decay: float | None = None  # None: pick from WD_GRID by accuracy on a validation split
    val_fraction: float = 0.2  # share of each class held out of the training features to pick it
    max_iter: int = 1000  # lbfgs iterations
    epochs: int = 100  # adam
    lr: float = 1e-3  # adam
    batch_size: int = 4096  # adam
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise EvalError(f"probe optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise EvalError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.val_fraction < 1:
            raise EvalError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class LinearProbe:
    """Standardise, then a linear layer: logits = ((x - mean) / std) @ weight + bias."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    weight_decay: float
    selection: dict = field(default_factory=dict)  # validation top-1 and loss per L2 strength tried

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float32)
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def _fit_linear(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    wd: float,
    cfg: ProbeConfig,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE(z @ W + b, y) + wd / 2 * |W|^2, from zero or `init` (a warm start along the
    weight-decay grid). The problem is convex, so the start changes the iterations, not the answer."""
    if init is None:
        w = torch.zeros(z.shape[1], num_classes, device=z.device)
        b = torch.zeros(num_classes, device=z.device)
    else:
        w, b = (t.detach().clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def objective(zb, yb):
        return F.cross_entropy(zb @ w + b, yb) + 0.5 * wd * (w * w).sum()

    if cfg.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=cfg.max_iter,
            history_size=20,
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = objective(z, y)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
    else:
        opt = torch.optim.Adam([w, b], lr=cfg.lr)
        steps_per_epoch = math.ceil(len(z) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                perm = torch.randperm(len(z), generator=gen).to(z.device)
                for start in range(0, len(z), cfg.batch_size):
                    idx = perm[start : start + cfg.batch_size]
                    opt.zero_grad()
                    objective(z[idx], y[idx]).backward()
                    opt.step()
                    sched.step()
    return w.detach(), b.detach()


def _stratified_val(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `fraction` of each class with >= 2 items goes to val (at least one)."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    labels = y.cpu().numpy()
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(len(idx) * fraction)) if len(idx) >= 2 else 0
        va.extend(idx[:n_val])
        tr.extend(idx[n_val:])
    return torch.as_tensor(sorted(tr), dtype=torch.long), torch.as_tensor(sorted(va), dtype=torch.long)


@contextmanager
def _few_threads_for_small_cpu_work(device: torch.device, numel: int):
    """Intra-op threads only slow down the many tiny matmuls of a small probe (few-shot: hundreds of
    rows), badly so on a busy machine: use one thread for those, restored afterwards."""
    if device.type != "cpu" or numel > 1 << 21:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Fit a linear probe on frozen features (on `device`). Features are standardised with the
    training mean and std; without a given weight decay, each of WD_GRID is fitted on a stratified
    split of the training features, and the one with the best accuracy on the held-out part (ties:
    the lower cross-entropy there) is refitted on all of them."""
    if len(train_x) == 0:
        raise EvalError("linear probe: no training features")
    device = torch.device(device)
    with _few_threads_for_small_cpu_work(device, train_x.numel()):
        return _fit_linear_probe(
            train_x.to(device, torch.float32), train_y.to(device, torch.long), num_classes, cfg
        )


def _fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> LinearProbe:
    device = x.device
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    wd, selection = cfg.weight_decay, {}
    if wd is None:
        tr, va = _stratified_val(y, cfg.val_fraction, cfg.seed)
        tr, va = tr.to(device), va.to(device)
        if len(va) == 0 or len(tr) == 0:
            wd, selection = DEFAULT_WD, {"note": "too few images per class for a validation split"}
        else:
            best, params = None, None
            for cand in WD_GRID:  # strong to weak, each fit starting from the previous solution
                params = _fit_linear(z[tr], y[tr], num_classes, cand, cfg, init=params)
                w, b = params
                with torch.no_grad():
                    val_logits = z[va] @ w + b
                    acc = percent((val_logits.argmax(1) == y[va]).sum().item(), len(va))
                    loss = F.cross_entropy(val_logits, y[va]).item()
                selection[f"{cand:g}"] = {"val_top1": acc, "val_loss": loss}
                if best is None or (acc, -loss) > best[0]:  # accuracy first, then the lower loss
                    best = ((acc, -loss), cand)
            wd = best[1]
    w, b = _fit_linear(z, y, num_classes, wd, cfg)
    return LinearProbe(mean, std, w, b, float(wd), selection)
