"""SimMIM with SupMAE's supervised branch (the paper's SimMIM row: 82.8% -> 83.0%, docs/anchors.md).

Differs from `SupMAE` in the stages it overrides, following microsoft/SimMIM (`data_simmim.py`
MaskGenerator, `models/simmim.py` SimMIM / VisionTransformerForSimMIM):

- draw_mask:        square blocks of `mask_patch_size` pixels masked, not single patches;
- forward_encoder:  every patch enters the encoder, a learned mask token (in the encoder's width)
                    replacing each masked one: -> (N, 1+L, D);
- forward_decoder:  a linear head predicting each patch's pixels from its encoder token;
- target / loss:    the input's pixels (no per-patch normalisation), L1 on the masked patches;
- forward_pool:     "avg" averages the visible patch tokens only, since every patch is in the sequence.

The parameter names (`mask_token`, `decoder_pred`) and everything else are SupMAE's, so checkpoints and
cards are the same contract; build it with `create_model(config)` for a config with framework "simmim".
"""

from __future__ import annotations

import torch
from torch import nn

from .masking import block_masking
from .supmae import SupMAE


class SimMIM(SupMAE):
    frameworks = ("simmim",)

    def build_decoder(self) -> None:
        """A mask token in the encoder's width and a linear pixel head on every patch token."""
        c = self.config
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.decoder_pred = nn.Linear(c.embed_dim, c.patch_size**2 * c.in_chans)

    def draw_mask(
        self, batch: int, mask_ratio: float, device: torch.device, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SimMIM's block mask (MaskGenerator), drawn from `noise` (N, L) when given.
        -> ids_keep (N, K), mask (N, L) with 1 = removed."""
        c = self.config
        block = c.mask_patch_size // c.patch_size  # mask-block side in patches
        return block_masking(batch, c.grid, block, mask_ratio, device, noise=noise)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every patch, the masked ones (`mask` == 1) replaced by the mask token: -> (N, 1+L, D)."""
        x = self._embed(imgs)  # (N, L, D)
        w = mask.unsqueeze(-1).type_as(x)  # (N, L, 1)
        x = x * (1 - w) + (self.mask_token + self.encoder.pos_embed[:, 1:, :]) * w
        return self._run_blocks(x)  # (N, 1+L, D)

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(N, 1+L, D) -> (N, L, p*p*C): the linear head on each patch token, cls dropped."""
        return self.decoder_pred(latent[:, 1:, :])

    def reconstruction_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The input's pixels (SimMIM predicts them directly; `norm_pix_loss` does not apply)."""
        return self.patchify(imgs)  # (N, L, p*p*C)

    def patch_error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """SimMIM's per-patch L1: (N, L, p*p*C) x 2 -> (N, L)."""
        return (pred - target).abs().mean(-1)

    def prediction_pixels(self, pred: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return pred  # already in the input's pixel space

    def forward_pool(self, latent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1+L, D) -> (N, D). With a training `mask`, "avg" averages the visible patch tokens
        (mask == 0) only, so the classification branch sees no masked patch; without one, all of them."""
        if mask is None or self.config.cls_pool == "cls":
            return super().forward_pool(latent)
        keep = (1 - mask).unsqueeze(-1).type_as(latent)  # (N, L, 1)
        pooled = (latent[:, 1:] * keep).sum(1) / keep.sum(1).clamp_min(1)  # (N, D)
        return self.encoder.fc_norm(pooled)
