"""The export pipeline: checkpoint -> verified artefacts + manifest.json (what `supmae-export` runs).

A request runs the `STAGES` it enables, in order, each announced on one progress line
(`[4/14] encoder.onnx (fp32, standard ONNX ops) ...`), so the count is the length of that list:

    load checkpoint -> verification images -> torch reference
      -> encoder.onnx (fp32, portable) -> encoder.opt.onnx (ONNX Runtime fused) -> encoder.fp16.onnx
      -> encoder.int8.onnx (dynamic) [-> encoder.int8-static.onnx with --calib-data]
      -> reconstruct.onnx -> timm weights (--format timm) -> hf/ (--format hf: transformers ViTMAE)
      -> TensorRT engines (--tensorrt)
      -> Triton repository (--triton) -> latency -> manifest.json + a table

A stage is a name, `enabled(config, card)` and `run(context) -> records`: the first three fill the
`ExportContext` (model, verification images, torch's outputs on them) that the later ones build on and
check against, as torchtitan's trainer runs its list of model converters and big_vision its list of
evaluators. Every artefact is verified against the PyTorch model (export/verify.py). One that fails its
tolerance is listed under "failed" in the manifest (export/report.py), not under "artefacts", so a
server reading the manifest never picks it; the command then exits non-zero. `verify_existing`
(--verify-only) runs the same loop over one check stage per manifest entry.

A new artefact: a function `(context) -> [Record]` that writes and verifies its file, and a `Stage` in
`STAGES` after the stages whose files it builds on.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.files import atomic_write_text, sha256_file
from supmae_serve.model import CheckpointError, ModelCard, SupMAE, load_checkpoint, load_model_card
from supmae_serve.model.masking import num_visible

from . import onnx as onnx_export
from .onnx import ExportError
from .quantize import QuantizeConfig
from .report import (
    CARD_NAME,
    MANIFEST_NAME,
    ExportResult,
    Record,
    artefact_files,
    file_record,
    measure_latency,
    write_manifest,
)
from .tensorrt import BuildConfig, Profile, TensorRTUnavailable
from .triton import TritonConfig
from .verify import (
    VerifyImages,
    VerifyResult,
    load_verify_images,
    torch_encoder_outputs,
    verify_engine,
    verify_hf,
    verify_onnx_encoder,
    verify_onnx_reconstruct,
    verify_timm,
)

ONNX_PRECISIONS = ("fp32", "fp16", "int8")
FORMATS = ("onnx", "timm", "hf")

# names other packages import from here (the CLI, the serving graph cache, tests)
__all__ = [
    "CARD_NAME",
    "FORMATS",
    "MANIFEST_NAME",
    "ONNX_PRECISIONS",
    "STAGES",
    "ExportConfig",
    "ExportContext",
    "ExportResult",
    "Record",
    "Stage",
    "enabled_stages",
    "run_stages",
    "run_export",
    "sha256_file",
    "verify_existing",
    "verify_onnx_encoder",
]


@dataclass
class ExportConfig:
    """Everything `supmae-export` was asked to do; built once by the CLI and passed inward."""

    checkpoint: Path
    out: Path
    formats: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] = ONNX_PRECISIONS  # int8 = dynamic, plus static when calib_data is given
    optimize: bool = True  # write encoder.opt.onnx (ONNX Runtime fusions)
    reconstruct: bool = True  # write reconstruct.onnx when the model has a decoder
    opset: int = onnx_export.DEFAULT_OPSET
    calib_data: Path | None = None
    calib_images: int = 64
    verify: bool = True
    verify_images: int = 32
    latency: bool = True
    latency_batches: tuple[int, ...] = (1, 32)
    threads: int = 0  # onnxruntime intra-op threads for verification and latency (0: its default)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    tensorrt: bool = False
    trt_precisions: tuple[str, ...] = ("fp16", "bf16")
    profile: Profile = field(default_factory=Profile)
    timing_cache: Path | None = None
    workspace_gb: float = 4.0
    triton: Path | None = None
    triton_name: str = "supmae"
    seed: int = 0

    def __post_init__(self) -> None:
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"format must be one or more of {FORMATS}, got {list(self.formats)}")
        bad = [p for p in self.precisions if p not in ONNX_PRECISIONS]
        if bad:
            raise ValueError(f"ONNX precision must be among {ONNX_PRECISIONS}, got {bad}")
        if "fp32" not in self.precisions:
            self.precisions = ("fp32", *self.precisions)  # every other artefact derives from it
        if self.verify_images < 1 or self.calib_images < 1:
            raise ValueError("--verify-images and --calib-images must be >= 1")

    @property
    def writes_onnx(self) -> bool:
        """encoder.onnx is written for --format onnx and for everything built from it (TensorRT, Triton)."""
        return "onnx" in self.formats or self.tensorrt or self.triton is not None

    @property
    def static_int8(self) -> bool:
        """Static INT8 needs calibration images; without --calib-data only dynamic INT8 is written."""
        return "int8" in self.precisions and self.calib_data is not None


@dataclass
class ExportContext:
    """What the stages share: the request, and what each stage made for the ones after it."""

    cfg: ExportConfig
    log: Callable[[str], None]
    # each set by the stage its comment names, for the stages after it
    card: ModelCard | None = None  # read before the stages (they depend on it); load checkpoint
    model: SupMAE | None = None  # load checkpoint
    images: VerifyImages | None = None  # verification images: what every artefact is checked on
    calib: torch.Tensor | None = None  # verification images: static INT8's calibration set, (N, 3, S, S)
    reference: dict[str, np.ndarray] | None = None  # torch reference outputs on `images`
    onnx: dict[str, Path] = field(default_factory=dict)  # "fp32", "opt", "fp16", "reconstruct" -> file
    records: list[Record] = field(default_factory=list)  # every artefact so far, in the order written
    skipped: list[dict[str, str]] = field(default_factory=list)  # requested but not buildable here
    reference_latency: dict[str, float] = field(default_factory=dict)

    def check(self, rec: Record, verify: Callable[[], VerifyResult]) -> Record:
        """Verify one artefact against torch (unless --no-verify) and put the verdict into its record."""
        if not self.cfg.verify:
            rec.verify = {"skipped": True, "passed": None}
        else:
            self.set_verdict(rec, verify())
        return rec

    def set_verdict(self, rec: Record, res: VerifyResult) -> None:
        rec.verify = res.to_dict()
        self.log(f"      {rec.file}: {'PASS' if res.passed else 'FAIL'} {res.summary()}")
        for f in res.failures:
            self.log(f"      {rec.file}: {f}")


@dataclass(frozen=True)
class Stage:
    """One step of the export: its progress line, whether a request needs it, and what it does.

    `skip` is for a stage a request asked for that this model cannot do (reconstruct.onnx for a model
    without a decoder): it is counted and says why on its own line, instead of silently vanishing."""

    name: str  # the artefact or step, first on its progress line
    enabled: Callable[[ExportConfig, ModelCard], bool]
    run: Callable[[ExportContext], list[Record]]
    about: str | Callable[[ExportContext], str] = ""  # the rest of the progress line
    skip: Callable[[ExportConfig, ModelCard], str | None] | None = None  # why not, for this model

    def line(self, ctx: ExportContext) -> str:
        about = self.about(ctx) if callable(self.about) else self.about
        return f"{self.name} {about}" if about else self.name


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- stages: the model and its reference
def _load_checkpoint(ctx: ExportContext) -> list[Record]:
    cfg = ctx.cfg
    ctx.model, ctx.card = load_checkpoint(cfg.checkpoint)
    if "hf" in cfg.formats:
        from supmae_serve.model.hf import check_hf_exportable

        check_hf_exportable(ctx.card.config)  # before any artefact is written
    atomic_write_text(cfg.out / CARD_NAME, json.dumps(ctx.card.to_dict(), indent=2) + "\n")
    return []


def _verification_images(ctx: ExportContext) -> list[Record]:
    """One sample serves both: the first `verify_images` check every artefact, the rest calibrate
    static INT8, so the two sets are disjoint whenever the folder has enough images."""
    cfg = ctx.cfg
    n_calib = cfg.calib_images if cfg.static_int8 else 0
    pool = load_verify_images(ctx.card, cfg.verify_images + n_calib, cfg.calib_data, cfg.seed)
    k = min(cfg.verify_images, len(pool.images))
    ctx.images = VerifyImages(pool.images[:k], None if pool.labels is None else pool.labels[:k], pool.source)
    ctx.calib = pool.images[k:] if len(pool.images) > k else pool.images
    ctx.log(f"      {len(ctx.images.images)} verification images: {ctx.images.source}")
    return []


def _torch_reference(ctx: ExportContext) -> list[Record]:
    ctx.reference = torch_encoder_outputs(ctx.model, ctx.images.images)
    return []


# ---------------------------------------------------------------------------- stages: ONNX
def _encoder_record(ctx: ExportContext, path: Path, precision: str, fmt: str, **details) -> list[Record]:
    """The record of one ONNX encoder, checked against torch under `precision`'s tolerance."""
    cfg = ctx.cfg
    rec = file_record(cfg.out, path, "encoder", precision, fmt, **details)
    check = partial(verify_onnx_encoder, path, ctx.card, ctx.images, ctx.reference, precision, cfg.threads)
    return [ctx.check(rec, check)]


