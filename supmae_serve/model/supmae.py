"""The SupMAE model: MAE + a classification branch fed only by the visible patches.

Reads top to bottom as the stages of the official code (enyac-group/supmae `models_supmae.py`,
facebookresearch/mae `models_mae.py`):

    forward_encoder -> forward_decoder -> forward_loss      (reconstruction branch)
                    -> forward_pool -> forward_head         (classification branch)

The encoder is a timm `VisionTransformer`, so `model.encoder.state_dict()` loads straight into
`timm.create_model(...)`. One `ModelConfig` (config.py) selects the framework:

- ``supmae``:     masking, MAE decoder, classification branch on the visible tokens (the paper).
- ``mae``:        masking and decoder, no classification branch.
- ``simmim``:     the `SimMIM` subclass (simmim.py) overrides the masking, encoder, decoder, loss and
                  pooling stages; `create_model` picks the class from the config.
- ``supervised``: no masking, no decoder: the naive supervised ViT baseline.
- ``finetuned``:  what fine-tuning produces (MAE's `models_vit.py`): global pool + fc_norm (no final
                  norm) + linear head, or with ``cls_pool="cls"`` the cls token after the final norm;
                  the position table is trained, as in timm's VisionTransformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .config import ModelConfig
from .masking import (
    gather_tokens,
    mask_from_keep,
    patchify,
    random_masking,
    scatter_tokens,
    seeded_keep_indices,
    sincos_pos_embed_2d,
    unpatchify,
)


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
    """MAE's encoder and decoder with SupMAE's classification branch. The framework (one of `frameworks`)
    leaves out the branch (mae) or the masking and the decoder (supervised, finetuned). Other frameworks
    are subclasses overriding the stages that differ (`SimMIM`, simmim.py); `create_model` picks the class."""

    frameworks: tuple[str, ...] = ("supmae", "mae", "supervised", "finetuned")

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.framework not in self.frameworks:
            raise ValueError(
                f"{type(self).__name__} builds {', '.join(self.frameworks)} models, not {config.framework!r}: "
                "build models with create_model(config), which picks the class from the config"
            )
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
        if c.has_decoder:
            self.build_decoder()
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

    def build_decoder(self) -> None:
        """MAE's decoder: its own width, a mask token, a fixed sin-cos table, blocks, a pixel head."""
        c = self.config
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
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_chans)

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
        """Encode only the kept patches (`mask` is implied by `ids_keep`): -> (N, 1+K, D)."""
        x = self._embed(imgs)  # (N, L, D)
        return self._run_blocks(gather_tokens(x, ids_keep))  # (N, 1+K, D)

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens -> per-patch pixel predictions (N, L, p*p*C)."""
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
        """The pixels the decoder learns to predict: each patch normalised by its own mean and std when
        `norm_pix_loss` (MAE), else the input's pixels. -> (N, L, p*p*C)"""
        target = self.patchify(imgs)  # (N, L, p*p*C)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def patch_error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MAE's per-patch mean squared error: (N, L, p*p*C) x 2 -> (N, L)."""
        return (pred - target).pow(2).mean(-1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch error (`patch_error`) on the removed patches only."""
        target = self.reconstruction_target(imgs)
        per_patch = self.patch_error(pred.float(), target.float())  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    # ------------------------------------------------------------------ classification branch
    def forward_pool(self, latent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1+K, D) -> (N, D). "avg" averages the patch tokens only (cls excluded): the encoder saw only
        the visible patches, so `mask` is not needed here."""
        pooled = latent[:, 0] if self.config.cls_pool == "cls" else latent[:, 1:].mean(dim=1)
        return self.encoder.fc_norm(pooled)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.cls_head(pooled)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE(logits / T, y); labels may be class indices (N,) or soft targets (N, classes)."""
        t = self.config.logit_temperature
        return F.cross_entropy(logits.float() / t, labels, label_smoothing=self.config.label_smoothing)

    # ------------------------------------------------------------------ training forward
    def draw_mask(
        self, batch: int, mask_ratio: float, device: torch.device, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training mask: MAE's per-patch random masking, drawn from `noise` (N, L) when given.
        -> ids_keep (N, K), mask (N, L) with 1 = removed."""
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
        if not c.has_decoder:  # supervised, finetuned: every patch, no reconstruction
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
        target = self.patchify(imgs).float()  # (N, L, p*p*C)
        pred = self.prediction_pixels(self.forward_decoder(latent, ids_keep).float(), target)
        w = mask.unsqueeze(-1)  # (N, L, 1)
        return Reconstruction(
            masked=self.unpatchify(target * (1 - w)),
            reconstruction=self.unpatchify(pred),
            pasted=self.unpatchify(target * (1 - w) + pred * w),
            mask=mask,
        )

    def prediction_pixels(self, pred: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The decoder's prediction (N, L, p*p*C) in the input's pixel space. With `norm_pix_loss` it
        predicts each patch's normalised pixels: to show them each patch's own mean and std are restored
        from the input `pixels`, as the MAE paper's figures do."""
        if not self.config.norm_pix_loss:
            return pred
        mean = pixels.mean(dim=-1, keepdim=True)
        std = (pixels.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        return pred * std + mean

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
