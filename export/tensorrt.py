"""TensorRT engines from the exported ONNX encoder, with the tensorrt Python API (TensorRT >= 10).

- Precision: fp16 (and bf16 where the GPU has it: compute capability >= 8.0), with normalisation
  layers (and the reductions around them) kept in fp32. fp16 LayerNorm overflow is a known ViT failure:
  the variance of wide activations exceeds fp16's range. On TensorRT 10.x this is done with precision
  constraints on a weakly typed network; TensorRT 11 removed those flags, so there we build a strongly
  typed network from `encoder.fp16.onnx`, whose LayerNorms the fp16 conversion already kept in fp32
  (bf16 then needs a bf16 ONNX graph, which we do not write: a clear error says so).
- Optimisation profile: min/opt/max batch for the "images" input (the image size is fixed).
- Timing cache: loaded before and saved after the build, so rebuilding on the same GPU is fast.
- Engine files are named by what they were built for, `encoder.fp16.sm90.trt10.7.0.plan`, so a server
  never loads an engine built for another GPU architecture or TensorRT version (`engine_matches`).

tensorrt is imported only inside `import_tensorrt`; without it the error names `pip install 'supmae[gpu]'`.
Everything that does not need a GPU (precision decisions, profiles, names, the build sequence) takes the
tensorrt module as an argument, so it is unit-tested with a fake module on any machine. `build_engines`
is the export's TensorRT stage: one engine per requested precision this GPU and TensorRT can build.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supmae_serve.common.optional import install_hint

from .onnx import ENCODER_INPUT, ExportError

INSTALL_HINT = install_hint("tensorrt")
PRECISIONS = ("fp16", "bf16", "fp32")


class TensorRTUnavailable(ExportError):
    """tensorrt is not installed, or there is no CUDA GPU to build for."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"building TensorRT engines needs the tensorrt package: {INSTALL_HINT}"
        ) from e
    return trt


# ---------------------------------------------------------------------------- naming
def arch_tag(capability: tuple[int, int]) -> str:
    """(9, 0) -> "sm90"."""
    major, minor = capability
    return f"sm{major}{minor}"


def engine_filename(kind: str, precision: str, capability: tuple[int, int], trt_version: str) -> str:
    """`encoder.fp16.sm90.trt10.7.0.plan`: what the engine computes and what it was built for."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return f"{kind}.{precision}.{arch_tag(capability)}.trt{trt_version}.plan"


def timing_cache_filename(capability: tuple[int, int], trt_version: str) -> str:
    return f"timing-cache.{arch_tag(capability)}.trt{trt_version}.bin"


_ENGINE_RE = re.compile(
    r"^(?P<kind>[a-z_]+)\.(?P<precision>[a-z0-9]+)\.sm(?P<cc>\d+)\.trt(?P<trt>[0-9.]+?)\.plan$"
)


@dataclass(frozen=True)
class EngineName:
    kind: str
    precision: str
    arch: str  # "sm90"
    trt_version: str


def parse_engine_filename(name: str) -> EngineName | None:
    m = _ENGINE_RE.match(Path(name).name)
    if m is None:
        return None
    return EngineName(m["kind"], m["precision"], f"sm{m['cc']}", m["trt"])


def engine_matches(name: str, capability: tuple[int, int], trt_version: str) -> bool:
    """Whether an engine file was built for this GPU architecture and this exact TensorRT version."""
    parsed = parse_engine_filename(name)
    return parsed is not None and parsed.arch == arch_tag(capability) and parsed.trt_version == trt_version


# ---------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Profile:
    """Batch sizes of the optimisation profile for "images" (N, 3, S, S)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"need 1 <= min <= opt <= max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def shapes(self, image_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        s = image_size
        return tuple((b, 3, s, s) for b in (self.min_batch, self.opt_batch, self.max_batch))  # type: ignore[return-value]


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    build: bool
    mode: str = ""  # "weak" (builder flags + layer constraints) | "strong" (types from the ONNX graph)
    onnx: str = ""  # which ONNX file to parse
    reason: str = ""  # why not, when build is False