def _encoder_fp32(ctx: ExportContext) -> list[Record]:
    path = ctx.onnx["fp32"] = ctx.cfg.out / "encoder.onnx"
    info = onnx_export.export_encoder(ctx.model, ctx.card, path, ctx.cfg.opset)
    return _encoder_record(ctx, path, "fp32", "onnx", exporter=info.exporter, opset=info.opset)


def _encoder_optimized(ctx: ExportContext) -> list[Record]:
    from .optimize import optimize_encoder

    src, path = ctx.onnx["fp32"], ctx.cfg.out / "encoder.opt.onnx"
    report = optimize_encoder(src, path, ctx.card.config.num_heads, ctx.card.config.embed_dim)
    ctx.log(f"      fused: {report.fused_ops}" + (f"; unfused: {report.skipped}" if report.skipped else ""))
    ctx.onnx["opt"] = path
    return _encoder_record(ctx, path, "fp32", "onnx-ort", optimized_from=src.name, fused_ops=report.fused_ops)


def _encoder_fp16(ctx: ExportContext) -> list[Record]:
    src, path = ctx.onnx["fp32"], ctx.cfg.out / "encoder.fp16.onnx"
    onnx_export.convert_fp16(src, path)
    ctx.onnx["fp16"] = path
    details = {"converted_from": src.name, "fp32_ops": list(onnx_export.FP16_KEEP_FP32_OPS)}
    return _encoder_record(ctx, path, "fp16", "onnx", **details, io_dtype="float32")


