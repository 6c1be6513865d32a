"""The model each stage trains.

- pretrain: a fresh SupMAE (or MAE / SimMIM / supervised) model of a named variant.
- finetune: the encoder of a pretrained checkpoint under the `finetuned` framework (global pool +
  fc_norm + linear head), as MAE's `main_finetune.py` does: the decoder and the pretraining head are
  dropped; the final `norm` is dropped and `fc_norm` starts fresh (weight 1, bias 0), exactly as MAE
  does with global pooling; the head starts with trunc-normal std 2e-5.
- linprobe: the same frozen encoder with its final norm, average pooling, and a linear head behind a
  BatchNorm without affine parameters (MAE's `main_linprobe.py`); the BatchNorm is folded into the
  linear layer when the checkpoint is written, so the saved model is a plain `supervised` model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from supmae_serve.model import SupMAE, create_model, load_checkpoint


def pretrain_model(variant: str, num_classes: int, **overrides) -> SupMAE:
    return create_model(variant, num_classes=num_classes, **overrides)


def _encoder_state(model: SupMAE) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.encoder.state_dict().items()}


def finetune_model(
    checkpoint: str, num_classes: int, drop_path: float = 0.1, label_smoothing: float = 0.0
) -> tuple[SupMAE, str | None]:
    """-> (the fine-tuning model, the source's variant)."""
    source, card = load_checkpoint(checkpoint)
    cfg = dataclasses.replace(
        source.config,
        framework="finetuned",
        num_classes=num_classes,
        drop_path_rate=drop_path,
        label_smoothing=label_smoothing,
    )
    model = SupMAE(cfg)
    state = {k: v for k, v in _encoder_state(source).items() if not k.startswith("norm.")}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    assert set(missing) <= {"fc_norm.weight", "fc_norm.bias"} and not unexpected, (missing, unexpected)
    nn.init.trunc_normal_(model.cls_head.weight, std=2e-5)  # MAE main_finetune.py
    nn.init.zeros_(model.cls_head.bias)
    return model, card.variant


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


def linprobe_model(checkpoint: str, num_classes: int) -> tuple[SupMAE, str | None]:
    source, card = load_checkpoint(checkpoint)
    if source.config.framework == "finetuned":
        raise ValueError(f"{checkpoint}: linear probing needs a pretrained (not fine-tuned) checkpoint")
    cfg = dataclasses.replace(
        source.config, framework="supervised", num_classes=num_classes, cls_hidden_dim=0
    )
    model = SupMAE(cfg)
    model.encoder.load_state_dict(_encoder_state(source), strict=True)
    model.cls_head = ProbeHead(cfg.embed_dim, num_classes)
    model.encoder.requires_grad_(False)
    return model, card.variant


def export_model(model: SupMAE) -> SupMAE:
    """The model as the checkpoint contract wants it (the probe's BatchNorm folded away)."""
    if isinstance(getattr(model, "cls_head", None), ProbeHead):
        out = SupMAE(model.config)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("cls_head.")}
        out.load_state_dict(
            {**state, **{f"cls_head.{k}": v for k, v in model.cls_head.folded().state_dict().items()}}
        )
        return out
    return model
