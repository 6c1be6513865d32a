"""The SupMAE model: MAE + a classification branch fed only by the visible patches.

Reads top to bottom as the stages of the official code (enyac-group/supmae `models_supmae.py`,
facebookresearch/mae `models_mae.py`):

    forward_encoder -> forward_decoder -> forward_loss      (reconstruction branch)
                    -> forward_pool -> forward_head         (classification branch)

The encoder is a timm `VisionTransformer`, so `model.encoder.state_dict()` loads straight into
`timm.create_model(...)`. One `ModelConfig` selects the framework:

- ``supmae``:     masking, MAE decoder, classification branch on the visible tokens (the paper).
- ``mae``:        masking and decoder, no classification branch.
- ``simmim``:     SimMIM with the same supervised branch: SimMIM's block masks (32-px mask patches),
                  mask tokens replace the masked patches inside the encoder, a linear head predicts raw
                  pixels, L1 loss on masked patches.
- ``supervised``: no masking, no decoder: the naive supervised ViT baseline.
- ``finetuned``:  what fine-tuning produces (MAE's `models_vit.py`): global pool + fc_norm (no final
                  norm) + linear head, or with ``cls_pool="cls"`` the cls token after the final norm;
                  the position table is trained, as in timm's VisionTransformer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .masking import (
    block_mask_count,
    block_masking,
    gather_tokens,
    mask_from_keep,
    num_visible,
    patchify,
    random_masking,
    scatter_tokens,
    seeded_keep_indices,
    sincos_pos_embed_2d,
    unpatchify,
)

FRAMEWORKS = ("supmae", "mae", "simmim", "supervised", "finetuned")
MASKED_FRAMEWORKS = ("supmae", "mae", "simmim")


@dataclass
class ModelConfig:
    """Everything that defines the network's shape and losses. Saved verbatim in the model card."""

    framework: str = "supmae"
    # encoder: a timm VisionTransformer
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    # MAE decoder; the SupMAE ViT-B recipe uses 512-d with ONE block (PRETRAIN.md, `dec512d1b`)
    decoder_embed_dim: int = 512
    decoder_depth: int = 1
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    mask_patch_size: int = 32  # simmim: side of SimMIM's square mask blocks in pixels (MaskGenerator)
    norm_pix_loss: bool = True
    # classification branch: Linear(D->hidden) -> BN -> ReLU -> Linear(hidden->classes); hidden 0 = linear
    num_classes: int = 1000
    cls_hidden_dim: int = 3072
    cls_pool: str = "avg"  # "avg": mean of the (visible) patch tokens; "cls": the cls token
    cls_loss_ratio: float = 0.01  # official default
    cls_temperature: float = 10.0  # official default: CE(logits / 10, y)
    label_smoothing: float = 0.0
    norm_eps: float = 1e-6  # every LayerNorm's eps (official: 1e-6; Hugging Face ViTMAE configs: 1e-12)

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}; expected one of {FRAMEWORKS}")
        if self.cls_pool not in ("avg", "cls"):
            raise ValueError(f"cls_pool must be 'avg' or 'cls', got {self.cls_pool!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        num_visible(self.num_patches, self.mask_ratio)  # validates the ratio
        if self.framework == "simmim":
            if self.mask_patch_size % self.patch_size or self.img_size % self.mask_patch_size:
                raise ValueError(
                    f"mask_patch_size {self.mask_patch_size} must be a multiple of patch_size {self.patch_size} "
                    f"and divide img_size {self.img_size}"
                )
            count, blocks = block_mask_count(
                self.grid, self.mask_patch_size // self.patch_size, self.mask_ratio
            )
            if count >= blocks:
                raise ValueError(
                    f"SimMIM block masking with {self.mask_patch_size}-px mask patches on {self.img_size}-px "
                    f"images masks all {blocks} blocks at mask_ratio {self.mask_ratio}; lower mask_patch_size"
                )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def has_decoder(self) -> bool:
        return self.framework in MASKED_FRAMEWORKS

    @property
    def has_head(self) -> bool:
        return self.framework != "mae" and self.num_classes > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)