def _encoder_int8_dynamic(ctx: ExportContext) -> list[Record]:
    """From the fused graph when there is one: its Attention becomes ONNX Runtime's QAttention."""
    from .quantize import quantize_dynamic_int8

    cfg = ctx.cfg
    fp32 = ctx.onnx["fp32"]
    src, path = ctx.onnx.get("opt", fp32), cfg.out / "encoder.int8.onnx"
    rep = quantize_dynamic_int8(src, path, cfg.quantize)
    fmt = "onnx-ort" if src != fp32 else "onnx"
    quantization = rep.describe(cfg.quantize)
    return _encoder_record(ctx, path, "int8-dynamic", fmt, quantized_from=src.name, quantization=quantization)


def _encoder_int8_static(ctx: ExportContext) -> list[Record]:
    """From the plain graph: the calibrator needs standard ops to observe activation ranges."""
    from .quantize import quantize_static_int8

    cfg = ctx.cfg
    src, path = ctx.onnx["fp32"], cfg.out / "encoder.int8-static.onnx"
    rep = quantize_static_int8(src, path, ctx.calib.numpy(), cfg.quantize)
    quantization = rep.describe(cfg.quantize) | {"calibration_data": str(cfg.calib_data)}
    return _encoder_record(
        ctx, path, "int8-static", "onnx", quantized_from=src.name, quantization=quantization
    )


def _reconstruct_skipped(cfg: ExportConfig, card: ModelCard) -> str | None:
    if not card.capabilities["reconstruct"]:
        return "the model has no decoder"
    return None if cfg.reconstruct else "--no-reconstruct"


def _reconstruct(ctx: ExportContext) -> list[Record]:
    """Checked at the model's own mask ratio and at 0.5, so a graph that only works for one K fails."""
    cfg, model = ctx.cfg, ctx.model
    path = ctx.onnx["reconstruct"] = cfg.out / "reconstruct.onnx"
    info = onnx_export.export_reconstruct(model, ctx.card, path, cfg.opset)
    rec = file_record(cfg.out, path, "reconstruct", "fp32", "onnx", exporter=info.exporter, opset=info.opset)
    ratios = tuple(dict.fromkeys((ctx.card.config.mask_ratio, 0.5)))
    rec.details["mask"] = {
        "definition": "supmae_serve.model.masking.seeded_keep_indices",
        "keep_for_ratio": {r: num_visible(model.num_patches, r) for r in ratios},
    }
    return [ctx.check(rec, partial(verify_onnx_reconstruct, path, model, ctx.images, cfg.threads, ratios))]


