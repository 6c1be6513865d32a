"""The export pipeline: checkpoint -> verified artefacts + manifest.json (what `supmae-export` runs).

Stages, each announced on one progress line:

    load checkpoint -> verification images -> torch reference
      -> encoder.onnx (fp32, portable) -> encoder.opt.onnx (ONNX Runtime fused) -> encoder.fp16.onnx
      -> encoder.int8.onnx (dynamic) [-> encoder.int8-static.onnx with --calib-data]
      -> reconstruct.onnx -> timm weights (--format timm) -> hf/ (--format hf: transformers ViTMAE)
      -> TensorRT engines (--tensorrt)
      -> Triton repository (--triton) -> latency -> manifest.json + a table

Every artefact is verified against the PyTorch model (export/verify.py). One that fails its
tolerance is listed under "failed" in the manifest, not under "artefacts", so a server reading the
manifest never picks it; the command then exits non-zero.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.files import sha256_file
from supmae_serve.common.optional import install_hint
from supmae_serve.common.versions import software_versions as common_versions
from supmae_serve.model import CheckpointError, ModelCard, SupMAE, load_checkpoint, load_model_card
from supmae_serve.model.masking import num_visible, seeded_keep_indices

from . import onnx as onnx_export
from .onnx import ExportError
from .quantize import QuantizeConfig
from .tensorrt import BuildConfig, Profile, TensorRTUnavailable
from .triton import TritonConfig
from .verify import (
    VerifyImages,
    VerifyResult,
    batch_plan,
    compare,
    load_verify_images,
    median_latency_ms,
    ort_runner,
    ort_session,
    run_in_chunks,
    torch_encoder_outputs,
)

MANIFEST_NAME = "manifest.json"
CARD_NAME = "model.json"
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
FORMATS = ("onnx", "timm", "hf")


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


@dataclass
class Record:
    """One artefact in the manifest."""

    file: str
    kind: str  # encoder | reconstruct | timm | hf
    precision: str
    format: str  # onnx | onnx-ort (ONNX Runtime contrib ops) | tensorrt-plan | timm-safetensors | hf-vitmae
    bytes: int = 0
    sha256: str = ""
    verify: dict[str, Any] | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verify is None or self.verify.get("passed") is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "kind": self.kind,
            "precision": self.precision,
            "format": self.format,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "verify": self.verify,
            "latency_ms": self.latency_ms,
            **self.details,
        }


@dataclass
class ExportResult:
    out: Path
    records: list[Record]
    skipped: list[dict[str, str]]  # requested but not built: {"artefact", "reason"}
    manifest: Path
    reference_latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if not r.passed]


# ---------------------------------------------------------------------------- helpers
def software_versions() -> dict[str, str]:
    """The versions an export depends on, the machine it was verified on and its GPU, if any."""
    versions = common_versions(["onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"], system=True)
    if "tensorrt" in sys.modules:  # only when this export built engines with it
        versions["tensorrt"] = sys.modules["tensorrt"].__version__
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


class Progress:
    """One line per stage on stderr: `[3/9] encoder.onnx ... ok (4.1 s)`."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.n, self.log = total, 0, log

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {name} ...")
        t0 = time.perf_counter()
        try:
            yield
        except Exception:
            self.log(f"[{self.n}/{self.total}] {name} failed after {time.perf_counter() - t0:.1f} s")
            raise
        self.log(f"[{self.n}/{self.total}] {name} done ({time.perf_counter() - t0:.1f} s)")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _record(out: Path, path: Path, kind: str, precision: str, fmt: str, **details) -> Record:
    files = [path] + (
        [path.with_name(path.name + ".data")] if path.with_name(path.name + ".data").exists() else []
    )
    rec = Record(
        file=str(path.relative_to(out)),
        kind=kind,
        precision=precision,
        format=fmt,
        bytes=sum(f.stat().st_size for f in files),
        sha256=sha256_file(path),
        details=details,
    )
    if len(files) > 1:
        rec.details["external_data"] = {"file": files[1].name, "sha256": sha256_file(files[1])}
    return rec


