"""The graph cache: the ONNX Runtime graphs of a checkpoint, built on its first start and reused after.

With backend `auto` on the CPU and a checkpoint (no export folder), `supmae-serve` serves through ONNX
Runtime's fused fp32 graph (`encoder.opt.onnx`), which runs faster than torch eager there. The graphs are
made by the export's own pipeline (`export.pipeline.run_export`: the ONNX export, ONNX Runtime's fusions and
the parity check against the torch model), so an entry of the cache is a `supmae-export` folder:

    <root>/<key>/   model.json  manifest.json  encoder.onnx  encoder.opt.onnx  [encoder.int8*.onnx]
                    cache.json  (what the key was made of, the build time, the agreement figures)

- The key is a sha256 of the weights file, the model card, the software versions (torch, onnx, onnxscript,
  onnxruntime, supmae), the builder code (export/*.py, supmae_serve/model/*.py, preprocess.py and this
  file), the flavour ("fp32", or "int8" with the static INT8 graph) and the calibration folder's listing:
  a change to any of them is a new key, so a new build.
- A build runs in a temp folder beside the entry and is renamed into place (atomic); a per-key file lock
  makes concurrent starts build once (the others wait, then reuse). Every start checks each graph's size
  and sha256 against the manifest: a damaged or half-written entry is rebuilt.
- A build that fails, or a graph that does not match torch, raises `GraphCacheError` (a `BackendError`),
  and the `auto` rule serves the checkpoint through torch instead, saying why.
- The reconstruction demo runs through the checkpoint's torch model (`TorchReconstructRunner`): exporting
  reconstruct.onnx would double the first start (31 of 64 s for the bundled model on the 2-core dev CPU),
  for a path that serves single demo images, not throughput.
- Agreement figures (top-1 agreement with fp32, on calibration images): bf16 through torch, measured when
  the CPU has AMX bf16 (where it is worth running) and recorded in cache.json; the static INT8 graph's,
  measured by the export's parity check on images held out from its calibration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.files import DataError, atomic_write_text, scan_images, sha256_file
from supmae_serve.common.versions import package_versions
from supmae_serve.model import checkpoint_paths, load_checkpoint, load_model_card

from .base import BackendError

log = logging.getLogger("supmae.graph_cache")

CACHE_FILE = "cache.json"
CACHE_FORMAT = 1
CALIB_FOLDER = "calib"  # a checkpoint folder may ship its calibration images here (the bundled model does)
VERIFY_IMAGES_REAL = 250  # from a calibration folder: the parity check's images, and the agreement hold-out
VERIFY_IMAGES_GENERATED = 64  # without one: the export's generated images
CALIB_IMAGES = (
    250  # static INT8's calibration images (disjoint from the verification ones when there are enough)
)
BF16_MIN_AGREEMENT = 0.995  # bf16 is the `auto` precision on an AMX CPU from this top-1 agreement with fp32
INT8_MIN_AGREEMENT = 0.99  # --precision int8 is served from this top-1 agreement, refused below it
VERSIONED = ("torch", "onnx", "onnxscript", "onnxruntime")
FLAVOURS = ("fp32", "int8")


class GraphCacheError(BackendError):
    """The cached graph cannot be built, loaded or used here; the message says why."""


@dataclass(frozen=True)
class CacheRequest:
    checkpoint: Path  # a checkpoint folder or .safetensors file
    root: Path  # the cache folder
    flavour: str = "fp32"  # "fp32": the fused fp32 graph; "int8": also the static INT8 graph
    calib_data: Path | None = None  # --calib-data; else the checkpoint's calib/ folder, if any
    threads: int = 0  # onnxruntime threads for the parity check

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")

    @property
    def calibration(self) -> Path | None:
        return calibration_folder(self.checkpoint, self.calib_data)


@dataclass
class CacheEntry:
    folder: Path
    info: dict[str, Any]  # cache.json
    status: str  # "built" | "rebuilt" | "reused"
    seconds: float  # the build, or checking the entry and reusing it
    reason: str = ""  # why it was (re)built

    def describe(self) -> dict[str, Any]:
        out = {"path": str(self.folder), "status": self.status, "seconds": round(self.seconds, 2)}
        if self.reason:
            out["reason"] = self.reason
        if self.status != "built" and "build_seconds" in self.info:
            out["build_seconds"] = self.info["build_seconds"]
        return out


def calibration_folder(checkpoint: Path, calib_data: Path | None) -> Path | None:
    """--calib-data, else the `calib/` folder beside the checkpoint's weights, else None."""
    if calib_data is not None:
        return Path(calib_data)
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return folder / CALIB_FOLDER if (folder / CALIB_FOLDER).is_dir() else None