# ---------------------------------------------------------------------------- stages: other formats
def _timm_weights(ctx: ExportContext) -> list[Record]:
    from supmae_serve.model import save_timm, timm_model_args

    card, path = ctx.card, ctx.cfg.out / "encoder.timm.safetensors"
    save_timm(ctx.model, path)
    name, kwargs = timm_model_args(card.config, card.variant)
    rec = file_record(
        ctx.cfg.out, path, "timm", "fp32", "timm-safetensors", timm={"model_name": name, "kwargs": kwargs}
    )
    return [ctx.check(rec, lambda: verify_timm(path, card, ctx.images, ctx.reference)[0])]


def _hf_folder(ctx: ExportContext) -> list[Record]:
    from supmae_serve.model.hf import save_hf

    folder = ctx.cfg.out / "hf"
    save_hf(ctx.model, folder)
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    rec = file_record(ctx.cfg.out, folder / "model.safetensors", "hf", "fp32", "hf-vitmae", architecture=arch)
    return [ctx.check(rec, partial(verify_hf, folder, ctx.card, ctx.images, ctx.reference))]


def _tensorrt_engines(ctx: ExportContext) -> list[Record]:
    """Each engine is checked as soon as it is built; without tensorrt or a GPU the stage is recorded
    under "skipped" with the reason (exit 3) and the rest of the export goes on."""
    from .tensorrt import build_engines

    cfg = ctx.cfg
    fp16 = ctx.onnx.get("fp16")
    build = BuildConfig(
        profile=cfg.profile, workspace_bytes=int(cfg.workspace_gb * (1 << 30)), timing_cache=cfg.timing_cache
    )
    engines = build_engines(
        cfg.out,
        ctx.onnx["fp32"].name,
        fp16.name if fp16 else None,
        ctx.card.preprocessing.image_size,
        cfg.trt_precisions,
        build,
        ctx.log,
    )
    records = []
    try:
        for engine in engines:
            rec = file_record(
                cfg.out, engine.path, "encoder", engine.precision, "tensorrt-plan", tensorrt=engine.details
            )
            check = partial(
                verify_engine, engine.path, ctx.images, ctx.reference, engine.precision, cfg.profile.max_batch
            )
            records.append(ctx.check(rec, check))
    except TensorRTUnavailable as e:
        ctx.skipped.append({"artefact": "tensorrt", "reason": str(e)})
        ctx.log(f"      skipped: {e}")
    return records


def _triton_repository(ctx: ExportContext) -> list[Record]:
    """The portable encoder.onnx, reconstruct.onnx and the first engine that passed its check."""
    from .triton import write_model_repository

    cfg, card = ctx.cfg, ctx.card
    engine = next((cfg.out / r.file for r in ctx.records if r.format == "tensorrt-plan" and r.passed), None)
    classes = (
        list(card.class_names) if card.class_names else [f"class_{i}" for i in range(card.config.num_classes)]
    )
    models = write_model_repository(
        cfg.triton,
        ctx.onnx["fp32"],
        TritonConfig(
            name=cfg.triton_name,
            max_batch_size=cfg.profile.max_batch,
            preferred_batch_sizes=tuple(sorted({cfg.profile.opt_batch, cfg.profile.max_batch})),
        ),
        class_names=classes if card.capabilities["classify"] else None,
        reconstruct_onnx=ctx.onnx.get("reconstruct"),
        engine=engine,
        engine_max_batch=cfg.profile.max_batch,
    )
    ctx.log("      models: " + ", ".join(f"{m.name} ({m.platform})" for m in models))
    return []


def _latency(ctx: ExportContext) -> list[Record]:
    cfg = ctx.cfg
    ctx.reference_latency = measure_latency(
        ctx.model, ctx.card, ctx.records, cfg.out, cfg.latency_batches, cfg.threads, cfg.profile.max_batch
    )
    return []


# ---------------------------------------------------------------------------- the stage list
def _always(cfg: ExportConfig, card: ModelCard) -> bool:
    return True