class SupMAEOutput(NamedTuple):
    loss: torch.Tensor
    loss_rec: torch.Tensor | None  # reconstruction term (None for supervised/finetuned)
    loss_cls: torch.Tensor | None  # unweighted CE term (None without labels or head)
    logits: torch.Tensor | None  # (N, classes), from the visible tokens
    pred: torch.Tensor | None  # (N, L, p*p*3)
    mask: torch.Tensor | None  # (N, L), 0 keep / 1 remove


class Features(NamedTuple):
    embedding: torch.Tensor  # (N, D) pooled as cls_pool says (after fc_norm for finetuned models)
    patch_tokens: torch.Tensor  # (N, L, D) after the final norm
    cls_token: torch.Tensor  # (N, D) after the final norm
    logits: torch.Tensor | None  # (N, classes) or None without a head


class Reconstruction(NamedTuple):
    """All images (N, C, H, W) in the model's normalised input space."""

    masked: torch.Tensor  # input with removed patches zeroed
    reconstruction: torch.Tensor  # the prediction for every patch, in pixel space
    pasted: torch.Tensor  # the prediction with the visible patches pasted back
    mask: torch.Tensor  # (N, L) 0 keep / 1 remove


def _norm_layer(eps: float):
    return partial(nn.LayerNorm, eps=eps)


class SupMAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.encoder = VisionTransformer(
            img_size=c.img_size,
            patch_size=c.patch_size,
            in_chans=c.in_chans,
            num_classes=0,
            global_pool="avg",
            embed_dim=c.embed_dim,
            depth=c.depth,
            num_heads=c.num_heads,
            mlp_ratio=c.mlp_ratio,
            qkv_bias=True,
            class_token=True,
            # fine-tuned models follow MAE's fine-tuning: with global pooling no final norm but a
            # LayerNorm after pooling; with the cls token the final norm (models_vit.py)
            fc_norm=c.framework == "finetuned" and c.cls_pool == "avg",
            drop_path_rate=c.drop_path_rate,
            norm_layer=_norm_layer(c.norm_eps),
        )
        # pretraining keeps MAE's fixed 2-D sin-cos table; fine-tuning trains it (timm's ViT in main_finetune.py)
        self.encoder.pos_embed.requires_grad_(c.framework == "finetuned")
        patch_dim = c.patch_size**2 * c.in_chans

        if c.framework in ("supmae", "mae"):
            self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(
                torch.zeros(1, c.num_patches + 1, c.decoder_embed_dim), requires_grad=False
            )
            self.decoder_blocks = nn.ModuleList(
                Block(
                    c.decoder_embed_dim,
                    c.decoder_num_heads,
                    c.mlp_ratio,
                    qkv_bias=True,
                    norm_layer=_norm_layer(c.norm_eps),
                )
                for _ in range(c.decoder_depth)
            )
            self.decoder_norm = _norm_layer(c.norm_eps)(c.decoder_embed_dim)
            self.decoder_pred = nn.Linear(c.decoder_embed_dim, patch_dim)
        elif c.framework == "simmim":
            # SimMIM: a mask token in the encoder's width, a linear pixel head on every patch token
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.decoder_pred = nn.Linear(c.embed_dim, patch_dim)

        if c.has_head:
            if c.framework == "finetuned" or c.cls_hidden_dim == 0:
                self.cls_head = nn.Linear(c.embed_dim, c.num_classes)
            else:
                self.cls_head = nn.Sequential(
                    nn.Linear(c.embed_dim, c.cls_hidden_dim),
                    nn.BatchNorm1d(c.cls_hidden_dim),
                    nn.ReLU(inplace=True),
                    nn.Linear(c.cls_hidden_dim, c.num_classes),
                )
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """MAE's initialisation: sin-cos tables, xavier-uniform linears and patch projection."""
        c = self.config
        grid = c.grid
        pos = torch.from_numpy(sincos_pos_embed_2d(c.embed_dim, grid, cls_token=True))
        self.encoder.pos_embed.data.copy_(pos.unsqueeze(0))
        if hasattr(self, "decoder_pos_embed"):
            dpos = torch.from_numpy(sincos_pos_embed_2d(c.decoder_embed_dim, grid, cls_token=True))
            self.decoder_pos_embed.data.copy_(dpos.unsqueeze(0))
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, not Conv2d
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.config.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.config.patch_size, channels=self.config.in_chans)

    def _embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, D) patch embeddings with their position added (no cls yet)."""
        x = self.encoder.patch_embed(imgs)
        return x + self.encoder.pos_embed[:, 1:, :]

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the cls token, run the blocks and the final norm: (N, K, D) -> (N, 1+K, D)."""
        cls = (self.encoder.cls_token + self.encoder.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.encoder.norm_pre(x)
        x = self.encoder.blocks(x)
        return self.encoder.norm(x)

    # ------------------------------------------------------------------ reconstruction branch
    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode only the kept patches (MAE) or every patch with mask tokens (SimMIM): -> (N, 1+K, D)."""
        x = self._embed(imgs)  # (N, L, D)
        if self.config.framework == "simmim":
            w = mask.unsqueeze(-1).type_as(x)  # (N, L, 1)
            x = x * (1 - w) + (self.mask_token + self.encoder.pos_embed[:, 1:, :]) * w
            return self._run_blocks(x)  # (N, 1+L, D)
        return self._run_blocks(gather_tokens(x, ids_keep))  # (N, 1+K, D)

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens -> per-patch pixel predictions (N, L, p*p*C)."""
        if self.config.framework == "simmim":
            return self.decoder_pred(latent[:, 1:, :])
        x = self.decoder_embed(latent)  # (N, 1+K, Dd)
        n, _, dd = x.shape
        canvas = self.mask_token.to(x.dtype).expand(n, self.num_patches, dd)  # (N, L, Dd)
        x_ = scatter_tokens(canvas, ids_keep, x[:, 1:, :])  # unshuffle: visible tokens back in place
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # (N, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]  # (N, L, p*p*C), cls dropped

    def reconstruction_target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)  # (N, L, p*p*C)
        if self.config.norm_pix_loss and self.config.framework != "simmim":
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch error on the removed patches only: MSE (MAE) or L1 on raw pixels (SimMIM)."""
        target = self.reconstruction_target(imgs)
        err = pred.float() - target.float()
        per_patch = err.abs().mean(-1) if self.config.framework == "simmim" else err.pow(2).mean(-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    # ------------------------------------------------------------------ classification branch
    def forward_pool(self, latent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1+K, D) -> (N, D). "avg" averages the patch tokens only (cls excluded); under SimMIM,
        where every patch is in the sequence, only the visible ones (mask == 0) are averaged."""
        if self.config.cls_pool == "cls":
            pooled = latent[:, 0]
        elif mask is not None and self.config.framework == "simmim":
            keep = (1 - mask).unsqueeze(-1).type_as(latent)  # (N, L, 1)
            pooled = (latent[:, 1:] * keep).sum(1) / keep.sum(1).clamp_min(1)
        else:
            pooled = latent[:, 1:].mean(dim=1)
        return self.encoder.fc_norm(pooled)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.cls_head(pooled)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE(logits / T, y); labels may be class indices (N,) or soft targets (N, classes)."""
        t = self.config.cls_temperature if self.config.framework in MASKED_FRAMEWORKS else 1.0
        return F.cross_entropy(logits.float() / t, labels, label_smoothing=self.config.label_smoothing)

    # ------------------------------------------------------------------ training forward
    def draw_mask(
        self, batch: int, mask_ratio: float, device: torch.device, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training mask: per-patch random (MAE, SupMAE) or SimMIM's block mask, drawn from `noise`
        (N, L) when given. -> ids_keep (N, K), mask (N, L) with 1 = removed."""
        c = self.config
        if c.framework == "simmim":
            block = c.mask_patch_size // c.patch_size
            return block_masking(batch, c.grid, block, mask_ratio, device, noise=noise)
        ids_keep, mask, _ = random_masking(batch, self.num_patches, mask_ratio, device, noise=noise)
        return ids_keep, mask

    def forward(
        self,
        imgs: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> SupMAEOutput:
        """One training step's forward. `noise` (N, L) fixes the masking (else torch.rand)."""
        c = self.config
        if c.framework not in MASKED_FRAMEWORKS:
            latent = self._run_blocks(self._embed(imgs))
            logits = self.forward_head(self.forward_pool(latent))
            if labels is None:
                raise ValueError(f"framework {c.framework!r} trains only with labels")
            loss_cls = self.classification_loss(logits, labels)
            return SupMAEOutput(loss_cls, None, loss_cls, logits, None, None)

        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, mask = self.draw_mask(imgs.shape[0], ratio, imgs.device, noise)
        latent = self.forward_encoder(imgs, ids_keep, mask)
        pred = self.forward_decoder(latent, ids_keep)
        loss_rec = self.forward_loss(imgs, pred, mask)
        logits = loss_cls = None
        loss = loss_rec
        if c.has_head:
            logits = self.forward_head(self.forward_pool(latent, mask))
            if labels is not None:
                loss_cls = self.classification_loss(logits, labels)
                loss = loss_rec + c.cls_loss_ratio * loss_cls
        return SupMAEOutput(loss, loss_rec, loss_cls, logits, pred, mask)

    # ------------------------------------------------------------------ inference (no randomness)
    def forward_features(self, imgs: torch.Tensor) -> Features:
        """Every patch, no masking: the serving and export path."""
        tokens = self._run_blocks(self._embed(imgs))  # (N, 1+L, D)
        pooled = self.forward_pool(tokens)
        logits = self.forward_head(pooled) if self.config.has_head else None
        return Features(pooled, tokens[:, 1:], tokens[:, 0], logits)

    def reconstruct_with_keep(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> Reconstruction:
        """Reconstruct from given kept patch indices (N, K); the exported reconstruction graph."""
        if not self.config.has_decoder:
            raise ValueError(f"a {self.config.framework!r} model has no decoder to reconstruct with")
        mask = mask_from_keep(ids_keep, self.num_patches)  # (N, L)
        latent = self.forward_encoder(imgs, ids_keep, mask)
        pred = self.forward_decoder(latent, ids_keep).float()  # (N, L, p*p*C)
        target = self.patchify(imgs).float()
        if self.config.norm_pix_loss and self.config.framework != "simmim":
            # The decoder predicts each patch's normalised pixels. To show them we restore each
            # patch's own mean and std from the input, as the MAE paper's figures do.
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        w = mask.unsqueeze(-1)  # (N, L, 1)
        return Reconstruction(
            masked=self.unpatchify(target * (1 - w)),
            reconstruction=self.unpatchify(pred),
            pasted=self.unpatchify(target * (1 - w) + pred * w),
            mask=mask,
        )

    @torch.no_grad()
    def reconstruct(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, seed: int | Sequence[int] = 0
    ) -> Reconstruction:
        """Deterministic masked reconstruction. Each image's mask depends only on its seed (an int
        applies to all), never on its position in a batch."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        n = imgs.shape[0]
        seeds = [int(seed)] * n if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images")
        ids_keep = seeded_keep_indices(self.num_patches, ratio, seeds).to(imgs.device)
        return self.reconstruct_with_keep(imgs, ids_keep)

    # ------------------------------------------------------------------ optimiser helpers
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D ones (norms, biases)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("cls_token", "pos_embed", "mask_token"))}


@dataclass
class ParamCount:
    encoder: int = 0
    decoder: int = 0
    head: int = 0

    @property
    def total(self) -> int:
        return self.encoder + self.decoder + self.head


def count_parameters(model: SupMAE) -> ParamCount:
    pc = ParamCount()
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            pc.encoder += p.numel()
        elif name.startswith("cls_head."):
            pc.head += p.numel()
        else:
            pc.decoder += p.numel()
    return pc
