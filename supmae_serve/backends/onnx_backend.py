"""The onnxruntime backend: a `supmae-export` folder run by onnxruntime.

Execution providers are chosen by what this onnxruntime offers and the device asked for: TensorRT EP, then
CUDA EP, then the CPU. onnxruntime is imported lazily; without it the error names the package to install.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.optional import install_hint

from .base import BackendError
from .graph import GraphBackend, GraphRunner, load_export, precision_preference, select_artefact

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"the onnxruntime backend needs onnxruntime: {install_hint('onnxruntime')}") from e
    return onnxruntime


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers ([] without onnxruntime)."""
    try:
        return list(import_onnxruntime().get_available_providers())
    except BackendError:
        return []


def choose_providers(
    available: Sequence[str],
    device: str,
    *,
    use_tensorrt: bool = True,
    fp16: bool = False,
    trt_cache: str | None = None,
    trt_profile: dict[str, str] | None = None,
) -> tuple[list[Any], str]:
    """(providers for InferenceSession, the device they run on).

    device "cpu" -> CPU only; "cuda[:N]" -> TensorRT EP (if `use_tensorrt`) and CUDA EP, failing clearly if this
    onnxruntime has neither; "auto" -> the GPU providers when present, else the CPU.
    """
    gpu_wanted = device != "cpu"
    index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    gpu = []
    if gpu_wanted and use_tensorrt and TRT_EP in available:
        opts: dict[str, Any] = {"device_id": index, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True}
        if trt_cache:
            opts["trt_engine_cache_path"] = trt_cache
        if trt_profile:
            opts.update(trt_profile)
        gpu.append((TRT_EP, opts))
    if gpu_wanted and CUDA_EP in available:
        gpu.append((CUDA_EP, {"device_id": index}))
    if device.startswith("cuda") and not gpu:
        raise BackendError(
            f"device {device!r} asked for, but this onnxruntime has no CUDA or TensorRT execution provider "
            f"(available: {', '.join(available) or 'none'}); pip install 'supmae[gpu]' or use --device cpu"
        )
    if gpu:
        return [*gpu, CPU_EP], f"cuda:{index}"
    return [CPU_EP], "cpu"


class OrtRunner:
    """A `GraphRunner` over one onnxruntime InferenceSession."""

    def __init__(self, path: str | os.PathLike, providers: list[Any], threads: int = 0):
        ort = import_onnxruntime()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BackendError(f"{path}: onnxruntime cannot load this graph ({e})") from e
        self.path = Path(path)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        batch_dim = self.inputs["images"].shape[0] if "images" in self.inputs else None
        self.fixed_batch = isinstance(batch_dim, int) and batch_dim > 0
        self.max_batch = batch_dim if self.fixed_batch else None
        self.providers = self.session.get_providers()

    def run(self, outputs: Sequence[str], feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        arrays = {}
        for name, t in feeds.items():
            np_type = _NP_TYPES.get(self.inputs[name].type, np.float32)
            arrays[name] = np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np_type)
        values = self.session.run(list(outputs), arrays)
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(outputs, values, strict=True)}


class OnnxBackend(GraphBackend):
    """`Backend` over the ONNX graphs of a `supmae-export` folder."""

    name = "onnxruntime"

    def __init__(
        self,
        export_dir: str | os.PathLike,
        device: str = "auto",
        precision: str = "auto",
        threads: int = 0,
        max_batch_size: int = 32,
        reconstruct_runner: GraphRunner | None = None,
    ):
        """`reconstruct_runner` serves reconstruction when the folder has no reconstruction graph (the graph
        cache passes the checkpoint's torch model: graph_cache.TorchReconstructRunner)."""
        folder = Path(export_dir)
        card, artefacts = load_export(folder)
        available = available_providers()
        if not available:
            import_onnxruntime()  # raises with the install hint
        on_gpu = device != "cpu" and any(p in available for p in (TRT_EP, CUDA_EP))
        wanted = precision_preference(precision, on_gpu)
        # the graph with onnxruntime's fused CPU kernels (format onnx-ort) on the CPU; standard ops on a GPU,
        # where the TensorRT/CUDA providers do their own fusion
        formats = ("onnx",) if on_gpu else ("onnx-ort", "onnx")
        enc = select_artefact(artefacts, "encoder", formats, wanted)
        if enc is None:
            have = ", ".join(f"{a.file} ({a.kind}, {a.precision})" for a in artefacts) or "nothing"
            raise BackendError(
                f"{folder}: no ONNX encoder with precision {' or '.join(wanted)}; the folder has {have}"
            )
        s = card.preprocessing.image_size
        profile = {
            "trt_profile_min_shapes": f"images:1x3x{s}x{s}",
            "trt_profile_opt_shapes": f"images:{max_batch_size}x3x{s}x{s}",
            "trt_profile_max_shapes": f"images:{max_batch_size}x3x{s}x{s}",
        }
        cache = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supmae" / "trt")
        providers, run_device = choose_providers(
            available, device, fp16=enc.precision == "fp16", trt_cache=cache, trt_profile=profile
        )
        encoder = OrtRunner(folder / enc.file, providers, threads)
        rec = select_artefact(artefacts, "reconstruct", ("onnx",), [enc.precision, *wanted, "fp32"])
        reconstructor = None
        if rec is not None and card.capabilities["reconstruct"]:
            # the reconstruction graph's K varies with mask_ratio: no TensorRT EP (it would rebuild per shape)
            rec_providers, _ = choose_providers(available, device, use_tensorrt=False)
            reconstructor = OrtRunner(folder / rec.file, rec_providers, threads)
        elif reconstruct_runner is not None and card.capabilities["reconstruct"]:
            reconstructor = reconstruct_runner
        super().__init__(
            card,
            encoder,
            reconstructor,
            device=run_device,
            precision=enc.precision,
            extra={
                "export_dir": str(folder),
                "encoder": enc.file,
                "reconstruct": None
                if reconstructor is None
                else rec.file
                if rec is not None
                else f"{type(reconstructor).__name__} (torch)",
                "providers": encoder.providers,
            },
        )