def _checkpoint(ctx: ExportContext) -> str:
    return str(ctx.cfg.checkpoint)


_TORCH_REFERENCE = Stage("torch reference outputs", _always, _torch_reference)  # export and --verify-only

STAGES: tuple[Stage, ...] = (
    Stage("load checkpoint", _always, _load_checkpoint, _checkpoint),
    Stage("verification images", _always, _verification_images),
    _TORCH_REFERENCE,
    Stage("encoder.onnx", lambda cfg, card: cfg.writes_onnx, _encoder_fp32, "(fp32, standard ONNX ops)"),
    Stage(
        "encoder.opt.onnx",
        lambda cfg, card: cfg.writes_onnx and cfg.optimize,
        _encoder_optimized,
        "(ONNX Runtime graph optimisation)",
    ),
    Stage(
        "encoder.fp16.onnx",
        lambda cfg, card: cfg.writes_onnx and "fp16" in cfg.precisions,
        _encoder_fp16,
        "(fp16 compute, fp32 IO and LayerNorm)",
    ),
    Stage(
        "encoder.int8.onnx",
        lambda cfg, card: cfg.writes_onnx and "int8" in cfg.precisions,
        _encoder_int8_dynamic,
        "(dynamic INT8)",
    ),
    Stage(
        "encoder.int8-static.onnx",
        lambda cfg, card: cfg.writes_onnx and cfg.static_int8,
        _encoder_int8_static,
        lambda ctx: f"(static INT8, {len(ctx.calib)} calibration images)",
    ),
    Stage(
        "reconstruct.onnx",
        lambda cfg, card: cfg.writes_onnx,
        _reconstruct,
        "(images, ids_keep -> reconstruction)",
        skip=_reconstruct_skipped,
    ),
    Stage(
        "encoder.timm.safetensors", lambda cfg, card: "timm" in cfg.formats, _timm_weights, "(timm weights)"
    ),
    Stage(
        "hf/", lambda cfg, card: "hf" in cfg.formats, _hf_folder, "(Hugging Face transformers ViTMAE folder)"
    ),
    Stage("TensorRT engines", lambda cfg, card: cfg.tensorrt, _tensorrt_engines),
    Stage(
        "Triton model repository",
        lambda cfg, card: cfg.triton is not None,
        _triton_repository,
        lambda ctx: str(ctx.cfg.triton),
    ),
    Stage(
        "latency",
        lambda cfg, card: cfg.latency,
        _latency,
        lambda ctx: "at batch " + ", ".join(map(str, ctx.cfg.latency_batches)),
    ),
)


def enabled_stages(cfg: ExportConfig, card: ModelCard) -> list[Stage]:
    """The stages `run_export` runs for this request and model, in order."""
    return [s for s in STAGES if s.enabled(cfg, card)]


def run_stages(stages: list[Stage], ctx: ExportContext) -> None:
    """Each stage between a `[i/n] ... ` line and a `done (seconds)` or `failed after` line."""
    n = len(stages)
    for i, stage in enumerate(stages, start=1):
        why = stage.skip(ctx.cfg, ctx.card) if stage.skip else None
        if why:
            ctx.log(f"[{i}/{n}] {stage.name} skipped: {why}")
            continue
        line = f"[{i}/{n}] {stage.line(ctx)}"
        ctx.log(f"{line} ...")
        t0 = time.perf_counter()
        try:
            ctx.records += stage.run(ctx)
        except Exception:
            ctx.log(f"{line} failed after {time.perf_counter() - t0:.1f} s")
            raise
        ctx.log(f"{line} done ({time.perf_counter() - t0:.1f} s)")


def _preferred_first(records: list[Record]) -> list[Record]:
    """A server takes the first artefact that fits (docs/deployment.md), and ONNX Runtime on the CPU
    runs the fused graph faster than encoder.onnx: list it first. The order is otherwise kept."""
    return sorted(records, key=lambda r: r.kind != "encoder" or "optimized_from" not in r.details)


