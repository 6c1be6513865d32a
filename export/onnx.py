"""ONNX graphs of a SupMAE model: the encoder (serving) and the reconstruction demo (mask as input).

Both are exported with PyTorch's current exporter, `torch.onnx.export(dynamo=True)` (torch.export +
onnxscript), at opset 18 so LayerNorm is one `LayerNormalization` op. The graphs hold no random ops:
the encoder sees every patch, and the reconstruction graph takes the kept patch indices as an input
(`supmae_serve.model.masking.seeded_keep_indices` is the one definition of the mask for a seed).

    encoder.onnx      images (N,3,S,S) f32 -> embedding (N,D), cls_token (N,D), patch_tokens (N,L,D)
                                              [, logits (N,C) when the model classifies]
    reconstruct.onnx  images (N,3,S,S) f32, ids_keep (N,K) i64 -> masked, reconstruction, pasted
                                              (N,3,S,S) f32, mask (N,L) f32 (0 keep, 1 remove)
N (and K) are dynamic; S is fixed from the model card.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from supmae_serve.common.optional import install_hint
from supmae_serve.model import ModelCard, SupMAE

DEFAULT_OPSET = 18
MIN_OPSET = 18  # LayerNormalization is a single op from opset 17; 18 is what the tools we target test
ENCODER_INPUT = "images"
ENCODER_OUTPUTS = ("embedding", "cls_token", "patch_tokens", "logits")
RECONSTRUCT_INPUTS = ("images", "ids_keep")
RECONSTRUCT_OUTPUTS = ("masked", "reconstruction", "pasted", "mask")
# ops whose output is random or training-only; none may appear in an exported inference graph
RANDOM_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
MAX_PROTO_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit, with headroom: larger models use external data


class ExportError(RuntimeError):
    """An export or artefact problem; the message says which file and what is wrong."""


# ---------------------------------------------------------------------------- graph modules
class EncoderGraph(nn.Module):
    """`SupMAE.forward_features` with named tuple outputs flattened for export."""

    def __init__(self, model: SupMAE):
        super().__init__()
        self.model = model
        self.has_head = model.config.has_head

    def forward(self, images: torch.Tensor):
        f = self.model.forward_features(images)
        out = (f.embedding, f.cls_token, f.patch_tokens)  # (N, D), (N, D), (N, L, D)
        return (*out, f.logits) if self.has_head else out  # logits (N, C)


class ReconstructGraph(nn.Module):
    """`SupMAE.reconstruct_with_keep`: the masked-reconstruction demo with the mask as an input."""

    def __init__(self, model: SupMAE):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor):
        r = self.model.reconstruct_with_keep(images, ids_keep)
        return r.masked, r.reconstruction, r.pasted, r.mask


def encoder_output_names(card: ModelCard) -> tuple[str, ...]:
    return ENCODER_OUTPUTS if card.capabilities["classify"] else ENCODER_OUTPUTS[:3]


# ---------------------------------------------------------------------------- export
@dataclass
class ExportInfo:
    exporter: str  # "torch.onnx.export(dynamo=True)" or the fallback with its reason
    opset: int
    external_data: bool


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic: dict[str, dict[int, str]],
    opset: int,
    metadata: dict[str, str],
) -> ExportInfo:
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is too old; use {MIN_OPSET} or newer (LayerNormalization as one op)"
        )
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    external = _param_bytes(module) > MAX_PROTO_BYTES
    dims = {
        name: {axis: torch.export.Dim(label, min=1) for axis, label in axes.items()}
        for name, axes in dynamic.items()
    }
    exporter = "torch.onnx.export(dynamo=True)"
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes={name: dims.get(name) for name in input_names},
                optimize=True,
                verify=False,
                report=False,
            )
        program.save(str(path), external_data=external)
    except Exception as e:  # noqa: BLE001 - any exporter failure gets one fallback, with its reason
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        warnings.warn(
            f"dynamo ONNX export failed ({reason}); falling back to the TorchScript exporter", stacklevel=2
        )
        exporter = f"torch.onnx.export(dynamo=False) (fallback: dynamo export failed with {reason})"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes={n: {a: label for a, label in ax.items()} for n, ax in dynamic.items()}
                    | {n: {0: "batch"} for n in output_names},
                )
        except Exception as e2:  # noqa: BLE001
            raise ExportError(
                f"ONNX export failed with both exporters: dynamo: {reason}; torchscript: {e2}"
            ) from e2
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    check_no_random_ops(model, str(path))
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    save_onnx(model, path, external_data=external, reload_external=external)
    return ExportInfo(exporter=exporter, opset=opset, external_data=external)


def _metadata(card: ModelCard, graph: str) -> dict[str, str]:
    return {"supmae.graph": graph, "supmae.model_card": json.dumps(card.to_dict(), sort_keys=True)}


def export_encoder(
    model: SupMAE, card: ModelCard, path: str | Path, opset: int = DEFAULT_OPSET
) -> ExportInfo:
    """Write the encoder graph (see the module docstring) to `path`."""
    s = card.preprocessing.image_size
    if s != model.config.img_size:
        raise ExportError(f"model card image size {s} != model img_size {model.config.img_size}")
    example = torch.randn(2, 3, s, s)
    names = list(encoder_output_names(card))
    return _export(
        EncoderGraph(model),
        (example,),
        Path(path),
        [ENCODER_INPUT],
        names,
        {ENCODER_INPUT: {0: "batch"}},
        opset,
        _metadata(card, "encoder"),
    )


def export_reconstruct(
    model: SupMAE, card: ModelCard, path: str | Path, opset: int = DEFAULT_OPSET
) -> ExportInfo:
    """Write the reconstruction graph (images, ids_keep -> masked, reconstruction, pasted, mask)."""
    if not card.capabilities["reconstruct"]:
        raise ExportError(f"a {card.framework!r} model has no decoder: no reconstruction graph to export")
    from supmae_serve.model.masking import seeded_keep_indices

    s = model.config.img_size
    images = torch.randn(2, 3, s, s)
    ids_keep = seeded_keep_indices(model.num_patches, model.config.mask_ratio, [0, 1])  # (2, K)
    return _export(
        ReconstructGraph(model),
        (images, ids_keep),
        Path(path),
        list(RECONSTRUCT_INPUTS),
        list(RECONSTRUCT_OUTPUTS),
        {"images": {0: "batch"}, "ids_keep": {0: "batch", 1: "keep"}},
        opset,
        _metadata(card, "reconstruct"),
    )


# ---------------------------------------------------------------------------- files
def save_onnx(
    model, path: str | Path, external_data: bool | None = None, reload_external: bool = False
) -> Path:
    """Save a ModelProto; weights go to `<name>.data` beside it when the file would pass 2 GiB."""
    import onnx

    path = Path(path)
    if reload_external:
        onnx.load_external_data_for_model(model, str(path.parent))
    if external_data is None:
        external_data = model.ByteSize() > MAX_PROTO_BYTES
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save_model(model, str(path))
    return path


def load_onnx(path: str | Path, check: bool = True):
    """Load and check an ONNX file; a missing, truncated or corrupt file raises ExportError saying so."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    if path.stat().st_size == 0:
        raise ExportError(f"{path}: empty file (0 bytes): not an ONNX model")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ExportError(f"{path}: cannot parse as an ONNX model (truncated or corrupt file: {e})") from e
    if not model.graph.node or not model.graph.output:
        raise ExportError(f"{path}: parsed, but holds no graph (truncated or not an ONNX model)")
    if check:
        try:
            onnx.checker.check_model(str(path) if _has_external(model) else model)
        except Exception as e:  # noqa: BLE001 - onnx raises ValidationError and others
            raise ExportError(f"{path}: invalid ONNX model (truncated or corrupt file?): {e}") from e
    return model


