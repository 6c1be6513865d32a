"""How the standalone demo gets a Backend from a checkpoint path.

`load_backend` is the one way in. It uses the serving backends' registry when that exists and
otherwise a minimal fp32 torch adapter over `SupMAE`, enough for the demo on a CPU.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from supmae_serve.backends.base import (
    POOLINGS,
    BackendInfo,
    ClassifyOutput,
    EmbedOutput,
    ReconstructOutput,
    class_labels,
    require,
)
from supmae_serve.model.checkpoint import ModelCard, load_checkpoint
from supmae_serve.model.supmae import SupMAE


class LocalTorchBackend:
    """fp32 eager torch over a loaded SupMAE: the Backend protocol and nothing more."""

    def __init__(self, model: SupMAE, card: ModelCard, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.card = card
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu") -> LocalTorchBackend:
        model, card = load_checkpoint(path, device=device)
        return cls(model, card, device)

    def info(self) -> BackendInfo:
        return BackendInfo("torch", str(self.device), "fp32", dict(self.card.capabilities))

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        size = self.card.preprocessing.image_size
        for n in batch_sizes:
            self.embed(torch.zeros(n, 3, size, size))

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, pooling: str = "avg") -> EmbedOutput:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        feats = self.model.forward_features(images.to(self.device))
        if pooling == "avg":
            out = feats.patch_tokens.mean(dim=1)  # (N, D)
        elif pooling == "cls":
            out = feats.cls_token  # (N, D)
        else:
            out = feats.patch_tokens  # (N, L, D)
        return EmbedOutput(out.float().cpu().numpy())

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> ClassifyOutput:
        require(self.card, "classify")
        logits = self.model.forward_features(images.to(self.device)).logits  # (N, classes)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return ClassifyOutput(probs.astype(np.float32), class_labels(self.card))

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor, mask_ratio: float, seeds: list[int]) -> ReconstructOutput:
        require(self.card, "reconstruct")
        rec = self.model.reconstruct(images.to(self.device), mask_ratio=mask_ratio, seed=seeds)
        return ReconstructOutput(*(t.float().cpu().numpy() for t in rec))


def load_backend(checkpoint: str | os.PathLike, device: str = "cpu"):
    """A warmed-up Backend for `checkpoint` (raises CheckpointError with the reason if unreadable)."""
    backend = LocalTorchBackend.from_checkpoint(checkpoint, device=device)
    backend.warmup()
    return backend