# ---------------------------------------------------------------------------- verification of one artefact
def verify_onnx_encoder(
    path: Path, card: ModelCard, images: VerifyImages, reference, precision: str, threads: int
) -> VerifyResult:
    model = onnx_export.load_onnx(path)
    onnx_export.check_encoder_io(model, card, str(path))
    plan = batch_plan(len(images.images))
    got = run_in_chunks(ort_runner(ort_session(path, threads)), {"images": images.images.numpy()}, plan)
    return compare(
        reference, got, precision, image_source=images.source, batch_sizes=plan, labels=images.labels
    )


def verify_onnx_reconstruct(
    path: Path, model: SupMAE, images: VerifyImages, threads: int, ratios: tuple[float, ...]
) -> VerifyResult:
    onnx_export.load_onnx(path)
    run = ort_runner(ort_session(path, threads))
    x = images.images
    seeds = list(range(len(x)))
    refs, gots = {}, {}
    plan = batch_plan(len(x))
    for ratio in ratios:
        ids = seeded_keep_indices(model.num_patches, ratio, seeds)  # (N, K): the one mask definition
        with torch.no_grad():
            r = model.reconstruct(x, mask_ratio=ratio, seed=seeds)
        ref = {k: getattr(r, k).float().numpy() for k in onnx_export.RECONSTRUCT_OUTPUTS}
        got = run_in_chunks(run, {"images": x.numpy(), "ids_keep": ids.numpy()}, plan)
        for k in ref:
            refs.setdefault(k, []).append(ref[k])
            gots.setdefault(k, []).append(got[k])
    ref = {k: np.concatenate(v) for k, v in refs.items()}
    got = {k: np.concatenate(v) for k, v in gots.items()}
    src = f"{images.source}; mask ratios {list(ratios)}, seeds 0..{len(x) - 1}"
    return compare(ref, got, "fp32", image_source=src, batch_sizes=plan, exact=("mask",))


def verify_timm(path: Path, card: ModelCard, images: VerifyImages, reference) -> tuple[VerifyResult, dict]:
    import timm

    from supmae_serve.model import timm_model_args

    name, kwargs = timm_model_args(card.config, card.variant)
    vit = timm.create_model(name, **timm_model_args(card.config, card.variant, file=path)[1]).eval()
    with torch.no_grad():
        tokens = vit.forward_features(images.images)  # (N, 1+L, D) after the final norm
        got = {
            "embedding": vit.forward_head(tokens, pre_logits=True).numpy(),
            "cls_token": tokens[:, 0].numpy(),
            "patch_tokens": tokens[:, vit.num_prefix_tokens :].numpy(),
        }
        if card.config.framework == "finetuned":
            got["logits"] = vit.forward_head(tokens).numpy()
    ref = {k: v for k, v in reference.items() if k in got}
    res = compare(ref, got, "fp32", image_source=images.source, labels=images.labels)
    return res, {"model_name": name, "kwargs": kwargs}


def verify_hf(folder: Path, card: ModelCard, images: VerifyImages, reference) -> VerifyResult:
    """Load the Hugging Face folder with transformers and compare its encoder's tokens (every patch, in
    order: mask ratio 0 and noise = arange) with the torch model's."""
    try:
        import transformers
    except ImportError as e:
        raise ExportError(
            f"checking the Hugging Face folder needs transformers: {install_hint('transformers')} (or --no-verify)"
        ) from e
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(folder, mask_ratio=0.0).eval()
    encoder = model.vit if arch == "ViTMAEForPreTraining" else model
    n, length = len(images.images), card.config.num_patches
    with torch.no_grad():
        tokens = encoder(images.images, noise=torch.arange(float(length)).expand(n, length)).last_hidden_state
    got = {"cls_token": tokens[:, 0].numpy(), "patch_tokens": tokens[:, 1:].numpy()}
    return compare(
        {k: reference[k] for k in got}, got, "fp32", image_source=images.source, labels=images.labels
    )


