"""What the onnxruntime and TensorRT backends share: reading a `supmae-export` folder and running its
graphs (the encoder and the reconstruction graph) through a small `GraphRunner`.

An export folder holds `model.json` (the model card), `manifest.json`
(`{"artefacts": [{"file", "kind": "encoder" | "reconstruct" | ..., "precision": "fp32" | "fp16" | "int8-dynamic" | ...}]}`)
and the graphs. The encoder takes "images" float32 (N, 3, S, S) and gives "embedding" (N, D), "cls_token" (N, D),
"patch_tokens" (N, L, D) and, with a head, "logits" (N, C); the reconstruction graph takes "images" and
"ids_keep" int64 (N, K) and gives "masked", "reconstruction", "pasted" (N, 3, S, S) and "mask" (N, L).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from supmae_serve.model import ModelCard, load_model_card

from .base import (
    BackendError,
    BackendInfo,
    CapabilityError,
    ClassifyOutput,
    EmbedOutput,
    ReconstructOutput,
    class_labels,
    pool_features,
    pooling_source,
    probs_from_logits,
)

MANIFEST_NAME = "manifest.json"
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# manifest "format": standard ONNX ops, ONNX with onnxruntime contrib ops (fused attention, CPU), TensorRT engine
ONNX_FORMATS = ("onnx", "onnx-ort")
ENGINE_FORMAT = "tensorrt-plan"


@dataclass(frozen=True)
class Artefact:
    file: str
    kind: str  # "encoder" | "reconstruct" | ...
    precision: str  # "fp32" | "fp16" | "int8-dynamic" | ...
    format: str = ""  # "onnx" | "onnx-ort" | "tensorrt-plan" | ...; inferred from the file name when absent
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix.lower()

    @property
    def fmt(self) -> str:
        if self.format:
            return self.format
        if self.suffix in ENGINE_SUFFIXES:
            return ENGINE_FORMAT
        return "onnx" if self.suffix in ONNX_SUFFIXES else self.suffix.lstrip(".")


def read_manifest(folder: str | os.PathLike) -> list[Artefact]:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise BackendError(
            f"{folder}: not a supmae-export folder (no {MANIFEST_NAME}); run supmae-export first"
        )
    try:
        data = json.loads(path.read_text())
        items = data["artefacts"]
        return [
            Artefact(
                file=str(a["file"]),
                kind=str(a["kind"]),
                precision=str(a.get("precision", "fp32")),
                format=str(a.get("format", "")),
                extra={k: v for k, v in a.items() if k not in ("file", "kind", "precision", "format")},
            )
            for a in items
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BackendError(
            f"{path}: malformed manifest ({e}); expected {{'artefacts': [{{'file', 'kind', 'precision'}}]}}"
        ) from e


def precision_matches(artefact_precision: str, wanted: str) -> bool:
    """ "int8" matches "int8-dynamic" / "int8-static"; everything else matches exactly."""
    return artefact_precision == wanted or artefact_precision.split("-", 1)[0] == wanted


def select_artefact(
    artefacts: Sequence[Artefact],
    kind: str,
    formats: Sequence[str],
    precisions: Sequence[str],
    accept: Callable[[Artefact], bool] | None = None,
) -> Artefact | None:
    """The first artefact of `kind`, trying `precisions` in order, then `formats` in order."""
    candidates = [
        a for a in artefacts if a.kind == kind and a.fmt in formats and (accept is None or accept(a))
    ]
    for p in precisions:
        for f in formats:
            for a in candidates:
                if a.fmt == f and precision_matches(a.precision, p):
                    return a
    return None


def precision_preference(precision: str, on_gpu: bool) -> list[str]:
    """auto: fp16 first on a GPU, fp32 first on the CPU (never int8 unless asked: it changes results)."""
    if precision == "auto":
        return ["fp16", "fp32", "bf16"] if on_gpu else ["fp32", "fp16"]
    return [precision]


def load_export(folder: str | os.PathLike) -> tuple[ModelCard, list[Artefact]]:
    folder = Path(folder)
    artefacts = read_manifest(folder)
    return load_model_card(folder / "model.json"), artefacts


class GraphRunner(Protocol):
    """One compiled graph (an onnxruntime session, a TensorRT engine)."""

    output_names: list[str]
    max_batch: int | None  # largest batch one call takes (None: unbounded)
    fixed_batch: bool  # the graph takes exactly max_batch images (static shapes): pad smaller batches

    def run(self, outputs: Sequence[str], feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...


def run_chunked(
    runner: GraphRunner, outputs: Sequence[str], feeds: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Run feeds (all batch-first, same N) in chunks of at most `max_batch`, padding the last chunk of a
    fixed-batch graph with zeros, and concatenate the outputs."""
    n = next(iter(feeds.values())).shape[0]
    step = runner.max_batch or n
    parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for start in range(0, n, step):
        chunk = {k: v[start : start + step] for k, v in feeds.items()}
        m = next(iter(chunk.values())).shape[0]
        if runner.fixed_batch and m < step:
            chunk = {k: torch.cat([v, v.new_zeros((step - m, *v.shape[1:]))]) for k, v in chunk.items()}
        out = runner.run(outputs, chunk)
        for o in outputs:
            parts[o].append(out[o][:m])
    return {o: np.concatenate(v) if len(v) > 1 else v[0] for o, v in parts.items()}


