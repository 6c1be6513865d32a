"""A cheap, deterministic fake backend for tests and for load-testing the HTTP layer alone.

Outputs are fixed random projections of the input (so different images give different, repeatable results),
with the real shapes of the model card; an optional delay imitates inference time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from supmae_serve.model import ModelCard, load_model_card, model_config
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.model.masking import patchify, seeded_keep_indices, unpatchify

from .base import (
    BackendInfo,
    ClassifyOutput,
    EmbedOutput,
    ReconstructOutput,
    class_labels,
    pool_features,
    probs_from_logits,
    require,
)


def fake_card(
    variant: str = "micro_patch4_32", class_names: list[str] | None = None, **overrides
) -> ModelCard:
    """A model card without weights (for the fake backend)."""
    cfg = model_config(variant, **{"num_classes": len(class_names) if class_names else 10, **overrides})
    return ModelCard(
        config=cfg,
        variant=variant,
        class_names=class_names,
        preprocessing=Preprocessing.for_size(cfg.img_size),
    )


class FakeBackend:
    name = "fake"

    def __init__(self, card: ModelCard, delay_s: float = 0.0, per_image_s: float = 0.0, seed: int = 0):
        self.card = card
        self.delay_s = delay_s
        self.per_image_s = per_image_s
        self.labels = class_labels(card)
        c = card.config
        rng = np.random.default_rng(seed)
        patch_dim = c.patch_size**2 * 3
        self._w_patch = rng.standard_normal((patch_dim, c.embed_dim)).astype(np.float32) / np.sqrt(patch_dim)
        self._w_cls = rng.standard_normal((c.embed_dim, max(c.num_classes, 1))).astype(np.float32)
        self.batch_sizes: list[int] = []  # every call's batch size, for tests
        self._lock = threading.Lock()
        self.warmed = False

    @classmethod
    def from_path(cls, path: str | Path, **kw) -> FakeBackend:
        """Read only the model card (model.json) of a checkpoint or export folder."""
        return cls(load_model_card(Path(path) / "model.json" if Path(path).is_dir() else path), **kw)

    def _work(self, n: int) -> None:
        with self._lock:
            self.batch_sizes.append(n)
        if self.delay_s or self.per_image_s:
            time.sleep(self.delay_s + self.per_image_s * n)

    def _tokens(self, images: torch.Tensor) -> np.ndarray:
        x = patchify(images.float().cpu(), self.card.config.patch_size).numpy()  # (N, L, p*p*3)
        return np.tanh(x @ self._w_patch)  # (N, L, D)

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, "cpu", "fp32", dict(self.card.capabilities), {"delay_s": self.delay_s})

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        self.warmed = True

    def embed(self, images: torch.Tensor, pooling: str = "avg") -> EmbedOutput:
        self._work(images.shape[0])
        tokens = self._tokens(images)
        cls = tokens.max(axis=1)
        own = tokens.mean(axis=1) if self.card.config.cls_pool == "avg" else cls
        return EmbedOutput(pool_features(self.card, pooling, own, cls, tokens))

    def classify(self, images: torch.Tensor) -> ClassifyOutput:
        require(self.card, "classify")
        self._work(images.shape[0])
        logits = self._tokens(images).mean(axis=1) @ self._w_cls * 10
        return ClassifyOutput(probs_from_logits(self.card, logits), self.labels)

    def reconstruct(self, images: torch.Tensor, mask_ratio: float, seeds: list[int]) -> ReconstructOutput:
        require(self.card, "reconstruct")
        self._work(images.shape[0])
        c = self.card.config
        x = images.float().cpu()
        ids_keep = seeded_keep_indices(c.num_patches, mask_ratio, list(seeds))
        mask = torch.ones(x.shape[0], c.num_patches).scatter(1, ids_keep, 0.0)  # (N, L)
        patches = patchify(x, c.patch_size)  # (N, L, p*p*3)
        w = mask.unsqueeze(-1)
        pred = patches.mean(dim=-1, keepdim=True).expand_as(patches)  # each patch's mean colour
        return ReconstructOutput(
            masked=unpatchify(patches * (1 - w), c.patch_size).numpy(),
            reconstruction=unpatchify(pred, c.patch_size).numpy(),
            pasted=unpatchify(patches * (1 - w) + pred * w, c.patch_size).numpy(),
            mask=mask.numpy(),
        )
