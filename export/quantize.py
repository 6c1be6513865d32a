"""INT8 encoders for CPUs with ONNX Runtime's quantiser.

- dynamic (`encoder.int8.onnx`): weights quantised offline, activations per batch at run time. No
  calibration data; the usual choice for transformers on CPUs. Built from the fused graph
  (`encoder.opt.onnx`), so the fused Attention becomes ONNX Runtime's QAttention.
- static (`encoder.int8-static.onnx`): activation ranges fixed from calibration images (an image
  folder through `supmae_serve.preprocess`), QDQ format, MatMul/Gemm only.

Choices, and why (measured on the 2-core AVX2 dev CPU, docs/benchmarks.md):
- Weights are quantised per output channel: ViT projection weights have very different ranges per
  channel, and one scale per tensor cost top-1 agreement.
- The patch embedding (Conv) and the classification head (Gemm) stay in fp32: they are a few percent
  of the FLOPs, and the head's errors go straight into the predicted class.
- On CPUs without VNNI, the u8 x s8 kernels can saturate (ONNX Runtime's quantisation docs); for
  static quantisation we use `reduce_range` (7-bit weights), which avoids it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supmae_serve.common.optional import install_hint

from .onnx import ENCODER_INPUT, ExportError


@dataclass
class QuantizeConfig:
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: no u8 x s8 saturation on CPUs without VNNI
    exclude_ops: tuple[str, ...] = ("Conv", "Gemm")  # patch embedding, classification head
    op_types: tuple[str, ...] = ("MatMul", "Attention")
    static_op_types: tuple[str, ...] = ("MatMul",)
    calib_batch: int = 8
    calibrate_method: str = "minmax"  # "minmax" | "percentile" | "entropy"


@dataclass
class QuantizeReport:
    method: str
    quantized_nodes: dict[str, int] = field(default_factory=dict)  # op type -> count in the result
    excluded: list[str] = field(default_factory=list)
    calibration_images: int = 0

    def describe(self, config: QuantizeConfig) -> dict[str, Any]:
        """The manifest's "quantization" entry: how the file was quantised, so a reader can judge it."""
        dynamic = self.method == "dynamic"
        return {
            "method": self.method,
            "per_channel": config.per_channel,
            "reduce_range": config.reduce_range if dynamic else True,
            "weight_type": "int8",
            "activation_type": "uint8",
            "format": "QOperator (dynamic)" if dynamic else "QDQ",
            "excluded_nodes": self.excluded,
            "quantized_nodes": self.quantized_nodes,
            "calibration_images": self.calibration_images,
        }


def _import_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise ExportError(f"INT8 quantisation needs onnxruntime: {install_hint('onnxruntime')}") from e
    return quantization


class _DropPreprocessHint(logging.Filter):
    """onnxruntime.quantization logs "Please consider to run pre-processing" on every call: our graphs
    are already shape-inferred and fused, so the hint is noise in the export's progress output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_hint():
    root, f = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _excluded_nodes(model_path: Path, ops: tuple[str, ...]) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in ops and n.name]


def _count_ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.op_type in (
            "QAttention",
            "DynamicQuantizeMatMul",
            "MatMulInteger",
            "QLinearMatMul",
            "QuantizeLinear",
            "DequantizeLinear",
            "DynamicQuantizeLinear",
            "MatMulIntegerToFloat",
        ):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def quantize_dynamic_int8(
    src: str | Path, dst: str | Path, config: QuantizeConfig = QuantizeConfig()
) -> QuantizeReport:
    """Dynamic INT8 (weights int8, activations u8 at run time) of an encoder graph."""
    q = _import_quantization()
    src, dst = Path(src), Path(dst)
    excluded = _excluded_nodes(src, config.exclude_ops)
    with _quiet_hint():
        q.quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=excluded,
            extra_options={"MatMulConstBOnly": True},
        )
    return QuantizeReport("dynamic", _count_ops(dst), excluded)


class ImageCalibrationReader:
    """onnxruntime `CalibrationDataReader` over preprocessed images (N, 3, S, S), in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 8, input_name: str = ENCODER_INPUT):
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch_size = batch_size
        self.input_name = input_name
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch_size):
            yield {self.input_name: self.images[i : i + self.batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_static_int8(
    src: str | Path, dst: str | Path, images: np.ndarray, config: QuantizeConfig = QuantizeConfig()
) -> QuantizeReport:
    """Static INT8 (QDQ) with activation ranges calibrated on `images` (preprocessed, N x 3 x S x S).

    `src` should be the plain (unfused) encoder: the calibrator runs it with onnxruntime and needs
    standard ops to insert its range observers."""
    q = _import_quantization()
    src, dst = Path(src), Path(dst)
    if len(images) == 0:
        raise ExportError("static quantisation needs calibration images (pass --calib-data DIR)")
    excluded = _excluded_nodes(src, config.exclude_ops)
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "percentile": q.CalibrationMethod.Percentile,
        "entropy": q.CalibrationMethod.Entropy,
    }
    if config.calibrate_method not in methods:
        raise ExportError(
            f"calibrate_method must be one of {sorted(methods)}, got {config.calibrate_method!r}"
        )
    with _quiet_hint():
        q.quantize_static(
            str(src),
            str(dst),
            ImageCalibrationReader(images, config.calib_batch),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=list(config.static_op_types),
            per_channel=config.per_channel,
            reduce_range=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[config.calibrate_method],
            extra_options={"MatMulConstBOnly": True},
        )
    return QuantizeReport("static", _count_ops(dst), excluded, calibration_images=len(images))