# ---------------------------------------------------------------------------- the pipeline
@torch.no_grad()  # scoped: the caller's grad mode is restored on return
def run_export(cfg: ExportConfig, log: Callable[[str], None] = _stderr) -> ExportResult:
    """Run every stage the request enables; raises CheckpointError/ExportError for bad inputs."""
    card = load_model_card(cfg.checkpoint)  # decides the stage list; the weights load in the first stage
    cfg.out.mkdir(parents=True, exist_ok=True)
    ctx = ExportContext(cfg, log, card=card)
    run_stages(enabled_stages(cfg, card), ctx)
    result = ExportResult(
        cfg.out, _preferred_first(ctx.records), ctx.skipped, cfg.out / MANIFEST_NAME, ctx.reference_latency
    )
    write_manifest(result, ctx.card, cfg.checkpoint, ctx.images, cfg.verify)
    return result


# ---------------------------------------------------------------------------- re-verifying a folder
def verify_existing(cfg: ExportConfig, log: Callable[[str], None] = _stderr) -> ExportResult:
    """Check an export folder against its checkpoint: files unchanged (sha256), loadable, the same model,
    and still within tolerance. Nothing is rewritten."""
    path = cfg.out / MANIFEST_NAME
    if not path.exists():
        raise ExportError(f"{cfg.out}: no {MANIFEST_NAME}; not a supmae-export folder")
    try:
        entries = json.loads(path.read_text())["artefacts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: malformed manifest ({e})") from e
    stages = [
        Stage("load checkpoint", _always, _load_same_model, _checkpoint),
        Stage("verification images", _always, _reverification_images),
        _TORCH_REFERENCE,
        *(Stage(f"check {e['file']}", _always, partial(_check_entry, e)) for e in entries),
    ]
    ctx = ExportContext(cfg, log)
    run_stages(stages, ctx)
    return ExportResult(cfg.out, ctx.records, [], path)


def _load_same_model(ctx: ExportContext) -> list[Record]:
    cfg = ctx.cfg
    ctx.model, ctx.card = load_checkpoint(cfg.checkpoint)
    exported = load_model_card(cfg.out / CARD_NAME)
    diffs = []
    a, b = ctx.card.config.to_dict(), exported.config.to_dict()
    diffs += [f"{k}: checkpoint {a[k]!r} vs export {b.get(k)!r}" for k in a if a[k] != b.get(k)]
    if ctx.card.class_names != exported.class_names:
        diffs.append("class_names differ")
    if ctx.card.preprocessing != exported.preprocessing:
        diffs.append(f"preprocessing: checkpoint {ctx.card.preprocessing} vs export {exported.preprocessing}")
    if diffs:
        raise CheckpointError(
            f"{cfg.out} was exported from a different model than {cfg.checkpoint}: " + "; ".join(diffs[:6])
        )
    return []


def _reverification_images(ctx: ExportContext) -> list[Record]:
    cfg = ctx.cfg
    ctx.images = load_verify_images(ctx.card, cfg.verify_images, cfg.calib_data, cfg.seed)
    return []


def _check_entry(entry: dict[str, Any], ctx: ExportContext) -> list[Record]:
    """One manifest entry: unchanged since export (size and sha256), then its parity check again where
    this machine can run it (a TensorRT engine is checked by hash only: it belongs to one GPU)."""
    cfg, card, images, reference = ctx.cfg, ctx.card, ctx.images, ctx.reference
    path = cfg.out / entry["file"]
    if not path.exists():
        raise ExportError(f"{path}: listed in the manifest but missing")
    size = sum(f.stat().st_size for f in artefact_files(path))
    if size != entry.get("bytes", size) or sha256_file(path) != entry.get("sha256", ""):
        raise ExportError(
            f"{path}: changed since export ({size} bytes, manifest says {entry.get('bytes')}; sha256 differs): "
            "truncated, corrupted or replaced; re-export it"
        )
    rec = Record(
        entry["file"],
        entry["kind"],
        entry["precision"],
        entry.get("format", "onnx"),
        size,
        entry.get("sha256", ""),
    )
    onnx = rec.format.startswith("onnx")
    if onnx and rec.kind == "encoder":
        res = verify_onnx_encoder(path, card, images, reference, rec.precision, cfg.threads)
    elif onnx and rec.kind == "reconstruct":
        res = verify_onnx_reconstruct(path, ctx.model, images, cfg.threads, (card.config.mask_ratio,))
    elif rec.kind == "timm":
        res = verify_timm(path, card, images, reference)[0]
    elif rec.kind == "hf":
        res = verify_hf(path.parent, card, images, reference)
    else:
        ctx.log(f"      {rec.file}: {rec.format} is checked by hash only on this machine")
        return [rec]
    ctx.set_verdict(rec, res)
    return [rec]
