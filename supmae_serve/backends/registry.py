"""The backend registry: a name -> factory table, and the `auto` rule.

`auto` picks the fastest backend this machine can run, in this order:

1. tensorrt     - a TensorRT encoder engine in the export folder, `tensorrt` importable, a CUDA GPU;
2. onnxruntime  - an ONNX encoder in the export folder and onnxruntime with the TensorRT or CUDA provider;
3. torch        - a checkpoint (model.safetensors) and a CUDA GPU;
4. onnxruntime  - an ONNX encoder in the export folder, on the CPU;
5. graph-cache  - a checkpoint and no export folder, on the CPU: ONNX Runtime's fused fp32 graph built from
                  the checkpoint on first start and cached (graph_cache.py), or bf16 through torch on a CPU
                  with AMX bf16 where bf16 agrees with fp32 (top-1 >= 99.5% on calibration images);
6. torch        - a checkpoint, on the CPU (also where the graph cache is off or its build failed).

`--device cpu` skips 1-3; `--precision int8` allows only onnxruntime: an int8 export, or the static INT8 graph
the graph cache builds (served only when its top-1 agreement with fp32 is >= 99%). The export folder is
`--export-dir`, or `--model` itself when it holds a manifest.json. A candidate that fails to load (an engine
built for another GPU or TensorRT version, a provider that cannot start, a graph that failed its parity check)
is logged and the next one is tried. The backend created carries `selection`: what was picked and why, the CPU
and its features, the agreement figures and the graph cache's state (/v1/info shows it).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from supmae_serve.model.checkpoint import CARD_NAME, WEIGHTS_NAME, import_hint

from .base import Backend, BackendError
from .graph import ENGINE_FORMAT, MANIFEST_NAME, ONNX_FORMATS, read_manifest

log = logging.getLogger("supmae.backends")


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
    graph_cache: Path | None = None  # where graphs built from a checkpoint are cached; None: build none
    calib_data: Path | None = None  # images to verify/calibrate them (else the checkpoint's calib/ folder)
    cpu_flags: frozenset[str] | None = None  # this CPU's flags (None: read from the machine)


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
    hint = import_hint(path)
    if hint:
        raise ModelNotFoundError(hint)
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
    cpu_flags: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.cpu_flags is None:
            from supmae_serve.common.system import cpu_flags

            self.cpu_flags = cpu_flags()
        if self.cuda is None:
            self.cuda = torch.cuda.is_available()
        if self.tensorrt is None:
            self.tensorrt = importlib.util.find_spec("tensorrt") is not None
        if self.ort_providers is None:
            from .onnx_backend import available_providers

            self.ort_providers = available_providers()


def backend_candidates(cfg: BackendConfig, probe: RuntimeProbe | None = None) -> list[tuple[str, str, str]]:
    """Every (backend, device, why) the `auto` rule allows here, fastest first; one entry when a backend is named."""
    if cfg.backend != "auto":
        return [(cfg.backend, cfg.device, "asked for")]
    probe = probe or RuntimeProbe()
    export = export_dir_of(cfg)
    artefacts = read_manifest(export) if export else []
    has_engine = any(a.kind == "encoder" and a.fmt == ENGINE_FORMAT for a in artefacts)
    has_onnx = any(a.kind == "encoder" and a.fmt in ONNX_FORMATS for a in artefacts)
    ckpt = checkpoint_of(cfg)
    gpu_ok = cfg.device != "cpu"
    ort_gpu = any(p in probe.ort_providers for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    # the graph cache: a checkpoint without an export folder, on the CPU, in a precision it serves
    cache_ok = (
        export is None
        and ckpt is not None
        and cfg.graph_cache is not None
        and bool(probe.ort_providers)
        and cfg.device in ("auto", "cpu")
        and not cfg.compile
    )
    if cfg.precision == "int8":
        if has_onnx:
            return [("onnxruntime", cfg.device, "int8 runs only as an int8 ONNX export")]
        if cache_ok:
            return [("graph-cache", "cpu", "int8: the static INT8 graph built from the checkpoint")]
        raise BackendError(
            "--precision int8 needs an export folder with an int8 ONNX encoder, or a checkpoint with the graph "
            "cache on (not --no-graph-cache) and onnxruntime installed, on the CPU"
        )
    out = []
    if gpu_ok and has_engine and probe.tensorrt and probe.cuda:
        out.append(("tensorrt", cfg.device, "TensorRT engine and a CUDA GPU"))
    if gpu_ok and has_onnx and ort_gpu:
        out.append(("onnxruntime", cfg.device, "ONNX export and onnxruntime with a GPU provider"))
    if gpu_ok and ckpt is not None and probe.cuda:
        out.append(("torch", cfg.device, "checkpoint and a CUDA GPU"))
    if has_onnx and probe.ort_providers:
        out.append(("onnxruntime", "cpu", "ONNX export on the CPU"))
    if cache_ok and cfg.precision in ("auto", "fp32"):
        out.append(("graph-cache", "cpu", "checkpoint on the CPU, through its cached ONNX Runtime graph"))
    if ckpt is not None:
        out.append(("torch", "cpu", "checkpoint on the CPU"))
    if not out:
        raise BackendError(
            f"nothing this machine can run at {cfg.model}: no {WEIGHTS_NAME} for torch and no usable export "
            "(ONNX needs onnxruntime, engines need tensorrt and a GPU)"
        )
    return out


def choose_backend(cfg: BackendConfig, probe: RuntimeProbe | None = None) -> tuple[str, str]:
    """(backend name, why) by the `auto` rule in this module's docstring."""
    name, _, why = backend_candidates(cfg, probe)[0]
    return name, why


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


