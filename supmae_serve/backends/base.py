"""The Backend protocol every runtime implements (torch, onnxruntime, tensorrt), and its result types.

A backend takes a batch that `supmae_serve.preprocess` already produced: float32 (N, 3, S, S),
normalised with the model card's mean/std. Decoding, validation and batching happen before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from supmae_serve.model.checkpoint import ModelCard

POOLINGS = ("avg", "cls", "patch")


class CapabilityError(ValueError):
    """The model cannot do what was asked (e.g. reconstruct without a decoder)."""


class BackendError(RuntimeError):
    """A backend that cannot be created here (missing runtime, artefact or device); the message says what."""


@dataclass
class EmbedOutput:
    embedding: np.ndarray  # (N, D) for avg/cls pooling, (N, L, D) for pooling="patch"; float32


@dataclass
class ClassifyOutput:
    probs: np.ndarray  # (N, classes) float32, softmax of the head's logits
    labels: list[str]  # class names from the model card (or "class_<i>")


@dataclass
class ReconstructOutput:
    """Images in the model's normalised input space, (N, 3, S, S) float32."""

    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray
    mask: np.ndarray  # (N, L) 0 keep / 1 remove


@dataclass
class BackendInfo:
    name: str  # "torch" | "onnxruntime" | "tensorrt" | "fake"
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "fp32" | "bf16" | "fp16" | "int8"
    capabilities: dict[str, bool]
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    card: ModelCard

    def info(self) -> BackendInfo: ...

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None: ...

    def embed(self, images: torch.Tensor, pooling: str = "avg") -> EmbedOutput: ...

    def classify(self, images: torch.Tensor) -> ClassifyOutput: ...

    def reconstruct(self, images: torch.Tensor, mask_ratio: float, seeds: list[int]) -> ReconstructOutput: ...


def class_labels(card: ModelCard) -> list[str]:
    if card.class_names:
        return list(card.class_names)
    return [f"class_{i}" for i in range(card.config.num_classes)]


def require(card: ModelCard, capability: str) -> None:
    if not card.capabilities.get(capability, False):
        raise CapabilityError(
            f"this model ({card.framework}) cannot {capability}; its capabilities are "
            + ", ".join(k for k, v in card.capabilities.items() if v)
        )


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def pooling_source(card: ModelCard, pooling: str) -> str:
    """Which encoder output a pooling reads: "embedding", "cls_token" or "patch_tokens"."""
    check_pooling(pooling)
    if pooling == "patch":
        return "patch_tokens"
    if pooling == card.config.cls_pool:
        return "embedding"  # the model's own pooled output (keeps a fine-tuned model's fc_norm)
    return "patch_tokens" if pooling == "avg" else "cls_token"


def pool_features(
    card: ModelCard,
    pooling: str,
    embedding: np.ndarray | None,
    cls_token: np.ndarray | None,
    patch_tokens: np.ndarray | None,
) -> np.ndarray:
    """The one rule for embedding pooling, shared by every backend (the model's Features / the exported
    encoder's outputs in, float32 out; only the output `pooling_source` names needs to be given).

    avg:   mean of the patch tokens (the model's own `embedding` when it pools by average, so fine-tuned
           models keep their fc_norm); cls: the cls token (likewise); patch: every patch token (N, L, D).
    """
    source = pooling_source(card, pooling)
    arrays = {"embedding": embedding, "cls_token": cls_token, "patch_tokens": patch_tokens}
    x = arrays[source]
    if x is None:
        raise ValueError(f"pooling {pooling!r} needs the encoder output {source!r}")
    if source == "patch_tokens" and pooling == "avg":
        x = x.mean(axis=1)  # (N, L, D) -> (N, D)
    return np.ascontiguousarray(x, dtype=np.float32)


def probs_from_logits(card: ModelCard, logits: np.ndarray) -> np.ndarray:
    """softmax(logits / T) with the T the head was trained with (`ModelConfig.logit_temperature`: the
    official cls_temperature of 10 for masked frameworks, 1 otherwise), so that is the distribution the
    head learned."""
    z = logits.astype(np.float64) / card.config.logit_temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (label, probability) pairs, best first."""
    k = max(1, min(k, probs.shape[1]))
    idx = np.argsort(-probs, axis=1)[:, :k]
    return [[(labels[j], float(p[j])) for j in row] for p, row in zip(probs, idx, strict=True)]