class GraphBackend:
    """`Backend` over exported graphs; subclasses build the runners."""

    name = "graph"

    def __init__(
        self,
        card: ModelCard,
        encoder: GraphRunner,
        reconstructor: GraphRunner | None,
        *,
        device: str,
        precision: str,
        extra: dict[str, Any] | None = None,
    ):
        self.card = card
        self.encoder = encoder
        self.reconstructor = reconstructor
        self.device = device
        self.precision = precision
        self.extra = extra or {}
        self.labels = class_labels(card)
        self.capabilities = {
            "embed": True,
            "classify": card.capabilities["classify"] and "logits" in encoder.output_names,
            "reconstruct": card.capabilities["reconstruct"] and reconstructor is not None,
        }
        self._why_not = {
            "classify": "the model has no classification head"
            if not card.capabilities["classify"]
            else "the exported encoder has no 'logits' output",
            "reconstruct": "the model has no decoder"
            if not card.capabilities["reconstruct"]
            else "the export folder has no reconstruction graph (export it with the reconstruct artefact)",
        }

    def _require(self, capability: str) -> None:
        if not self.capabilities[capability]:
            raise CapabilityError(f"cannot {capability}: {self._why_not[capability]}")

    # ------------------------------------------------------------------ protocol
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            device=self.device,
            precision=self.precision,
            capabilities=dict(self.capabilities),
            extra=dict(self.extra),
        )

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        s = self.card.preprocessing.image_size
        for n in sorted(set(batch_sizes)):
            self.embed(torch.zeros(n, 3, s, s), "avg")
        if self.capabilities["reconstruct"]:
            preload = getattr(self.reconstructor, "preload", None)
            if callable(preload):  # a runner that loads in the background (the graph cache's torch one)
                preload()
            else:
                self.reconstruct(torch.zeros(1, 3, s, s), self.card.config.mask_ratio, [0])

    def embed(self, images: torch.Tensor, pooling: str = "avg") -> EmbedOutput:
        source = pooling_source(self.card, pooling)
        out = run_chunked(self.encoder, [source], {"images": images})
        arrays = dict.fromkeys(("embedding", "cls_token", "patch_tokens"))
        arrays[source] = out[source]
        return EmbedOutput(pool_features(self.card, pooling, **arrays))

    def classify(self, images: torch.Tensor) -> ClassifyOutput:
        self._require("classify")
        logits = run_chunked(self.encoder, ["logits"], {"images": images})["logits"]
        return ClassifyOutput(probs_from_logits(self.card, logits), self.labels)

    def reconstruct(self, images: torch.Tensor, mask_ratio: float, seeds: list[int]) -> ReconstructOutput:
        self._require("reconstruct")
        from supmae_serve.model.masking import seeded_keep_indices

        if len(seeds) != images.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for {images.shape[0]} images")
        ids_keep = seeded_keep_indices(self.card.config.num_patches, mask_ratio, list(seeds))  # (N, K)
        names = ["masked", "reconstruction", "pasted", "mask"]
        out = run_chunked(
            self.reconstructor, names, {"images": images, "ids_keep": ids_keep.to(images.device)}
        )
        return ReconstructOutput(**{k: np.asarray(out[k], dtype=np.float32) for k in names})
