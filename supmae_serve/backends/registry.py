"""The backend registry: a name -> factory table, and the `auto` rule.

`auto` picks the fastest backend this machine can run, in this order:

1. tensorrt     - a TensorRT encoder engine in the export folder, `tensorrt` importable, a CUDA GPU;
2. onnxruntime  - an ONNX encoder in the export folder and onnxruntime with the TensorRT or CUDA provider;
3. torch        - a checkpoint (model.safetensors) and a CUDA GPU;
4. onnxruntime  - an ONNX encoder in the export folder, on the CPU;
5. torch        - a checkpoint, on the CPU.

`--device cpu` skips 1-3; `--precision int8` allows only onnxruntime (an int8 export). The export folder is
`--export-dir`, or `--model` itself when it holds a manifest.json.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from supmae_serve.model.checkpoint import CARD_NAME, WEIGHTS_NAME

from .base import Backend, BackendError
from .graph import ENGINE_SUFFIXES, MANIFEST_NAME, ONNX_SUFFIXES, read_manifest


@dataclass(frozen=True)
class BackendConfig:
    model: Path  # checkpoint folder, or an export folder (manifest.json + model.json + graphs)
    export_dir: Path | None = None
    backend: str = "auto"  # auto | torch | onnxruntime | tensorrt | fake
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    threads: int = 0
    max_batch_size: int = 32  # largest batch the batcher sends (TensorRT EP optimisation profile)


class ModelNotFoundError(BackendError):
    pass


def check_model_path(path: Path) -> None:
    """A clear error for a model path that is missing or holds no model card."""
    path = Path(path)
    if not path.exists():
        from supmae_serve.settings import DEFAULT_MODEL

        hint = (
            " (the bundled default model is not in this installation: train it or pass --model / SUPMAE_MODEL)"
            if path.resolve() == DEFAULT_MODEL
            else ""
        )
        raise ModelNotFoundError(
            f"model path {path} does not exist{hint}; expected a checkpoint folder ({WEIGHTS_NAME} + {CARD_NAME}) "
            f"or a supmae-export folder ({MANIFEST_NAME} + {CARD_NAME})"
        )
    card = (
        path / CARD_NAME if path.is_dir() else (path if path.suffix == ".json" else path.with_name(CARD_NAME))
    )
    if not card.exists():
        raise ModelNotFoundError(
            f"model path {path} has no {CARD_NAME} (the model card); is it a supmae checkpoint?"
        )


def export_dir_of(cfg: BackendConfig) -> Path | None:
    if cfg.export_dir is not None:
        if not (Path(cfg.export_dir) / MANIFEST_NAME).exists():
            raise BackendError(
                f"--export-dir {cfg.export_dir}: no {MANIFEST_NAME} there (run supmae-export first)"
            )
        return Path(cfg.export_dir)
    if Path(cfg.model).is_dir() and (Path(cfg.model) / MANIFEST_NAME).exists():
        return Path(cfg.model)
    return None


def checkpoint_of(cfg: BackendConfig) -> Path | None:
    p = Path(cfg.model)
    if p.is_dir():
        return p if (p / WEIGHTS_NAME).exists() else None
    return p if p.suffix == ".safetensors" and p.exists() else None


@dataclass
class RuntimeProbe:
    """What this machine offers; a field per question so tests can fake any machine."""

    cuda: bool | None = None
    ort_providers: list[str] | None = None
    tensorrt: bool | None = None

    def __post_init__(self) -> None:
        if self.cuda is None:
            self.cuda = torch.cuda.is_available()
        if self.tensorrt is None:
            self.tensorrt = importlib.util.find_spec("tensorrt") is not None
        if self.ort_providers is None:
            from .onnx_backend import available_providers

            self.ort_providers = available_providers()


def choose_backend(cfg: BackendConfig, probe: RuntimeProbe | None = None) -> tuple[str, str]:
    """(backend name, why) by the `auto` rule in this module's docstring."""
    if cfg.backend != "auto":
        return cfg.backend, "asked for"
    probe = probe or RuntimeProbe()
    export = export_dir_of(cfg)
    artefacts = read_manifest(export) if export else []
    has_engine = any(a.kind == "encoder" and a.suffix in ENGINE_SUFFIXES for a in artefacts)
    has_onnx = any(a.kind == "encoder" and a.suffix in ONNX_SUFFIXES for a in artefacts)
    ckpt = checkpoint_of(cfg)
    gpu_ok = cfg.device != "cpu"
    ort_gpu = any(p in probe.ort_providers for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    if cfg.precision == "int8":
        if has_onnx:
            return "onnxruntime", "int8 runs only as an int8 ONNX export"
        raise BackendError("--precision int8 needs an export folder with an int8 ONNX encoder")
    if gpu_ok and has_engine and probe.tensorrt and probe.cuda:
        return "tensorrt", "TensorRT engine and a CUDA GPU"
    if gpu_ok and has_onnx and ort_gpu:
        return "onnxruntime", "ONNX export and onnxruntime with a GPU provider"
    if gpu_ok and ckpt is not None and probe.cuda:
        return "torch", "checkpoint and a CUDA GPU"
    if has_onnx and probe.ort_providers:
        return "onnxruntime", "ONNX export on the CPU"
    if ckpt is not None:
        return "torch", "checkpoint on the CPU"
    raise BackendError(
        f"nothing this machine can run at {cfg.model}: no {WEIGHTS_NAME} for torch and no usable export "
        "(ONNX needs onnxruntime, engines need tensorrt and a GPU)"
    )


# ---------------------------------------------------------------------------- factories
def _torch(cfg: BackendConfig) -> Backend:
    from .torch_backend import TorchBackend

    ckpt = checkpoint_of(cfg)
    if ckpt is None:
        raise BackendError(
            f"{cfg.model}: the torch backend needs a checkpoint ({WEIGHTS_NAME} + {CARD_NAME})"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return TorchBackend(ckpt, device=cfg.device, precision=cfg.precision, compile=cfg.compile)


def _onnx(cfg: BackendConfig) -> Backend:
    from .onnx_backend import OnnxBackend

    export = export_dir_of(cfg)
    if export is None:
        raise BackendError(
            f"{cfg.model}: the onnxruntime backend needs a supmae-export folder (--export-dir, or --model pointing at one)"
        )
    return OnnxBackend(
        export,
        device=cfg.device,
        precision=cfg.precision,
        threads=cfg.threads,
        max_batch_size=cfg.max_batch_size,
    )


def _tensorrt(cfg: BackendConfig) -> Backend:
    from .tensorrt_backend import TensorRTBackend

    export = export_dir_of(cfg)
    if export is None:
        raise BackendError(f"{cfg.model}: the tensorrt backend needs a supmae-export folder with an engine")
    return TensorRTBackend(export, device=cfg.device, precision=cfg.precision, threads=cfg.threads)


def _fake(cfg: BackendConfig) -> Backend:
    from .fake import FakeBackend

    return FakeBackend.from_path(cfg.model)


REGISTRY: dict[str, Callable[[BackendConfig], Backend]] = {
    "torch": _torch,
    "onnxruntime": _onnx,
    "tensorrt": _tensorrt,
    "fake": _fake,
}


def register_backend(name: str, factory: Callable[[BackendConfig], Backend]) -> None:
    REGISTRY[name] = factory


def create_backend(cfg: BackendConfig, probe: RuntimeProbe | None = None) -> Backend:
    check_model_path(cfg.model)
    name, _ = choose_backend(cfg, probe)
    if name not in REGISTRY:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](cfg)