def supports_weak_typing(trt) -> bool:
    """TensorRT 10.x has BuilderFlag.FP16/BF16 + precision constraints; TensorRT 11 removed them."""
    flags = getattr(trt, "BuilderFlag", None)
    return flags is not None and hasattr(flags, "FP16") and hasattr(flags, "OBEY_PRECISION_CONSTRAINTS")


def plan_precisions(
    requested: list[str],
    capability: tuple[int, int],
    trt,
    fp32_onnx: str = "encoder.onnx",
    fp16_onnx: str | None = "encoder.fp16.onnx",
) -> list[PrecisionPlan]:
    """Decide, per requested precision, whether and how to build it on this GPU and TensorRT."""
    weak = supports_weak_typing(trt)
    plans = []
    for p in requested:
        if p not in PRECISIONS:
            raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {p!r}")
        if p == "fp32":
            plans.append(PrecisionPlan(p, True, "weak" if weak else "strong", fp32_onnx))
        elif p == "fp16":
            if capability < (5, 3):
                plans.append(PrecisionPlan(p, False, reason=f"{arch_tag(capability)} has no fp16 arithmetic"))
            elif weak:
                plans.append(PrecisionPlan(p, True, "weak", fp32_onnx))
            elif fp16_onnx:
                plans.append(PrecisionPlan(p, True, "strong", fp16_onnx))
            else:
                plans.append(
                    PrecisionPlan(p, False, reason="strongly typed TensorRT needs encoder.fp16.onnx")
                )
        else:  # bf16
            if capability < (8, 0):
                plans.append(
                    PrecisionPlan(
                        p,
                        False,
                        reason=f"bf16 needs compute capability >= 8.0, this GPU is {arch_tag(capability)}",
                    )
                )
            elif not weak:
                plans.append(
                    PrecisionPlan(
                        p,
                        False,
                        reason="this TensorRT only builds strongly typed networks; no bf16 ONNX graph is exported",
                    )
                )
            elif not hasattr(trt.BuilderFlag, "BF16"):
                plans.append(
                    PrecisionPlan(p, False, reason=f"TensorRT {trt.__version__} has no bf16 builder flag")
                )
            else:
                plans.append(PrecisionPlan(p, True, "weak", fp32_onnx))
    return plans


# ---------------------------------------------------------------------------- building
@dataclass
class BuildConfig:
    precision: str = "fp16"
    profile: Profile = field(default_factory=Profile)
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    builder_optimization_level: int = 3  # TensorRT's default; 5 searches longer for faster kernels


@dataclass
class BuildReport:
    engine: Path
    precision: str
    mode: str
    fp32_layers: list[str]  # layers pinned to fp32 (normalisation and its reductions)
    timing_cache: Path | None
    timing_cache_hit: bool  # a previous cache was loaded


_FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE")


