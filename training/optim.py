"""Optimiser construction: weight-decay groups, layer-wise lr decay, AdamW/SGD, EMA."""

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
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, num_layers: int | None = None
) -> list[dict]:
    """Parameter groups with no weight decay on 1-D tensors (norms, biases) and on the names in
    `model.no_weight_decay()` (tokens, position tables); with `layer_decay` < 1 each group also
    carries `lr_scale = layer_decay ** (num_layers + 1 - layer_id)` (MAE fine-tuning, BEiT)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
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


def build_optimizer(
    groups: list[dict],
    name: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (fused kernels on CUDA) or SGD with momentum. `names` entries stay in the groups for
    inspection; the optimisers ignore unknown group keys."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be adamw or sgd, got {name!r}")


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
