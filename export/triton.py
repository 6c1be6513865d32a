"""An NVIDIA Triton Inference Server model repository from the exported artefacts (`--triton DIR`).

    DIR/
      <name>_encoder/            onnxruntime_onnx, the portable encoder.onnx
        config.pbtxt             dynamic batching, max batch, instance group, IO read from the ONNX file
        labels.txt               class names, attached to the "logits" output (classifying models)
        1/model.onnx
      <name>_encoder_trt/        tensorrt_plan (when an engine was built), KIND_GPU
        config.pbtxt, labels.txt, 1/model.plan
      <name>_reconstruct/        the reconstruction graph (when the model has a decoder)
        config.pbtxt, 1/model.onnx

Names, data types and shapes in config.pbtxt come from the ONNX file itself (the batch axis becomes
Triton's implicit batch dimension, other dynamic axes -1), so they cannot drift from the graph.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .onnx import ExportError, TensorSpec, graph_io, load_onnx

_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


@dataclass
class TritonConfig:
    name: str = "supmae"
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000  # how long a request may wait for others to fill a batch
    onnx_instances: int = 1
    onnx_kind: str = "KIND_AUTO"  # a GPU when Triton has one, else the CPU
    trt_instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.onnx_kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
            raise ValueError(f"onnx_kind must be KIND_AUTO, KIND_CPU or KIND_GPU, got {self.onnx_kind!r}")
        self.preferred_batch_sizes = tuple(
            b for b in self.preferred_batch_sizes if b <= self.max_batch_size
        ) or (self.max_batch_size,)


@dataclass
class TritonModel:
    name: str
    platform: str
    path: Path  # the model folder
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: list[Path] = field(default_factory=list)


def _dims(spec: TensorSpec, batched: bool, source: str) -> list[int]:
    shape = list(spec.shape)
    if batched:
        if not shape or isinstance(shape[0], int):
            raise ExportError(
                f"{source}: {spec.name!r} has no dynamic batch axis (shape {shape}); Triton batching needs one"
            )
        shape = shape[1:]
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _tensor_block(spec: TensorSpec, dims: list[int], label_file: str | None = None) -> str:
    if spec.dtype not in _TRITON_TYPES:
        raise ExportError(f"tensor {spec.name!r} has dtype {spec.dtype}, which has no Triton type here")
    lines = [
        "  {",
        f'    name: "{spec.name}"',
        f"    data_type: {_TRITON_TYPES[spec.dtype]}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    lines.append("  }")
    return "\n".join(lines)


def config_pbtxt(
    name: str,
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    config: TritonConfig,
    instance_kind: str,
    instances: int,
    labels: bool,
    source: str,
) -> str:
    """The text of a Triton `config.pbtxt` (protobuf text format of inference.ModelConfig)."""
    ins = ",\n".join(_tensor_block(s, _dims(s, True, source)) for s in inputs)
    outs = ",\n".join(
        _tensor_block(s, _dims(s, True, source), "labels.txt" if labels and s.name == "logits" else None)
        for s in outputs
    )
    preferred = ", ".join(str(b) for b in config.preferred_batch_sizes)
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {config.max_batch_size}\n"
        f"input [\n{ins}\n]\n"
        f"output [\n{outs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {config.max_queue_delay_us}\n"
        "}\n"
        "instance_group [\n"
        "  {\n"
        f"    count: {instances}\n"
        f"    kind: {instance_kind}\n"
        "  }\n"
        "]\n"
    )


def _write_model(
    repo: Path,
    name: str,
    platform: str,
    artefact: Path,
    io_source: Path,
    config: TritonConfig,
    kind: str,
    instances: int,
    class_names: list[str] | None,
) -> TritonModel:
    inputs, outputs = graph_io(load_onnx(io_source, check=False))
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    target = folder / "1" / ("model.plan" if platform == "tensorrt_plan" else "model.onnx")
    shutil.copyfile(artefact, target)
    files = [target]
    if artefact.with_name(artefact.name + ".data").exists():  # external weights travel with the graph
        shutil.copyfile(
            artefact.with_name(artefact.name + ".data"), target.with_name(artefact.name + ".data")
        )
    has_labels = bool(class_names) and any(o.name == "logits" for o in outputs)
    text = config_pbtxt(name, platform, inputs, outputs, config, kind, instances, has_labels, str(io_source))
    (folder / "config.pbtxt").write_text(text)
    files.append(folder / "config.pbtxt")
    if has_labels:
        (folder / "labels.txt").write_text("\n".join(class_names) + "\n")
        files.append(folder / "labels.txt")
    return TritonModel(name, platform, folder, inputs, outputs, files)


def write_model_repository(
    repo: str | Path,
    encoder_onnx: str | Path,
    config: TritonConfig = TritonConfig(),
    *,
    class_names: list[str] | None = None,
    reconstruct_onnx: str | Path | None = None,
    engine: str | Path | None = None,
    engine_max_batch: int | None = None,
) -> list[TritonModel]:
    """Write the repository; returns the models written. The engine's config is read from the ONNX file
    it was built from (TensorRT keeps the names, and float32 IO)."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    models = [
        _write_model(
            repo,
            f"{config.name}_encoder",
            "onnxruntime_onnx",
            Path(encoder_onnx),
            Path(encoder_onnx),
            config,
            config.onnx_kind,
            config.onnx_instances,
            class_names,
        )
    ]
    if engine is not None:
        trt_config = config
        if engine_max_batch is not None and engine_max_batch < config.max_batch_size:
            raise ExportError(
                f"Triton max_batch_size {config.max_batch_size} exceeds the engine's profile max batch {engine_max_batch}"
            )
        models.append(
            _write_model(
                repo,
                f"{config.name}_encoder_trt",
                "tensorrt_plan",
                Path(engine),
                Path(encoder_onnx),
                trt_config,
                "KIND_GPU",
                config.trt_instances,
                class_names,
            )
        )
    if reconstruct_onnx is not None:
        models.append(
            _write_model(
                repo,
                f"{config.name}_reconstruct",
                "onnxruntime_onnx",
                Path(reconstruct_onnx),
                Path(reconstruct_onnx),
                config,
                config.onnx_kind,
                config.onnx_instances,
                None,
            )
        )
    return models
