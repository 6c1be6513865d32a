"""Optimiser construction: weight-decay groups, layer-wise lr decay, AdamW / SGD / LARS, EMA."""

from __future__ import annotations

import torch
from torch import nn


def layer_id(name: str, num_layers: int) -> int:
    """MAE's `get_layer_id_for_vit` on our names: embeddings are layer 0, block i is layer i + 1,
    everything after the blocks (norms, heads, decoder) is layer num_layers + 1."""
    if name.startswith(
        ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed", "encoder.reg_token")
    ):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    num_layers: int | None = None,
    decay_tokens: bool = True,
) -> list[dict]:
    """Parameter groups with no weight decay on 1-D tensors (norms, biases) and, unless `decay_tokens`,
    on the names in `model.no_weight_decay()` (cls / mask tokens, position tables). The official
    pretraining decays the tokens (timm 0.3.2's `add_weight_decay` exempts only 1-D tensors, frozen
    ones are skipped); the official fine-tuning does not (`param_groups_lrd` with timm's
    `no_weight_decay()`: pos_embed, cls_token). With `layer_decay` < 1 each group also carries
    `lr_scale = layer_decay ** (num_layers + 1 - layer_id)` (MAE fine-tuning, BEiT)."""
    skip = set()
    if not decay_tokens and hasattr(model, "no_weight_decay"):
        skip = model.no_weight_decay()
    if num_layers is None:
        num_layers = len(getattr(getattr(model, "encoder", model), "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        lid = layer_id(name, num_layers) if layer_decay < 1.0 else 0
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "names": []}
            if layer_decay < 1.0:
                groups[key]["lr_scale"] = layer_decay ** (num_layers + 1 - lid)
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """LARS as the official linear probe runs it (facebookresearch/mae `util/lars.py`, from MoCo v3):
    for tensors of more than one dimension the gradient gets the weight decay and is rescaled by the
    trust ratio `trust_coefficient * |w| / |g|`; 1-D tensors (biases, norms) get neither; then SGD
    momentum without dampening."""

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, 1.0
                    )
                    d = d * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


OPTIMIZERS = ("adamw", "sgd", "lars")


def build_optimizer(
    groups: list[dict],
    name: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (fused kernels on CUDA), SGD with momentum, or LARS (the official linear probe's). `names`
    entries stay in the groups for inspection; the optimisers ignore unknown group keys."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and BN statistics)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats_ema, floats_cur = [], []
        for k, v in self.state.items():
            if v.is_floating_point():
                floats_ema.append(v)
                floats_cur.append(current[k].detach())
            else:
                v.copy_(current[k])
        torch._foreach_lerp_(floats_ema, floats_cur, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
