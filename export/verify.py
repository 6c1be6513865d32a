"""Proof that an artefact computes what the PyTorch model computes.

Every artefact runs on the same images as the PyTorch model (real images from `--calib-data`, else
generated natural-looking ones, both through `supmae_serve.preprocess`), in several batch sizes so the
dynamic batch axis is exercised, and each output is compared:

    max_abs_err   max |artefact - torch|
    max_rel_err   max |artefact - torch| / max |torch|   (relative to the output's range: robust near 0)
    cosine_min    the smallest cosine similarity between matching rows (per image, per token)
    top1_agreement  fraction of images whose arg-max class agrees (classifying models)
    accuracy      top-1 accuracy of torch and the artefact when the images carry labels

against a `Tolerance` chosen by precision. The worst value over all outputs decides. One function per
kind of artefact runs it and does the comparison (`verify_onnx_encoder`, `verify_onnx_reconstruct`,
`verify_timm`, `verify_hf`, `verify_engine`): the export's stages and `--verify-only` call the same ones.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from supmae_serve.common.files import DataError, scan_images
from supmae_serve.common.optional import install_hint
from supmae_serve.model import ModelCard, SupMAE
from supmae_serve.model.masking import seeded_keep_indices
from supmae_serve.preprocess import ImageError, batch, decode_image

from .onnx import ENCODER_OUTPUTS, RECONSTRUCT_OUTPUTS, ExportError, check_encoder_io, load_onnx


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float
    cosine_min: float
    top1_min: float  # minimum top-1 agreement (classifying models only)

    def to_dict(self) -> dict:
        return asdict(self)


# Chosen from measurements (docs/deployment.md): fp32 differs only by summation order; fp16 keeps
# LayerNorm in fp32 and loses ~3 decimal digits; int8 changes individual features by a few percent but
# keeps their direction (cosine) and the predicted class.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_err=1e-3, cosine_min=0.99999, top1_min=0.99),
    "fp16": Tolerance(max_rel_err=2e-2, cosine_min=0.999, top1_min=0.97),
    "bf16": Tolerance(max_rel_err=6e-2, cosine_min=0.995, top1_min=0.95),
    "int8-dynamic": Tolerance(max_rel_err=0.1, cosine_min=0.99, top1_min=0.95),
    "int8-static": Tolerance(max_rel_err=0.15, cosine_min=0.98, top1_min=0.90),
}


def tolerance_for(precision: str) -> Tolerance:
    if precision not in TOLERANCES:
        raise ValueError(f"no tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]


@dataclass
class OutputMetrics:
    max_abs_err: float
    max_rel_err: float
    cosine_min: float
    cosine_mean: float


@dataclass
class VerifyResult:
    precision: str
    tolerances: Tolerance
    images: int
    image_source: str
    batch_sizes: list[int]
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    top1_agreement: float | None = None
    accuracy: dict[str, float] | None = None  # {"torch": ..., "artefact": ...} when labels are known
    exact: dict[str, bool] = field(default_factory=dict)  # outputs that must match exactly (masks)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_err(self) -> float:
        return max((m.max_abs_err for m in self.outputs.values()), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((m.max_rel_err for m in self.outputs.values()), default=0.0)

    @property
    def cosine_min(self) -> float:
        return min((m.cosine_min for m in self.outputs.values()), default=1.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "cosine_min": self.cosine_min,
            "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy,
            "tolerances": self.tolerances.to_dict(),
            "images": self.images,
            "image_source": self.image_source,
            "batch_sizes": self.batch_sizes,
            "outputs": {k: asdict(v) for k, v in self.outputs.items()},
            "exact": self.exact,
            "failures": self.failures,
        }

    def summary(self) -> str:
        s = f"rel {self.max_rel_err:.1e} cos {self.cosine_min:.5f}"
        if self.top1_agreement is not None:
            s += f" top1 {100 * self.top1_agreement:.1f}%"
        return s


# ---------------------------------------------------------------------------- metrics
def output_metrics(ref: np.ndarray, got: np.ndarray) -> OutputMetrics:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ExportError(f"output shape {got.shape} differs from torch's {ref.shape}")
    diff = np.abs(ref - got)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    if not np.isfinite(got).all():
        return OutputMetrics(float("inf"), float("inf"), -1.0, -1.0)
    a = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref.reshape(1, -1)
    b = got.reshape(-1, got.shape[-1]) if got.ndim > 1 else got.reshape(1, -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-30))
    return OutputMetrics(max_abs, float(rel), float(cos.min()), float(cos.mean()))


def compare(
    ref: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    precision: str,
    *,
    image_source: str = "",
    batch_sizes: Sequence[int] = (),
    labels: np.ndarray | None = None,
    exact: Sequence[str] = (),
    tolerance: Tolerance | None = None,
) -> VerifyResult:
    """Compare artefact outputs `got` with torch's `ref` (same names) under the precision's tolerance."""
    tol = tolerance or tolerance_for(precision)
    n = len(next(iter(ref.values())))
    res = VerifyResult(precision, tol, n, image_source, list(batch_sizes))
    for name, r in ref.items():
        if name not in got:
            res.failures.append(f"output {name!r} missing from the artefact")
            continue
        if name in exact:
            same = r.shape == got[name].shape and bool(np.array_equal(r, got[name]))
            res.exact[name] = same
            if not same:
                res.failures.append(f"{name}: must equal torch's exactly and does not")
            continue
        m = output_metrics(r, got[name])
        res.outputs[name] = m
        if not m.max_rel_err <= tol.max_rel_err:
            res.failures.append(f"{name}: max_rel_err {m.max_rel_err:.3g} > {tol.max_rel_err:g}")
        if not m.cosine_min >= tol.cosine_min:
            res.failures.append(f"{name}: cosine_min {m.cosine_min:.6f} < {tol.cosine_min:g}")
    if "logits" in ref and "logits" in got:
        p_ref, p_got = ref["logits"].argmax(-1), got["logits"].argmax(-1)
        res.top1_agreement = float((p_ref == p_got).mean())
        if res.top1_agreement < tol.top1_min:
            res.failures.append(f"top-1 agreement {res.top1_agreement:.3f} < {tol.top1_min:g}")
        if labels is not None:
            res.accuracy = {
                "torch": float((p_ref == labels).mean()),
                "artefact": float((p_got == labels).mean()),
            }
    return res


# ---------------------------------------------------------------------------- images
@dataclass
class VerifyImages:
    images: torch.Tensor  # (N, 3, S, S) normalised
    labels: np.ndarray | None  # (N,) class indices in the model card's order, when known
    source: str  # what the images are, for the manifest


def generated_images(n: int, size: int, seed: int = 0) -> list:
    """Natural-looking test images: smooth colour gradients with overlapping blurred shapes and
    sensor-like noise. Real photographs are better (pass --calib-data); these exercise the same value
    ranges and spatial structure, which uniform noise does not."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    side = max(int(size * 1.15), 8)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:side, 0:side] / side
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = rng.uniform(-0.2, 0.9, 2) * side
            w, h = rng.uniform(0.1, 0.7, 2) * side
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = [x0, y0, x0 + w, y0 + h]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.5)) * side / 64))
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (side, side, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Calibration images: an ImageFolder -> (paths, labels, class names), or a flat folder -> (paths, None,
    None) (`supmae_serve.common.files.scan_images`, with export's error type)."""
    try:
        return scan_images(root)
    except DataError as e:
        raise ExportError(f"calibration data: {e}") from e


def load_verify_images(
    card: ModelCard, n: int, calib_data: str | Path | None = None, seed: int = 0
) -> VerifyImages:
    """`n` images through the model card's preprocessing: a seeded sample of `calib_data`, else generated.

    Labels are kept when the folder's class names are the model card's class names."""
    prep = card.preprocessing
    if calib_data is None:
        imgs = generated_images(n, prep.image_size, seed)
        return VerifyImages(batch(imgs, prep), None, f"{n} generated images (seed {seed})")
    paths, labels, classes = list_image_folder(calib_data)
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    picked = sorted(order[: min(n, len(paths))])
    decoded, kept = [], []
    for i in picked:
        try:
            decoded.append(decode_image(paths[i].read_bytes()))
            kept.append(i)
        except (ImageError, OSError):
            continue  # a bad file in a calibration folder is skipped, not fatal
    if not decoded:
        raise ExportError(f"{calib_data}: none of the sampled images could be decoded")
    y = None
    if labels is not None and card.class_names and classes == list(card.class_names):
        y = np.asarray([labels[i] for i in kept])
    return VerifyImages(
        batch(decoded, prep), y, f"{len(decoded)} images sampled from {calib_data} (seed {seed})"
    )


# ---------------------------------------------------------------------------- running
def batch_plan(n: int, sizes: Sequence[int] = (1, 3, 17)) -> list[int]:
    """Chunk sizes covering n images that use each of `sizes` once, then the largest for the rest."""
    plan, left = [], n
    for s in sizes:
        if left <= 0:
            break
        plan.append(min(s, left))
        left -= plan[-1]
    while left > 0:
        plan.append(min(max(sizes), left))
        left -= plan[-1]
    return plan


def run_in_chunks(
    fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: Mapping[str, np.ndarray],
    plan: Sequence[int],
) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}
    start = 0
    for size in plan:
        chunk = {k: v[start : start + size] for k, v in feeds.items()}
        for k, v in fn(chunk).items():
            if v.shape[0] != size:
                raise ExportError(f"output {k!r} has batch {v.shape[0]} for an input batch of {size}")
            outs.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
        start += size
    return {k: np.concatenate(v) for k, v in outs.items()}


@torch.no_grad()
def torch_encoder_outputs(model: SupMAE, images: torch.Tensor) -> dict[str, np.ndarray]:
    f = model.forward_features(images)
    out = {"embedding": f.embedding, "cls_token": f.cls_token, "patch_tokens": f.patch_tokens}
    if f.logits is not None:
        out["logits"] = f.logits
    return {k: v.float().numpy() for k, v in out.items() if k in ENCODER_OUTPUTS}


@torch.no_grad()
def torch_reconstruct_outputs(
    model: SupMAE, images: torch.Tensor, seeds: Sequence[int], mask_ratio: float | None = None
) -> dict[str, np.ndarray]:
    r = model.reconstruct(images, mask_ratio=mask_ratio, seed=list(seeds))
    return {k: getattr(r, k).float().numpy() for k in RECONSTRUCT_OUTPUTS}


def ort_session(path: str | Path, threads: int = 0, providers: Sequence[str] | None = None):
    """An onnxruntime session with a clear error for a file it cannot load."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot load this file ({str(e).strip()[:400]})") from e


def ort_runner(session) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def median_latency_ms(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, budget_s: float = 20.0
) -> float:
    """Median wall time of fn() in milliseconds (fewer repeats when one call is slow)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    if warmup and first * repeats > budget_s:
        repeats = max(1, int(budget_s / max(first, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


# ---------------------------------------------------------------------------- one artefact against torch
def _encoder_parity(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    images: VerifyImages,
    reference: Mapping[str, np.ndarray],
    precision: str,
    plan: Sequence[int],
) -> VerifyResult:
    got = run_in_chunks(run, {"images": images.images.numpy()}, plan)
    return compare(
        reference, got, precision, image_source=images.source, batch_sizes=plan, labels=images.labels
    )


def verify_onnx_encoder(
    path: Path,
    card: ModelCard,
    images: VerifyImages,
    reference: Mapping[str, np.ndarray],
    precision: str,
    threads: int,
) -> VerifyResult:
    """An ONNX encoder under onnxruntime's CPU provider: its inputs and outputs are the contract's
    (`check_encoder_io`), then every output is compared at batch sizes 1, 3, 17, ..."""
    check_encoder_io(load_onnx(path), card, str(path))
    run = ort_runner(ort_session(path, threads))
    return _encoder_parity(run, images, reference, precision, batch_plan(len(images.images)))


def verify_engine(
    path: Path, images: VerifyImages, reference: Mapping[str, np.ndarray], precision: str, max_batch: int
) -> VerifyResult:
    """A TensorRT engine on the GPU, at batch sizes 1, 3, 17 capped by its profile's largest batch."""
    from .tensorrt import EngineRunner, import_tensorrt

    runner = EngineRunner(import_tensorrt(), path)
    plan = batch_plan(len(images.images), tuple(min(b, max_batch) for b in (1, 3, 17)))
    return _encoder_parity(runner, images, reference, precision, plan)


def verify_onnx_reconstruct(
    path: Path, model: SupMAE, images: VerifyImages, threads: int, ratios: tuple[float, ...]
) -> VerifyResult:
    """The reconstruction graph against `model.reconstruct(seed=i)` at each mask ratio: the graph takes
    the kept patch indices as an input, drawn here by the one mask definition (`seeded_keep_indices`),
    so the masks must be bit-identical and the images within fp32 tolerance."""
    load_onnx(path)
    run = ort_runner(ort_session(path, threads))
    x = images.images
    seeds = list(range(len(x)))
    plan = batch_plan(len(x))
    refs: dict[str, list[np.ndarray]] = {}
    gots: dict[str, list[np.ndarray]] = {}
    for ratio in ratios:
        ids = seeded_keep_indices(model.num_patches, ratio, seeds)  # (N, K)
        ref = torch_reconstruct_outputs(model, x, seeds, mask_ratio=ratio)
        got = run_in_chunks(run, {"images": x.numpy(), "ids_keep": ids.numpy()}, plan)
        for k in ref:
            refs.setdefault(k, []).append(ref[k])
            gots.setdefault(k, []).append(got[k])
    ref = {k: np.concatenate(v) for k, v in refs.items()}
    got = {k: np.concatenate(v) for k, v in gots.items()}
    src = f"{images.source}; mask ratios {list(ratios)}, seeds 0..{len(x) - 1}"
    return compare(ref, got, "fp32", image_source=src, batch_sizes=plan, exact=("mask",))


def verify_timm(
    path: Path, card: ModelCard, images: VerifyImages, reference: Mapping[str, np.ndarray]
) -> tuple[VerifyResult, dict]:
    """timm's VisionTransformer loading `path` (a `save_timm` file) against the encoder's outputs;
    also returns the (model name, kwargs) that build it, for the manifest."""
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


def verify_hf(
    folder: Path, card: ModelCard, images: VerifyImages, reference: Mapping[str, np.ndarray]
) -> VerifyResult:
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


__all__ = [
    "TOLERANCES",
    "Tolerance",
    "VerifyImages",
    "VerifyResult",
    "batch_plan",
    "compare",
    "generated_images",
    "list_image_folder",
    "load_verify_images",
    "median_latency_ms",
    "ort_runner",
    "ort_session",
    "output_metrics",
    "run_in_chunks",
    "tolerance_for",
    "torch_encoder_outputs",
    "torch_reconstruct_outputs",
    "verify_engine",
    "verify_hf",
    "verify_onnx_encoder",
    "verify_onnx_reconstruct",
    "verify_timm",
]