# ---------------------------------------------------------------------------- the pipeline
@torch.no_grad()  # scoped: the caller's grad mode is restored on return
def run_export(cfg: ExportConfig, log: Callable[[str], None] = _stderr) -> ExportResult:
    """Run every requested stage; raises CheckpointError/ExportError for bad inputs."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    do_onnx = "onnx" in cfg.formats or cfg.tensorrt or cfg.triton is not None
    int8 = "int8" in cfg.precisions
    onnx_stages = 2 + cfg.optimize + ("fp16" in cfg.precisions) + int8 + (int8 and cfg.calib_data is not None)
    n_stages = 3 + (onnx_stages if do_onnx else 0)  # load, images, reference; encoder + reconstruct
    n_stages += ("timm" in cfg.formats) + ("hf" in cfg.formats) + cfg.tensorrt + (cfg.triton is not None)
    n_stages += cfg.latency
    progress = Progress(n_stages, log)
    records: list[Record] = []
    skipped: list[dict[str, str]] = []

    with progress.stage(f"load checkpoint {cfg.checkpoint}"):
        model, card = load_checkpoint(cfg.checkpoint)
        model.eval()
        if "hf" in cfg.formats:
            from supmae_serve.model.hf import check_hf_exportable

            check_hf_exportable(card.config)  # before any artefact is written
        (out / CARD_NAME).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    with progress.stage("verification images"):
        n_calib = cfg.calib_images if (cfg.calib_data is not None and "int8" in cfg.precisions) else 0
        pool = load_verify_images(card, cfg.verify_images + n_calib, cfg.calib_data, cfg.seed)
        k = min(cfg.verify_images, len(pool.images))
        images = VerifyImages(pool.images[:k], None if pool.labels is None else pool.labels[:k], pool.source)
        calib = pool.images[k:] if len(pool.images) > k else pool.images  # disjoint when the folder allows
        log(f"      {len(images.images)} verification images: {images.source}")
    with progress.stage("torch reference outputs"):
        reference = torch_encoder_outputs(model, images.images)

    def check(rec: Record, fn: Callable[[], VerifyResult]) -> None:
        if not cfg.verify:
            rec.verify = {"skipped": True, "passed": None}
            return
        res = fn()
        rec.verify = res.to_dict()
        log(f"      {rec.file}: {'PASS' if res.passed else 'FAIL'} {res.summary()}")
        for f in res.failures:
            log(f"      {rec.file}: {f}")

    paths: dict[str, Path] = {}
    if do_onnx:
        fp32 = out / "encoder.onnx"
        with progress.stage("encoder.onnx (fp32, standard ONNX ops)"):
            info = onnx_export.export_encoder(model, card, fp32, cfg.opset)
            rec = _record(out, fp32, "encoder", "fp32", "onnx", exporter=info.exporter, opset=info.opset)
            check(rec, lambda: verify_onnx_encoder(fp32, card, images, reference, "fp32", cfg.threads))
            paths["fp32"] = fp32
        encoder_records = [rec]
        if cfg.optimize:
            opt = out / "encoder.opt.onnx"
            with progress.stage("encoder.opt.onnx (ONNX Runtime graph optimisation)"):
                from .optimize import optimize_encoder

                report = optimize_encoder(fp32, opt, card.config.num_heads, card.config.embed_dim)
                log(
                    f"      fused: {report.fused_ops}"
                    + (f"; unfused: {report.skipped}" if report.skipped else "")
                )
                rec = _record(
                    out,
                    opt,
                    "encoder",
                    "fp32",
                    "onnx-ort",
                    optimized_from=fp32.name,
                    fused_ops=report.fused_ops,
                )
                check(rec, lambda: verify_onnx_encoder(opt, card, images, reference, "fp32", cfg.threads))
                paths["opt"] = opt
                # ONNX Runtime on the CPU runs the fused graph faster: list it first so a server picks it
                encoder_records.insert(0, rec)
        if "fp16" in cfg.precisions:
            half = out / "encoder.fp16.onnx"
            with progress.stage("encoder.fp16.onnx (fp16 compute, fp32 IO and LayerNorm)"):
                onnx_export.convert_fp16(fp32, half)
                rec = _record(
                    out,
                    half,
                    "encoder",
                    "fp16",
                    "onnx",
                    converted_from=fp32.name,
                    fp32_ops=list(onnx_export.FP16_KEEP_FP32_OPS),
                    io_dtype="float32",
                )
                check(rec, lambda: verify_onnx_encoder(half, card, images, reference, "fp16", cfg.threads))
                paths["fp16"] = half
                encoder_records.append(rec)
        if "int8" in cfg.precisions:
            from .quantize import quantize_dynamic_int8, quantize_static_int8

            src = paths.get("opt", fp32)
            q8 = out / "encoder.int8.onnx"
            with progress.stage("encoder.int8.onnx (dynamic INT8)"):
                rep = quantize_dynamic_int8(src, q8, cfg.quantize)
                rec = _record(
                    out,
                    q8,
                    "encoder",
                    "int8-dynamic",
                    "onnx-ort" if src != fp32 else "onnx",
                    quantized_from=src.name,
                    quantization=_quant_details(rep, cfg.quantize),
                )
                check(
                    rec, lambda: verify_onnx_encoder(q8, card, images, reference, "int8-dynamic", cfg.threads)
                )
                encoder_records.append(rec)
            if cfg.calib_data is not None:
                qs = out / "encoder.int8-static.onnx"
                with progress.stage(
                    f"encoder.int8-static.onnx (static INT8, {len(calib)} calibration images)"
                ):
                    rep = quantize_static_int8(fp32, qs, calib.numpy(), cfg.quantize)
                    rec = _record(
                        out,
                        qs,
                        "encoder",
                        "int8-static",
                        "onnx",
                        quantized_from=fp32.name,
                        quantization=_quant_details(rep, cfg.quantize)
                        | {"calibration_data": str(cfg.calib_data)},
                    )
                    check(
                        rec,
                        lambda: verify_onnx_encoder(qs, card, images, reference, "int8-static", cfg.threads),
                    )
                    encoder_records.append(rec)
        records += encoder_records
        if cfg.reconstruct and card.capabilities["reconstruct"]:
            rpath = out / "reconstruct.onnx"
            with progress.stage("reconstruct.onnx (images, ids_keep -> reconstruction)"):
                info = onnx_export.export_reconstruct(model, card, rpath, cfg.opset)
                rec = _record(
                    out, rpath, "reconstruct", "fp32", "onnx", exporter=info.exporter, opset=info.opset
                )
                ratios = tuple(dict.fromkeys((card.config.mask_ratio, 0.5)))
                k = {r: num_visible(model.num_patches, r) for r in ratios}
                rec.details["mask"] = {
                    "definition": "supmae_serve.model.masking.seeded_keep_indices",
                    "keep_for_ratio": k,
                }
                check(rec, lambda: verify_onnx_reconstruct(rpath, model, images, cfg.threads, ratios))
                records.append(rec)
                paths["reconstruct"] = rpath
        else:
            progress.n += 1  # the stage is counted; say why it is skipped
            why = "the model has no decoder" if not card.capabilities["reconstruct"] else "--no-reconstruct"
            log(f"[{progress.n}/{progress.total}] reconstruct.onnx skipped: {why}")

    if "timm" in cfg.formats:
        tpath = out / "encoder.timm.safetensors"
        with progress.stage("encoder.timm.safetensors (timm weights)"):
            from supmae_serve.model import save_timm, timm_model_args

            save_timm(model, tpath)
            name, kwargs = timm_model_args(card.config, card.variant)
            rec = _record(
                out, tpath, "timm", "fp32", "timm-safetensors", timm={"model_name": name, "kwargs": kwargs}
            )
            check(rec, lambda: verify_timm(tpath, card, images, reference)[0])
            records.append(rec)

    if "hf" in cfg.formats:
        hf_dir = out / "hf"
        with progress.stage("hf/ (Hugging Face transformers ViTMAE folder)"):
            from supmae_serve.model.hf import save_hf

            save_hf(model, hf_dir)
            arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
            rec = _record(out, hf_dir / "model.safetensors", "hf", "fp32", "hf-vitmae", architecture=arch)
            check(rec, lambda: verify_hf(hf_dir, card, images, reference))
            records.append(rec)

    engine_for_triton = None
    if cfg.tensorrt:
        with progress.stage("TensorRT engines"):
            try:
                built = _build_tensorrt(cfg, card, paths, images, reference, log)
                for rec in built:
                    records.append(rec)
                engine_for_triton = next((out / r.file for r in built if r.passed), None)
            except TensorRTUnavailable as e:
                skipped.append({"artefact": "tensorrt", "reason": str(e)})
                log(f"      skipped: {e}")

    if cfg.triton is not None:
        with progress.stage(f"Triton model repository {cfg.triton}"):
            from .triton import write_model_repository

            models = write_model_repository(
                cfg.triton,
                paths["fp32"],
                TritonConfig(
                    name=cfg.triton_name,
                    max_batch_size=cfg.profile.max_batch,
                    preferred_batch_sizes=_preferred(cfg.profile),
                ),
                class_names=_class_names(card) if card.capabilities["classify"] else None,
                reconstruct_onnx=paths.get("reconstruct"),
                engine=engine_for_triton,
                engine_max_batch=cfg.profile.max_batch,
            )
            log("      models: " + ", ".join(f"{m.name} ({m.platform})" for m in models))

    reference_latency: dict[str, float] = {}
    if cfg.latency:
        with progress.stage(f"latency at batch {', '.join(map(str, cfg.latency_batches))}"):
            reference_latency = _measure_latency(cfg, model, card, records)

    manifest = _write_manifest(cfg, card, records, skipped, images, reference_latency)
    return ExportResult(out, records, skipped, manifest, reference_latency)


def _class_names(card: ModelCard) -> list[str]:
    return (
        list(card.class_names) if card.class_names else [f"class_{i}" for i in range(card.config.num_classes)]
    )


def _preferred(profile: Profile) -> tuple[int, ...]:
    return tuple(sorted({profile.opt_batch, profile.max_batch}))


def _quant_details(rep, qc: QuantizeConfig) -> dict[str, Any]:
    return {
        "method": rep.method,
        "per_channel": qc.per_channel,
        "reduce_range": qc.reduce_range if rep.method == "dynamic" else True,
        "weight_type": "int8",
        "activation_type": "uint8",
        "format": "QOperator (dynamic)" if rep.method == "dynamic" else "QDQ",
        "excluded_nodes": rep.excluded,
        "quantized_nodes": rep.quantized_nodes,
        "calibration_images": rep.calibration_images,
    }


def _build_tensorrt(cfg: ExportConfig, card: ModelCard, paths, images, reference, log) -> list[Record]:
    from .tensorrt import (
        EngineRunner,
        build_engine,
        cuda_capability,
        engine_filename,
        import_tensorrt,
        plan_precisions,
        timing_cache_filename,
    )

    trt = import_tensorrt()
    cc = cuda_capability()
    plans = plan_precisions(
        list(cfg.trt_precisions), cc, trt, paths["fp32"].name, paths.get("fp16", Path("")).name or None
    )
    cache = cfg.timing_cache or cfg.out / timing_cache_filename(cc, trt.__version__)
    records = []
    for plan in plans:
        if not plan.build:
            log(f"      {plan.precision}: not built ({plan.reason})")
            continue
        engine = cfg.out / engine_filename("encoder", plan.precision, cc, trt.__version__)
        rep = build_engine(
            trt,
            cfg.out / plan.onnx,
            engine,
            card.preprocessing.image_size,
            BuildConfig(plan.precision, cfg.profile, int(cfg.workspace_gb * (1 << 30)), cache),
            plan.mode,
        )
        rec = _record(
            cfg.out,
            engine,
            "encoder",
            plan.precision,
            "tensorrt-plan",
            tensorrt={
                "version": trt.__version__,
                "arch": f"sm{cc[0]}{cc[1]}",
                "mode": plan.mode,
                "built_from": plan.onnx,
                "profile": {
                    "min": cfg.profile.min_batch,
                    "opt": cfg.profile.opt_batch,
                    "max": cfg.profile.max_batch,
                },
                "fp32_layers": len(rep.fp32_layers),
                "timing_cache": str(cache),
                "timing_cache_reused": rep.timing_cache_hit,
            },
        )
        tol_precision = plan.precision

        def verify_engine(engine=engine, tol_precision=tol_precision) -> VerifyResult:
            runner = EngineRunner(trt, engine)
            plan_ = batch_plan(len(images.images), tuple(min(b, cfg.profile.max_batch) for b in (1, 3, 17)))
            got = run_in_chunks(runner, {"images": images.images.numpy()}, plan_)
            return compare(
                reference,
                got,
                tol_precision,
                image_source=images.source,
                batch_sizes=plan_,
                labels=images.labels,
            )

        if not cfg.verify:
            rec.verify = {"skipped": True, "passed": None}
        else:
            res = verify_engine()
            rec.verify = res.to_dict()
            log(f"      {rec.file}: {'PASS' if res.passed else 'FAIL'} {res.summary()}")
        records.append(rec)
    return records


def _measure_latency(
    cfg: ExportConfig, model: SupMAE, card: ModelCard, records: list[Record]
) -> dict[str, float]:
    """Median wall time per batch size: the torch model (returned) and each artefact (into its record)."""
    s = card.preprocessing.image_size
    rng = np.random.default_rng(0)

    def images(b: int) -> np.ndarray:
        return rng.standard_normal((b, 3, s, s)).astype(np.float32)

    def timed(
        run: Callable[[dict[str, np.ndarray]], object], feeds: Callable[[int], dict]
    ) -> dict[str, float]:
        out = {}
        for b in cfg.latency_batches:
            f = feeds(b)
            out[str(b)] = median_latency_ms(lambda f=f: run(f))
        return out

    with torch.inference_mode():
        reference = timed(
            lambda f: model.forward_features(torch.from_numpy(f["images"])), lambda b: {"images": images(b)}
        )
    ratio = card.config.mask_ratio
    for rec in records:
        path = cfg.out / rec.file
        if rec.format.startswith("onnx") and rec.kind == "encoder":
            sess = ort_session(path, cfg.threads)
            rec.latency_ms = timed(lambda f, sess=sess: sess.run(None, f), lambda b: {"images": images(b)})
        elif rec.format.startswith("onnx") and rec.kind == "reconstruct":
            sess = ort_session(path, cfg.threads)
            rec.latency_ms = timed(
                lambda f, sess=sess: sess.run(None, f),
                lambda b: {
                    "images": images(b),
                    "ids_keep": seeded_keep_indices(model.num_patches, ratio, list(range(b))).numpy(),
                },
            )
        elif rec.format == "tensorrt-plan":
            from .tensorrt import EngineRunner, import_tensorrt

            runner = EngineRunner(import_tensorrt(), path)
            fits = [b for b in cfg.latency_batches if b <= cfg.profile.max_batch]
            for b in fits:
                f = {"images": images(b)}
                rec.latency_ms[str(b)] = median_latency_ms(lambda f=f, runner=runner: runner(f))
    return reference


def _write_manifest(cfg, card, records, skipped, images, reference_latency) -> Path:
    manifest = {
        "format_version": 1,
        "artefacts": [r.to_dict() for r in records if r.passed],
        "failed": [r.to_dict() for r in records if not r.passed],
        "skipped": skipped,
        "model": {
            "variant": card.variant,
            "framework": card.framework,
            "capabilities": card.capabilities,
            "card": CARD_NAME,
        },
        "source": {
            "checkpoint": str(cfg.checkpoint),
            "weights_sha256": _weights_sha(cfg.checkpoint),
        },
        "verification": {"images": len(images.images), "image_source": images.source, "enabled": cfg.verify},
        "reference_latency_ms": {"torch-eager-fp32": reference_latency} if reference_latency else {},
        "versions": software_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = cfg.out / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


def _weights_sha(checkpoint: Path) -> str | None:
    p = Path(checkpoint)
    w = (
        p / "model.safetensors"
        if p.is_dir()
        else p.with_name("model.safetensors")
        if p.suffix == ".json"
        else p
    )
    return sha256_file(w) if w.exists() else None


# ---------------------------------------------------------------------------- re-verifying a folder
def verify_existing(cfg: ExportConfig, log: Callable[[str], None] = _stderr) -> ExportResult:
    """Check an export folder against its checkpoint: files unchanged (sha256), loadable, the same model,
    and still within tolerance. Nothing is rewritten."""
    out = cfg.out
    mpath = out / MANIFEST_NAME
    if not mpath.exists():
        raise ExportError(f"{out}: no {MANIFEST_NAME}; not a supmae-export folder")
    try:
        manifest = json.loads(mpath.read_text())
        entries = manifest["artefacts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{mpath}: malformed manifest ({e})") from e
    progress = Progress(3 + len(entries), log)
    with progress.stage(f"load checkpoint {cfg.checkpoint}"):
        model, card = load_checkpoint(cfg.checkpoint)
        exported = load_model_card(out / CARD_NAME)
        _same_model(card, exported, cfg.checkpoint, out)
    with progress.stage("verification images"):
        images = load_verify_images(card, cfg.verify_images, cfg.calib_data, cfg.seed)
    with progress.stage("torch reference outputs"):
        reference = torch_encoder_outputs(model, images.images)
    records = []
    for e in entries:
        path = out / e["file"]
        with progress.stage(f"check {e['file']}"):
            if not path.exists():
                raise ExportError(f"{path}: listed in the manifest but missing")
            size = path.stat().st_size + (
                path.with_name(path.name + ".data").stat().st_size
                if path.with_name(path.name + ".data").exists()
                else 0
            )
            if size != e.get("bytes", size) or sha256_file(path) != e.get("sha256", ""):
                raise ExportError(
                    f"{path}: changed since export ({size} bytes, manifest says {e.get('bytes')}; sha256 differs): "
                    "truncated, corrupted or replaced; re-export it"
                )
            rec = Record(
                e["file"], e["kind"], e["precision"], e.get("format", "onnx"), size, e.get("sha256", "")
            )
            if rec.format.startswith("onnx") and rec.kind == "encoder":
                res = verify_onnx_encoder(path, card, images, reference, rec.precision, cfg.threads)
            elif rec.format.startswith("onnx") and rec.kind == "reconstruct":
                res = verify_onnx_reconstruct(path, model, images, cfg.threads, (card.config.mask_ratio,))
            elif rec.kind == "timm":
                res = verify_timm(path, card, images, reference)[0]
            elif rec.kind == "hf":
                res = verify_hf(path.parent, card, images, reference)
            else:
                log(f"      {rec.file}: {rec.format} is checked by hash only on this machine")
                records.append(rec)
                continue
            rec.verify = res.to_dict()
            log(f"      {rec.file}: {'PASS' if res.passed else 'FAIL'} {res.summary()}")
            records.append(rec)
    return ExportResult(out, records, [], mpath)


def _same_model(card: ModelCard, exported: ModelCard, ck: Path, out: Path) -> None:
    diffs = []
    a, b = card.config.to_dict(), exported.config.to_dict()
    diffs += [f"{k}: checkpoint {a[k]!r} vs export {b.get(k)!r}" for k in a if a[k] != b.get(k)]
    if card.class_names != exported.class_names:
        diffs.append("class_names differ")
    if card.preprocessing != exported.preprocessing:
        diffs.append(f"preprocessing: checkpoint {card.preprocessing} vs export {exported.preprocessing}")
    if diffs:
        raise CheckpointError(f"{out} was exported from a different model than {ck}: " + "; ".join(diffs[:6]))


# ---------------------------------------------------------------------------- the table
def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(result: ExportResult, batches: tuple[int, ...] = (1, 32)) -> str:
    header = ["artefact", "size", "precision", "parity (max rel err / min cosine / top-1 agree)", "status"]
    header += [f"ms @ b{b}" for b in batches]
    rows = []
    if result.reference_latency_ms:
        rows.append(
            ["torch eager (reference)", "-", "fp32", "-", "-"]
            + [_ms(result.reference_latency_ms.get(str(b))) for b in batches]
        )
    for r in result.records:
        v = r.verify or {}
        if v.get("skipped"):
            parity, status = "not verified (--no-verify)", "-"
        elif "max_rel_err" in v:
            parity = f"{v['max_rel_err']:.1e} / {v['cosine_min']:.5f}"
            parity += (
                f" / {100 * v['top1_agreement']:.1f}%" if v.get("top1_agreement") is not None else " / -"
            )
            if v.get("exact"):
                parity += " (mask exact)" if all(v["exact"].values()) else " (mask differs)"
            status = "PASS" if v.get("passed") else "FAIL"
        else:
            parity, status = "hash checked", "-"
        rows.append(
            [r.file, _size(r.bytes), r.precision, parity, status]
            + [_ms(r.latency_ms.get(str(b))) for b in batches]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