# ---------------------------------------------------------------------------- the key
@functools.cache
def builder_digest() -> str:
    """sha256 over the source of everything that shapes a built graph (the exporter, the model, the
    preprocessing and this module): editing any of it invalidates every entry."""
    import export

    roots = [Path(export.__file__).parent, Path(__file__).resolve().parents[1] / "model"]
    files = sorted(f for r in roots for f in r.glob("*.py"))
    files += [Path(__file__).resolve().parents[1] / "preprocess.py", Path(__file__).resolve()]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 of an image folder's listing (relative path, size, modification time) and nothing heavier."""
    try:
        paths, _, _ = scan_images(folder)
    except DataError as e:
        raise GraphCacheError(f"calibration data: {e}") from e
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(req: CacheRequest) -> tuple[str, dict[str, Any]]:
    """(key, what it was made of)."""
    from supmae_serve import __version__

    weights, card = checkpoint_paths(req.checkpoint)
    for f in (weights, card):
        if not f.is_file():
            raise GraphCacheError(
                f"{f}: missing; the graph cache builds from a checkpoint's weights and card"
            )
    calib = req.calibration
    parts = {
        "format": CACHE_FORMAT,
        "flavour": req.flavour,
        "weights_sha256": sha256_file(weights),
        "card_sha256": sha256_file(card),
        "versions": {"supmae": __version__, **package_versions(VERSIONED)},
        "builder_sha256": builder_digest(),
        "calibration": None if calib is None else {"folder": str(calib), "sha256": folder_digest(calib)},
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return key, parts


def entry_name(key: str, flavour: str) -> str:
    return f"{key[:24]}-{flavour}"


# ---------------------------------------------------------------------------- checking an entry
def check_entry(folder: Path, key: str) -> dict[str, Any]:
    """cache.json of a complete entry with this key whose graphs are the bytes the build wrote; else
    GraphCacheError saying what is wrong."""
    path = folder / CACHE_FILE
    if not path.is_file():
        raise GraphCacheError(f"{folder}: no {CACHE_FILE} (an unfinished or foreign folder)")
    try:
        info = json.loads(path.read_text())
        entries = json.loads((folder / "manifest.json").read_text())["artefacts"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise GraphCacheError(f"{folder}: unreadable {CACHE_FILE} or manifest.json ({e})") from e
    if info.get("key") != key:
        raise GraphCacheError(f"{folder}: built for another key")
    if not (folder / "model.json").is_file():
        raise GraphCacheError(f"{folder}: model.json missing")
    for e in entries:
        f = folder / e["file"]
        if not f.is_file():
            raise GraphCacheError(f"{f}: listed in the manifest but missing")
        data = f.with_name(f.name + ".data")
        size = f.stat().st_size + (data.stat().st_size if data.exists() else 0)
        if size != e.get("bytes") or sha256_file(f) != e.get("sha256"):
            raise GraphCacheError(
                f"{f}: {size} bytes, sha256 differs from the manifest (truncated or damaged)"
            )
    return info


# ---------------------------------------------------------------------------- building an entry
@contextlib.contextmanager
def _key_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock per entry, held while it is checked and built: a second process starting with the
    same checkpoint waits here and then reuses the first one's build. The kernel drops it if its holder dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps entries whole
        yield
        return
    with open(root / f".{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _OwnRecordsOnly(logging.Filter):
    """The exporter's libraries (onnx_ir, onnxruntime.transformers' fusions) log every pass at INFO: during
    a build the server's log keeps only their warnings, and the build's own progress lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("supmae")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    handlers, f = list(logging.getLogger().handlers), _OwnRecordsOnly()
    for h in handlers:
        h.addFilter(f)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(f)


def _record_figure(rec) -> dict[str, Any]:
    v = rec.verify or {}
    return {
        "top1": v.get("top1_agreement"),
        "images": v.get("images"),
        "source": v.get("image_source"),
        "cosine_min": v.get("cosine_min"),
        "accuracy": v.get("accuracy"),
        "passed_export_tolerance": rec.passed,
        "failures": v.get("failures", []),
        "file": rec.file,
    }


def build_entry(req: CacheRequest, key: str, parts: dict[str, Any], final: Path) -> dict[str, Any]:
    """Run the export pipeline into a temp folder, check its verdicts, write cache.json, rename into place."""
    from export.pipeline import ExportConfig, run_export

    calib = req.calibration
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=req.root))
    t0 = time.perf_counter()
    try:
        cfg = ExportConfig(
            checkpoint=req.checkpoint,
            out=tmp,
            formats=("onnx",),
            precisions=("fp32", "int8") if req.flavour == "int8" else ("fp32",),
            optimize=True,
            reconstruct=False,  # served through torch (module docstring)
            calib_data=calib,
            calib_images=CALIB_IMAGES,
            verify_images=VERIFY_IMAGES_REAL if calib else VERIFY_IMAGES_GENERATED,
            latency=False,
            threads=req.threads,
        )
        with _quiet_libraries():
            result = run_export(cfg, log=lambda line: log.info("graph cache: %s", line.strip()))
        fused = next((r for r in result.records if r.kind == "encoder" and r.format == "onnx-ort"), None)
        if fused is None or not fused.passed:
            why = "; ".join((fused.verify or {}).get("failures", [])) if fused else "it was not written"
            raise GraphCacheError(f"the fused fp32 graph does not match the torch model: {why}")
        agreement: dict[str, Any] = {}
        if req.flavour == "int8":
            static = next((r for r in result.records if r.precision == "int8-static"), None)
            if static is None:
                raise GraphCacheError("the static INT8 graph was not built (no calibration images?)")
            agreement["int8"] = _record_figure(static)
        info = {
            "key": key,
            **parts,
            "checkpoint": str(Path(req.checkpoint).resolve()),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "agreement": agreement,
        }
        atomic_write_text(tmp / CACHE_FILE, json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an entry is as readable as any folder made here
        if final.exists():  # a damaged entry (we hold its lock): replaced whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        return info
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_entry(req: CacheRequest) -> CacheEntry:
    """The entry for `req`: reused when it is whole, else built (or rebuilt) under the key's lock."""
    t0 = time.perf_counter()
    key, parts = cache_key(req)
    name = entry_name(key, req.flavour)
    final = req.root / name
    try:
        return CacheEntry(final, check_entry(final, key), "reused", time.perf_counter() - t0)
    except GraphCacheError as e:
        damage = str(e) if final.exists() else ""
    try:
        req.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraphCacheError(f"cannot create the graph cache folder {req.root}: {e}") from e
    with _key_lock(req.root, name):
        if final.exists():
            try:  # built by another process while this one waited for the lock
                return CacheEntry(final, check_entry(final, key), "reused", time.perf_counter() - t0)
            except GraphCacheError as e:
                damage = str(e)
        for stale in req.root.glob(
            f".build-{name}-*"
        ):  # left by a killed build (none runs: we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        status = "rebuilt" if damage else "built"
        reason = (
            f"the cached entry was damaged ({damage})"
            if damage
            else "no entry for this checkpoint, software and builder"
        )
        log.warning(
            "graph cache: building the ONNX Runtime graphs of %s into %s (%s); later starts reuse them",
            req.checkpoint,
            final,
            reason,
        )
        info = build_entry(req, key, parts, final)
    return CacheEntry(final, info, status, time.perf_counter() - t0, reason)


def update_info(entry: CacheEntry, **changes: Any) -> None:
    """Add figures measured after the build (bf16 on a CPU that came later) to cache.json."""
    entry.info.update(changes)
    atomic_write_text(entry.folder / CACHE_FILE, json.dumps(entry.info, indent=2) + "\n")


# ---------------------------------------------------------------------------- bf16 agreement
def measure_bf16(checkpoint: Path, calib: Path | None) -> dict[str, Any]:
    """Top-1 agreement of the checkpoint run in bf16 (weights and activations, as the torch backend serves
    it) with fp32, on the calibration images (the export's generated images without a folder)."""
    from export.verify import compare, load_verify_images, torch_encoder_outputs
    from supmae_serve.common.system import cpu_name

    card = load_model_card(checkpoint)
    if not card.capabilities["classify"]:
        return {"top1": None, "reason": "the model has no classification head: top-1 agreement needs one"}
    n = VERIFY_IMAGES_REAL if calib else VERIFY_IMAGES_GENERATED
    images = load_verify_images(card, n, calib, seed=0)
    fp32, _ = load_checkpoint(checkpoint)
    ref = torch_encoder_outputs(fp32, images.images)
    del fp32
    bf16, _ = load_checkpoint(checkpoint, dtype=torch.bfloat16)
    got = torch_encoder_outputs(bf16, images.images.to(torch.bfloat16))
    res = compare(ref, got, "bf16", image_source=images.source, labels=images.labels)
    return {
        "top1": res.top1_agreement,
        "images": res.images,
        "source": images.source,
        "cosine_min": res.cosine_min,
        "accuracy": res.accuracy,
        "measured_on": cpu_name(),
    }


# ---------------------------------------------------------------------------- reconstruction through torch
class TorchReconstructRunner:
    """A `GraphRunner` whose "graph" is the checkpoint's own `reconstruct_with_keep` (loaded on first use),
    so the ONNX Runtime backend serves /v1/reconstruct with the same mask and outputs as the torch one."""

    output_names = ["masked", "reconstruction", "pasted", "mask"]
    max_batch = None
    fixed_batch = False

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                self._model, _ = load_checkpoint(self.checkpoint)
        return self._model

    def preload(self) -> threading.Thread:
        """Load the model on a background thread (what warm-up calls): the server is ready without waiting
        for it (about 2 s for the bundled model), and a reconstruction that comes first waits for it."""
        thread = threading.Thread(target=self._load, name="supmae-reconstruct-load", daemon=True)
        thread.start()
        return thread

    @torch.inference_mode()
    def run(self, outputs: Sequence[str], feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        r = self._load().reconstruct_with_keep(feeds["images"].float(), feeds["ids_keep"])
        return {k: getattr(r, k).float().numpy() for k in outputs}


# ---------------------------------------------------------------------------- the backend it serves
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _int8_gate(figure: dict[str, Any] | None) -> tuple[float, int]:
    """(agreement, images) when the static INT8 graph may serve, else GraphCacheError with the figure."""
    if not figure or figure.get("top1") is None:
        raise GraphCacheError(
            "--precision int8 refused: its gate is the static INT8 graph's top-1 agreement with fp32, and this "
            "model has no classification head to measure it; serve fp32 (the default)"
        )
    top1, n = float(figure["top1"]), int(figure.get("images") or 0)
    if top1 < INT8_MIN_AGREEMENT or not figure.get("passed_export_tolerance", True):
        extra = "; " + "; ".join(figure["failures"]) if figure.get("failures") else ""
        raise GraphCacheError(
            f"--precision int8 refused: the static INT8 graph agrees with fp32 on {_pct(top1)} of {n} held-out "
            f"calibration images (top-1; needs >= {_pct(INT8_MIN_AGREEMENT)}){extra}; serve fp32 (the default) "
            "or calibrate with other images (--calib-data)"
        )
    return top1, n


def _why_not_bf16(amx: bool, figure: dict[str, Any]) -> str:
    if not amx:
        return "this CPU has no AMX bf16 tiles"
    if figure.get("top1") is None:
        return figure.get("reason", "its agreement with fp32 is unknown")
    return f"bf16 agrees with fp32 on only {_pct(figure['top1'])} (needs >= {_pct(BF16_MIN_AGREEMENT)})"


def _measure_bf16_into(entry: CacheEntry, req: CacheRequest) -> None:
    """bf16's agreement into the entry's cache.json; a failure to measure is recorded (fp32 then serves)."""
    agreement = entry.info["agreement"]
    try:
        agreement["bf16"] = measure_bf16(req.checkpoint, req.calibration)
    except Exception as e:  # noqa: BLE001 - bf16 is an optimisation: without a figure, fp32 serves
        log.warning("graph cache: could not measure bf16's agreement with fp32: %s", e)
        agreement["bf16"] = {"top1": None, "reason": f"measuring it failed ({type(e).__name__}: {e})"}
        return  # not recorded: the next start tries again
    try:
        update_info(entry)
    except OSError as e:
        log.warning("graph cache: could not record bf16's agreement in %s: %s", entry.folder, e)


def open_cached(cfg, checkpoint: Path):
    """The backend the graph cache gives for `cfg` (a registry `BackendConfig`, device cpu): the fused fp32
    graph under ONNX Runtime; the checkpoint in bf16 through torch on an AMX CPU where bf16 agrees with fp32;
    the static INT8 graph for --precision int8 when it passes its gate. Sets `backend.selection` (why, the
    agreement figures, the cache entry). Raises GraphCacheError (the `auto` rule then serves torch)."""
    from supmae_serve.common.system import cpu_features

    from .onnx_backend import OnnxBackend

    features = cpu_features(cfg.cpu_flags)
    int8 = cfg.precision == "int8"
    want_bf16 = cfg.precision == "auto" and features["amx_bf16"]
    req = CacheRequest(
        Path(checkpoint), Path(cfg.graph_cache), "int8" if int8 else "fp32", cfg.calib_data, cfg.threads
    )
    if int8 and req.calibration is None:
        raise GraphCacheError(
            "--precision int8 builds the static INT8 graph from the checkpoint and needs calibration images: "
            f"pass --calib-data DIR (an image folder like the model's inputs; labelled <class>/<image> folders "
            f"also give accuracy), or put them in {CALIB_FOLDER}/ beside the checkpoint"
        )
    try:
        entry = ensure_entry(req)
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - an exporter, quantiser or file-system failure: torch serves instead
        raise GraphCacheError(f"building the ONNX Runtime graph failed: {type(e).__name__}: {e}") from e
    agreement = entry.info.setdefault("agreement", {})
    if want_bf16 and "bf16" not in agreement:  # first start on this CPU (without AMX it is not measured)
        _measure_bf16_into(entry, req)
    reconstruct = TorchReconstructRunner(req.checkpoint)
    common = dict(device="cpu", threads=cfg.threads, max_batch_size=cfg.max_batch_size)
    bf16 = agreement.get("bf16") or {}
    if int8:
        top1, n = _int8_gate(agreement.get("int8"))
        backend = OnnxBackend(entry.folder, precision="int8-static", reconstruct_runner=reconstruct, **common)
        why = (
            f"--precision int8: the static INT8 graph agrees with fp32 on {_pct(top1)} of {n} held-out "
            f"calibration images (top-1, >= {_pct(INT8_MIN_AGREEMENT)})"
        )
    elif want_bf16 and (bf16.get("top1") or 0.0) >= BF16_MIN_AGREEMENT:
        from .torch_backend import TorchBackend

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        backend = TorchBackend(req.checkpoint, device="cpu", precision="bf16", compile=cfg.compile)
        why = (
            f"bf16 through torch: this CPU has AMX bf16 tiles, and bf16 agrees with fp32 on {_pct(bf16['top1'])} "
            f"of {bf16.get('images')} calibration images (top-1, >= {_pct(BF16_MIN_AGREEMENT)})"
        )
    else:
        backend = OnnxBackend(entry.folder, precision="fp32", reconstruct_runner=reconstruct, **common)
        why = (
            "ONNX Runtime's fused fp32 graph (built from the checkpoint, checked against torch) runs faster "
        )
        why += "than torch eager on the CPU"
        if cfg.precision == "auto":
            why += "; not bf16: " + _why_not_bf16(want_bf16, bf16)
    backend.selection = {"why": why, "agreement": agreement, "graph_cache": entry.describe()}
    return backend