def keep_norms_fp32(trt, network) -> list[str]:
    """Pin normalisation layers (and reductions, which is what a decomposed LayerNorm becomes) to fp32."""
    wanted = {getattr(trt.LayerType, t) for t in _FP32_LAYER_TYPES if hasattr(trt.LayerType, t)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            if hasattr(layer, "compute_precision"):  # INormalizationLayer (TensorRT >= 8.6)
                layer.compute_precision = trt.float32
            pinned.append(layer.name)
    return pinned


def build_engine(
    trt,
    onnx_path: str | Path,
    engine_path: str | Path,
    image_size: int,
    config: BuildConfig,
    mode: str,
    logger=None,
) -> BuildReport:
    """Parse `onnx_path`, build a serialized engine for `config`, write it and the timing cache."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if mode == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ExportError(
            f"{onnx_path}: TensorRT cannot parse this ONNX file: " + "; ".join(errors or ["unknown error"])
        )

    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if hasattr(bc, "builder_optimization_level"):
        bc.builder_optimization_level = config.builder_optimization_level
    pinned: list[str] = []
    if mode == "weak" and config.precision in ("fp16", "bf16"):
        bc.set_flag(trt.BuilderFlag.FP16 if config.precision == "fp16" else trt.BuilderFlag.BF16)
        bc.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = keep_norms_fp32(trt, network)

    profile = builder.create_optimization_profile()
    lo, opt, hi = config.profile.shapes(image_size)
    profile.set_shape(ENCODER_INPUT, lo, opt, hi)
    bc.add_optimization_profile(profile)

    cache_hit = False
    cache_bytes = b""
    if config.timing_cache is not None and Path(config.timing_cache).exists():
        cache_bytes = Path(config.timing_cache).read_bytes()
        cache_hit = len(cache_bytes) > 0
    cache = bc.create_timing_cache(cache_bytes)
    bc.set_timing_cache(cache, False)  # ignore_mismatch=False: a foreign cache is not used

    serialized = builder.build_serialized_network(network, bc)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build a {config.precision} engine from {onnx_path} (see the TensorRT log above)"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if config.timing_cache is not None:
        Path(config.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(config.timing_cache).write_bytes(bytes(bc.get_timing_cache().serialize()))
    return BuildReport(engine_path, config.precision, mode, pinned, config.timing_cache, cache_hit)


@dataclass
class BuiltEngine:
    path: Path
    precision: str
    details: dict[str, Any]  # the manifest entry's "tensorrt" field: what it was built for and how


def build_engines(
    folder: Path,
    fp32_onnx: str,
    fp16_onnx: str | None,
    image_size: int,
    precisions: Sequence[str],
    build: BuildConfig,
    log: Callable[[str], None],
) -> Iterator[BuiltEngine]:
    """Build one engine per precision this GPU and TensorRT can build from the ONNX files in `folder`
    (`plan_precisions`); the others are logged with the reason. The timing cache defaults to one in
    `folder` named by GPU and version. Engines are yielded as they are built, so the caller can check
    each before the next (minutes-long) build; raises TensorRTUnavailable before the first."""
    trt = import_tensorrt()
    cc = cuda_capability()
    plans = plan_precisions(list(precisions), cc, trt, fp32_onnx, fp16_onnx)
    cache = build.timing_cache or folder / timing_cache_filename(cc, trt.__version__)
    for plan in plans:
        if not plan.build:
            log(f"      {plan.precision}: not built ({plan.reason})")
            continue
        engine = folder / engine_filename("encoder", plan.precision, cc, trt.__version__)
        config = replace(build, precision=plan.precision, timing_cache=cache)
        rep = build_engine(trt, folder / plan.onnx, engine, image_size, config, plan.mode)
        profile = config.profile
        yield BuiltEngine(
            engine,
            plan.precision,
            {
                "version": trt.__version__,
                "arch": arch_tag(cc),
                "mode": plan.mode,
                "built_from": plan.onnx,
                "profile": {"min": profile.min_batch, "opt": profile.opt_batch, "max": profile.max_batch},
                "fp32_layers": len(rep.fp32_layers),
                "timing_cache": str(cache),
                "timing_cache_reused": rep.timing_cache_hit,
            },
        )


def cuda_capability() -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("building TensorRT engines needs a CUDA GPU; none is visible to torch")
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- running (verification)
class EngineRunner:
    """Run a serialized engine on the GPU with torch tensors as buffers (verification and latency)."""

    def __init__(self, trt, path: str | Path):
        import torch

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ExportError(f"{path}: TensorRT cannot deserialize this engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        bufs = {}
        for n in self.inputs:
            t = torch.as_tensor(feeds[n]).to("cuda", self.dtypes[n]).contiguous()
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
            bufs[n] = t
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            bufs[n] = torch.empty(shape, dtype=self.dtypes[n], device="cuda")
            self.context.set_tensor_address(n, bufs[n].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        self.stream.synchronize()
        return {n: bufs[n].float().cpu().numpy() for n in self.outputs}


def _torch_dtype(trt, dtype):
    import torch

    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
    }
    for name, t in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return t
    return torch.float32
