"""The TensorRT backend: serialized engines from a `supmae-export` folder, run with the TensorRT >= 10
Python API (named I/O tensors, `execute_async_v3`) on torch-allocated CUDA buffers (no pycuda).

The engine's I/O follows the ONNX contract (see `graph.py`). A reconstruction engine is used when the
export has one; otherwise the ONNX reconstruction graph runs on onnxruntime's CUDA provider.

Unverified here: the development machines have no GPU and no tensorrt. The chunking, padding and output
handling are the shared `GraphBackend` code (tested with the onnxruntime runner and a fake runner); the
engine calls below follow the TensorRT 10 API documentation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from supmae_serve.common.optional import install_hint
from supmae_serve.common.system import resolve_device

from .base import BackendError
from .graph import (
    ENGINE_FORMAT,
    Artefact,
    GraphBackend,
    load_export,
    precision_preference,
    select_artefact,
)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(f"the tensorrt backend needs TensorRT: {install_hint('tensorrt')}") from e
    return tensorrt


def torch_dtype(trt, dtype) -> torch.dtype:
    """TensorRT DataType -> torch dtype."""
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT64": torch.int64,
        "INT32": torch.int32,
        "INT8": torch.int8,
        "BOOL": torch.bool,
    }
    for name, t in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return t
    raise BackendError(f"unsupported TensorRT tensor type {dtype}")


class TrtRunner:
    """A `GraphRunner` over one TensorRT engine. Not thread-safe: the batcher calls it from one thread."""

    def __init__(self, path: str | os.PathLike, device: torch.device):
        trt = import_tensorrt()
        self.trt = trt
        self.device = device
        self.path = Path(path)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        with torch.cuda.device(device):
            self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise BackendError(
                    f"{path}: TensorRT cannot deserialize this engine (built by another TensorRT version or GPU?)"
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        if "images" not in self.input_names:
            raise BackendError(f"{path}: the engine has no 'images' input (inputs: {self.input_names})")
        lo, _, hi = self.engine.get_tensor_profile_shape("images", 0)  # (min, opt, max) of profile 0
        self.max_batch = int(hi[0])
        self.fixed_batch = int(lo[0]) == int(hi[0])

    def run(self, outputs: Sequence[str], feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        ctx = self.context
        keep = []  # buffers must outlive the asynchronous execution
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name in self.input_names:
                t = feeds[name].to(self.device, self.dtypes[name], non_blocking=True).contiguous()
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            buffers = {}
            for name in self.output_names:  # every output needs an address, wanted or not
                shape = tuple(ctx.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                ctx.set_tensor_address(name, buffers[name].data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.path}: TensorRT execution failed")
            self.stream.synchronize()
        return {n: buffers[n].float().cpu().numpy() for n in outputs}


def engine_fits(artefact: Artefact, arch: str, trt_version: str) -> bool:
    """An engine runs only on the GPU architecture and TensorRT version it was built with (recorded by
    supmae-export under "tensorrt": {"arch": "sm90", "version": "10.7.0"}; unrecorded means unknown: try it)."""
    info = artefact.extra.get("tensorrt") or {}
    return info.get("arch", arch) == arch and info.get("version", trt_version) == trt_version


class TensorRTBackend(GraphBackend):
    """`Backend` over the TensorRT engines of a `supmae-export` folder."""

    name = "tensorrt"

    def __init__(
        self, export_dir: str | os.PathLike, device: str = "auto", precision: str = "auto", threads: int = 0
    ):
        folder = Path(export_dir)
        card, artefacts = load_export(folder)
        dev = resolve_device("cuda" if device == "auto" else device, BackendError)
        if dev.type != "cuda":
            raise BackendError(
                "the tensorrt backend runs on a CUDA device; use --backend onnxruntime or torch on the CPU"
            )
        wanted = precision_preference(precision, on_gpu=True)
        trt = import_tensorrt()
        major, minor = torch.cuda.get_device_capability(dev)

        def fits(a: Artefact) -> bool:
            return engine_fits(a, f"sm{major}{minor}", trt.__version__)

        enc = select_artefact(artefacts, "encoder", (ENGINE_FORMAT,), wanted, fits)
        if enc is None:
            have = [f"{a.file} ({a.precision})" for a in artefacts if a.fmt == ENGINE_FORMAT] or ["none"]
            raise BackendError(
                f"{folder}: no TensorRT encoder engine with precision {' or '.join(wanted)} built for this GPU "
                f"(sm{major}{minor}) and TensorRT {trt.__version__}; engines there: {', '.join(have)}. "
                "Engines are specific to both: build one here with supmae-export --tensorrt"
            )
        encoder = TrtRunner(folder / enc.file, dev)
        reconstructor = None
        rec_file = None
        if card.capabilities["reconstruct"]:
            rec = select_artefact(artefacts, "reconstruct", (ENGINE_FORMAT,), [enc.precision, *wanted], fits)
            if rec is not None:
                reconstructor, rec_file = TrtRunner(folder / rec.file, dev), rec.file
            else:
                rec = select_artefact(artefacts, "reconstruct", ("onnx",), [enc.precision, *wanted, "fp32"])
                if rec is not None:
                    from .onnx_backend import OrtRunner, available_providers, choose_providers

                    providers, _ = choose_providers(available_providers(), str(dev), use_tensorrt=False)
                    reconstructor, rec_file = OrtRunner(folder / rec.file, providers, threads), rec.file
        super().__init__(
            card,
            encoder,
            reconstructor,
            device=str(dev),
            precision=enc.precision,
            extra={
                "export_dir": str(folder),
                "encoder": enc.file,
                "reconstruct": rec_file,
                "max_batch": encoder.max_batch,
            },
        )