def _graph_cache(cfg: BackendConfig) -> Backend:
    from .graph_cache import GraphCacheError, open_cached

    ckpt = checkpoint_of(cfg)
    if ckpt is None or cfg.graph_cache is None:
        raise GraphCacheError(f"{cfg.model}: the graph cache needs a checkpoint and a cache folder")
    return open_cached(cfg, ckpt)


def _onnx(cfg: BackendConfig) -> Backend:
    from .onnx_backend import OnnxBackend

    export = export_dir_of(cfg)
    if export is None and checkpoint_of(cfg) is not None and cfg.graph_cache is not None:
        return _graph_cache(cfg)  # --backend onnxruntime on a checkpoint: its cached graph
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
    "graph-cache": _graph_cache,
}


def register_backend(name: str, factory: Callable[[BackendConfig], Backend]) -> None:
    REGISTRY[name] = factory


def create_backend(cfg: BackendConfig, probe: RuntimeProbe | None = None) -> Backend:
    """The backend `cfg` names; with `auto`, the first candidate that loads (a failure is logged, and the
    next one is tried: an engine built for another GPU falls back to onnxruntime, and so on)."""
    check_model_path(cfg.model)
    if cfg.backend == "auto":
        probe = probe or RuntimeProbe()
        if cfg.cpu_flags is None:
            cfg = replace(cfg, cpu_flags=probe.cpu_flags)
    failures = []
    for name, device, why in backend_candidates(cfg, probe):
        if name not in REGISTRY:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(REGISTRY))}")
        try:
            backend = REGISTRY[name](replace(cfg, device=device))
        except BackendError as e:
            if cfg.backend != "auto":
                raise
            log.warning("auto: %s on %s (%s) failed: %s; trying the next backend", name, device, why, e)
            failures.append((name, device, str(e)))
            continue
        _explain(backend, cfg, why, failures)
        return backend
    raise BackendError(
        "no backend could be created: " + "; ".join(f"{n} on {d}: {e}" for n, d, e in failures)
    )


def _explain(backend: Backend, cfg: BackendConfig, why: str, failures: list[tuple[str, str, str]]) -> None:
    """Put `selection` on the backend (what was picked, why, on what CPU; /v1/info shows it) and log it."""
    from supmae_serve.common.system import cpu_features, cpu_name

    info = backend.info()
    picked = dict(getattr(backend, "selection", None) or {})
    reason = picked.pop("why", None) or (why if cfg.backend == "auto" else f"--backend {cfg.backend}")
    if failures:
        reason += " (" + "; ".join(f"{n} on {d} could not be used: {e}" for n, d, e in failures) + ")"
    cache = picked.pop("graph_cache", None)
    if cache is None:
        failed = next((e for n, _, e in failures if n == "graph-cache"), None)
        cache = (
            {"path": str(cfg.graph_cache), "status": "failed", "reason": failed}
            if failed
            else {"path": None, "status": "off (--no-graph-cache)"}
            if cfg.graph_cache is None
            else {"path": str(cfg.graph_cache), "status": "not used"}
        )
    flags = cfg.cpu_flags
    features = cpu_features(flags)
    selection = {
        "backend": info.name,
        "device": info.device,
        "precision": info.precision,
        "why": reason,
        "cpu": {"name": cpu_name(), "features": [f for f, on in features.items() if on]},
        "agreement": picked.pop("agreement", None),
        "graph_cache": cache,
        **picked,
    }
    try:
        backend.selection = selection
    except AttributeError:  # a backend class with __slots__: nothing to report on
        pass
    log.info(
        "serving through %s on %s (%s): %s; CPU %s (%s); graph cache: %s",
        info.name,
        info.device,
        info.precision,
        reason,
        selection["cpu"]["name"],
        ", ".join(selection["cpu"]["features"]) or "none of " + ", ".join(features),
        ", ".join(f"{k} {v}" for k, v in cache.items() if v is not None),
    )
