"""The PyTorch backend: a checkpoint run eagerly (optionally torch.compile'd).

fp32 on the CPU (bf16 on request), fp16 or bf16 on a GPU. Inputs are the normalised float32 batches
`supmae_serve.preprocess` produces; outputs are float32 numpy arrays.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from supmae_serve.common.system import resolve_device
from supmae_serve.model import load_checkpoint

from .base import (
    BackendError,
    BackendInfo,
    ClassifyOutput,
    EmbedOutput,
    ReconstructOutput,
    class_labels,
    pool_features,
    pooling_source,
    probs_from_logits,
    require,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> fp32 on the CPU, fp16 on a GPU; fp16 on the CPU and int8 are refused with the alternatives."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise BackendError(
            f"the torch backend runs fp32, fp16 or bf16, not {precision!r} (int8 needs an int8 ONNX export "
            "and --backend onnxruntime)"
        )
    if precision == "fp16" and device.type == "cpu":
        raise BackendError("fp16 is not supported on the CPU by the torch backend; use fp32 or bf16")
    return precision


class TorchBackend:
    """`Backend` over a `SupMAE` checkpoint."""

    name = "torch"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = False,
    ):
        self.device = resolve_device(device, BackendError)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = DTYPES[self.precision]
        self.path = Path(path)
        t0 = time.perf_counter()
        self.model, self.card = load_checkpoint(path, device=self.device, dtype=self.dtype)
        self.load_s = time.perf_counter() - t0
        self.compiled = compile
        self._features = self.model.forward_features
        self._reconstruct = self.model.reconstruct_with_keep
        if compile:
            # dynamic=True: one graph for every batch size the batcher produces
            self._features = torch.compile(self.model.forward_features, dynamic=True)
        self.labels = class_labels(self.card)

    # ------------------------------------------------------------------ protocol
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            device=str(self.device),
            precision=self.precision,
            capabilities=dict(self.card.capabilities),
            extra={"compiled": self.compiled, "checkpoint": str(self.path), "load_s": round(self.load_s, 3)},
        )

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        s = self.card.preprocessing.image_size
        for n in sorted(set(batch_sizes)):
            x = torch.zeros(n, 3, s, s)
            self.embed(x, "avg")
        if self.card.capabilities["reconstruct"]:
            self.reconstruct(torch.zeros(1, 3, s, s), self.card.config.mask_ratio, [0])

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, S, S), got {tuple(images.shape)}")
        return images.to(self.device, self.dtype, non_blocking=True)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, pooling: str = "avg") -> EmbedOutput:
        f = self._features(self._input(images))
        source = pooling_source(self.card, pooling)  # copy only the output this pooling reads
        outputs = dict.fromkeys(("embedding", "cls_token", "patch_tokens"))
        outputs[source] = getattr(f, source).float().cpu().numpy()
        return EmbedOutput(pool_features(self.card, pooling, **outputs))

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> ClassifyOutput:
        require(self.card, "classify")
        f = self._features(self._input(images))
        return ClassifyOutput(probs_from_logits(self.card, f.logits.float().cpu().numpy()), self.labels)

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor, mask_ratio: float, seeds: list[int]) -> ReconstructOutput:
        require(self.card, "reconstruct")
        from supmae_serve.model.masking import seeded_keep_indices

        x = self._input(images)
        if len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {x.shape[0]} images")
        ids_keep = seeded_keep_indices(self.card.config.num_patches, mask_ratio, list(seeds)).to(self.device)
        r = self._reconstruct(x, ids_keep)
        return ReconstructOutput(
            masked=r.masked.float().cpu().numpy(),
            reconstruction=r.reconstruction.float().cpu().numpy(),
            pasted=r.pasted.float().cpu().numpy(),
            mask=r.mask.float().cpu().numpy(),
        )
