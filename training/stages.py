"""The model each stage trains.

- pretrain: a fresh SupMAE (or MAE / SimMIM / supervised) model of a named variant, or, with a
  checkpoint, that checkpoint's architecture with every tensor it has (an imported MAE encoder, an
  MAE with decoder): SupMAE training started from MAE weights. Parts the checkpoint lacks, or holds
  untrained (its card says which), start fresh.
- finetune: the encoder of a pretrained checkpoint under the `finetuned` framework, as MAE's
  `main_finetune.py` does: the decoder and the pretraining head are dropped; with global pooling the
  final `norm` is dropped and `fc_norm` starts fresh (weight 1, bias 0), with the cls token the final
  norm is kept; the head starts with trunc-normal std 2e-5; the position table is trained.
- linprobe: the same frozen encoder with its final norm, the cls token (FINETUNE.md: "linear probing
  is using the class token") or the average of the patch tokens, and a linear head behind a
  BatchNorm without affine parameters (MAE's `main_linprobe.py`); the BatchNorm is folded into the
  linear layer when the checkpoint is written, so the saved model is a plain `supervised` model.

Starting from a checkpoint at another `img_size` interpolates its position tables first (MAE's
`interpolate_pos_embed`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from supmae_serve.model import ModelCard, SupMAE, create_model, load_checkpoint
from supmae_serve.model.masking import interpolate_pos_embed
from supmae_serve.model.official import part_of
from supmae_serve.model.variants import find_variant


def pretrain_model(variant: str, num_classes: int, **overrides) -> SupMAE:
    return create_model(variant, num_classes=num_classes, **overrides)


def load_source(checkpoint: str, img_size: int = 0) -> tuple[SupMAE, ModelCard]:
    """The checkpoint's model, with its position tables interpolated to `img_size` (0: as saved)."""
    source, card = load_checkpoint(checkpoint)
    if not img_size or img_size == source.config.img_size:
        return source, card
    resized = create_model(source.config, img_size=img_size)
    grid = resized.config.grid
    state = source.state_dict()
    for k in ("encoder.pos_embed", "decoder_pos_embed"):
        if k in state:
            state[k] = interpolate_pos_embed(state[k], grid)
    resized.load_state_dict(state, strict=True)
    return resized.eval(), card


def continue_pretraining(
    checkpoint: str, num_classes: int, img_size: int = 0, **recipe
) -> tuple[SupMAE, str | None, dict]:
    """The checkpoint's architecture with the recipe's framework and losses; every tensor the checkpoint
    holds trained and in the same shape is copied. -> (model, variant, {init_parts, fresh_parts})."""
    source, card = load_source(checkpoint, img_size)
    if source.config.framework == "finetuned":
        raise ValueError(
            f"{checkpoint}: pretraining continues from a pretrained checkpoint, not a fine-tuned one"
        )
    model = create_model(source.config, num_classes=num_classes, **recipe)
    target = model.state_dict()
    copied = {
        k: v
        for k, v in source.state_dict().items()
        if k in target and target[k].shape == v.shape and part_of(k) not in card.untrained
    }
    model.load_state_dict(copied, strict=False)
    parts = {
        "init_parts": sorted({part_of(k) for k in copied}),
        "fresh_parts": sorted({part_of(k) for k in target if k not in copied}),
    }
    return model, find_variant(model.config), parts


def finetune_model(
    checkpoint: str,
    num_classes: int,
    drop_path: float = 0.1,
    label_smoothing: float = 0.0,
    pool: str = "avg",
    img_size: int = 0,
) -> tuple[SupMAE, str | None]:
    """-> (the fine-tuning model, its variant)."""
    source, _ = load_source(checkpoint, img_size)
    cfg = dataclasses.replace(
        source.config,
        framework="finetuned",
        num_classes=num_classes,
        drop_path_rate=drop_path,
        label_smoothing=label_smoothing,
        cls_pool=pool,
    )
    model = create_model(cfg)
    state = source.encoder.state_dict()
    if pool == "avg":  # global pooling: fc_norm starts fresh, the final norm is dropped (MAE)
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "fc_norm."))}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if set(missing) - {"fc_norm.weight", "fc_norm.bias"} or unexpected:
        raise ValueError(
            f"{checkpoint}: its encoder does not fit a {pool}-pooled fine-tuning model "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    nn.init.trunc_normal_(model.cls_head.weight, std=2e-5)  # MAE main_finetune.py
    nn.init.zeros_(model.cls_head.bias)
    return model, find_variant(cfg)


class ProbeHead(nn.Sequential):
    """BatchNorm1d(affine=False) -> Linear: MAE's linear-probe head (normalises the features)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """The equivalent single Linear (eval-mode BN statistics folded in)."""
        bn, fc = self[0], self[1]
        inv = torch.rsqrt(bn.running_var + bn.eps)  # (D,)
        out = nn.Linear(fc.in_features, fc.out_features)
        out.weight.copy_(fc.weight * inv)
        out.bias.copy_(fc.bias - (fc.weight * (bn.running_mean * inv)).sum(1))
        return out


def linprobe_model(
    checkpoint: str, num_classes: int, pool: str = "cls", img_size: int = 0
) -> tuple[SupMAE, str | None]:
    source, _ = load_source(checkpoint, img_size)
    if source.config.framework == "finetuned":
        raise ValueError(f"{checkpoint}: linear probing needs a pretrained (not fine-tuned) checkpoint")
    cfg = dataclasses.replace(
        source.config, framework="supervised", num_classes=num_classes, cls_hidden_dim=0, cls_pool=pool
    )
    model = create_model(cfg)
    model.encoder.load_state_dict(source.encoder.state_dict(), strict=True)
    model.cls_head = ProbeHead(cfg.embed_dim, num_classes)
    model.encoder.requires_grad_(False)
    return model, find_variant(cfg)


def export_model(model: SupMAE) -> SupMAE:
    """The model as the checkpoint contract wants it (the probe's BatchNorm folded away)."""
    if isinstance(getattr(model, "cls_head", None), ProbeHead):
        out = create_model(model.config)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("cls_head.")}
        out.load_state_dict(
            {**state, **{f"cls_head.{k}": v for k, v in model.cls_head.folded().state_dict().items()}}
        )
        return out
    return model