def _has_external(model) -> bool:
    return any(t.data_location == 1 for t in model.graph.initializer)


def check_no_random_ops(model, source: str = "model") -> None:
    found = sorted({n.op_type for n in model.graph.node if n.op_type in RANDOM_OPS})
    if found:
        raise ExportError(
            f"{source}: the exported graph contains random/training ops {found}; export in eval mode"
        )


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int | str]  # ints for fixed axes, names for dynamic ones


def graph_io(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a loaded ONNX model with dtypes and shapes."""
    from onnx import helper

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return TensorSpec(v.name, helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    inits = {t.name for t in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def check_encoder_io(model, card: ModelCard, source: str) -> None:
    """The graph must take images (N,3,S,S) with S from the card and give the card's outputs."""
    inputs, outputs = graph_io(model)
    s = card.preprocessing.image_size
    if [i.name for i in inputs] != [ENCODER_INPUT]:
        raise ExportError(f"{source}: inputs {[i.name for i in inputs]}, expected ['{ENCODER_INPUT}']")
    shape = inputs[0].shape
    if len(shape) != 4 or shape[1:] != [3, s, s]:
        raise ExportError(
            f"{source}: input 'images' has shape {shape}; the model card says (N, 3, {s}, {s}): "
            "this file was exported from a different model"
        )
    want = list(encoder_output_names(card))
    if [o.name for o in outputs] != want:
        raise ExportError(f"{source}: outputs {[o.name for o in outputs]}, the model card implies {want}")
    d = card.config.embed_dim
    emb = outputs[0].shape
    if len(emb) != 2 or emb[1] != d:
        raise ExportError(f"{source}: 'embedding' has shape {emb}; the model card's width is {d}")
    if card.capabilities["classify"]:
        c = outputs[3].shape
        if len(c) != 2 or c[1] != card.config.num_classes:
            raise ExportError(
                f"{source}: 'logits' has shape {c}; the model card has {card.config.num_classes} classes"
            )


# ---------------------------------------------------------------------------- fp16
# Kept in fp32 inside the fp16 graph: normalisation (fp16 LayerNorm over- and underflows in ViTs: the
# variance of wide activations exceeds fp16's range) and the reductions/softmax that feed it.
FP16_KEEP_FP32_OPS = ("LayerNormalization", "ReduceMean", "Softmax", "Pow", "Sqrt", "Erf")


def convert_fp16(
    src: str | Path, dst: str | Path, keep_fp32_ops: tuple[str, ...] = FP16_KEEP_FP32_OPS
) -> Path:
    """fp32 graph -> fp16 weights and compute, with float32 inputs and outputs (casts inside), so
    callers feed and read float32 whatever the precision."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise ExportError(f"fp16 conversion needs onnxruntime: {install_hint('onnxruntime')}") from e
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = OnnxModel(
            convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32_ops))
        )
    half.topological_sort()  # the converter appends its input casts at the end
    return save_onnx(half.model, dst)
