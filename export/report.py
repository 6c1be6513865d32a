"""What an export says about itself: one `Record` per artefact, the latencies, `manifest.json` and the table.

The manifest is the contract with whoever serves the folder (`supmae_serve.backends.graph` reads it):
`artefacts` lists only files that passed verification, in order of preference; `failed` the others, with
their numbers; `skipped` what was asked for but could not be built here. The table is the same facts
for a person, printed at the end of `supmae-export`.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.files import atomic_write_text, sha256_file
from supmae_serve.common.versions import software_versions
from supmae_serve.model import ModelCard, SupMAE
from supmae_serve.model.masking import seeded_keep_indices

from .verify import VerifyImages, median_latency_ms, ort_session

MANIFEST_NAME = "manifest.json"
CARD_NAME = "model.json"


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


def artefact_files(path: Path) -> list[Path]:
    """The file and, for an ONNX graph over protobuf's 2 GiB limit, its external weights (`<name>.data`)."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def file_record(out: Path, path: Path, kind: str, precision: str, fmt: str, **details) -> Record:
    """The record of a file just written under `out`: its size (external data included) and sha256."""
    files = artefact_files(path)
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


# ---------------------------------------------------------------------------- latency
def measure_latency(
    model: SupMAE,
    card: ModelCard,
    records: Sequence[Record],
    folder: Path,
    batches: Sequence[int],
    threads: int,
    max_engine_batch: int,
) -> dict[str, float]:
    """Median wall time per batch size: the torch model (returned) and each ONNX graph and TensorRT engine
    (into its record's `latency_ms`; an engine only at the batch sizes its profile takes). The inputs
    are random: latency does not depend on the pixel values."""
    s = card.preprocessing.image_size
    rng = np.random.default_rng(0)

    def images(b: int) -> np.ndarray:
        return rng.standard_normal((b, 3, s, s)).astype(np.float32)  # (B, 3, S, S)

    def timed(
        run: Callable[[dict[str, np.ndarray]], object], feeds: Callable[[int], dict]
    ) -> dict[str, float]:
        out = {}
        for b in batches:
            f = feeds(b)
            out[str(b)] = median_latency_ms(lambda f=f: run(f))
        return out

    with torch.inference_mode():
        reference = timed(
            lambda f: model.forward_features(torch.from_numpy(f["images"])), lambda b: {"images": images(b)}
        )
    ratio = card.config.mask_ratio
    for rec in records:
        path = folder / rec.file
        if rec.format.startswith("onnx") and rec.kind == "encoder":
            sess = ort_session(path, threads)
            rec.latency_ms = timed(lambda f, sess=sess: sess.run(None, f), lambda b: {"images": images(b)})
        elif rec.format.startswith("onnx") and rec.kind == "reconstruct":
            sess = ort_session(path, threads)
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
            for b in [b for b in batches if b <= max_engine_batch]:
                f = {"images": images(b)}
                rec.latency_ms[str(b)] = median_latency_ms(lambda f=f, runner=runner: runner(f))
    return reference


# ---------------------------------------------------------------------------- manifest.json
def manifest_versions() -> dict[str, str]:
    """The versions an export depends on, the machine it was verified on and its GPU, if any."""
    versions = software_versions(["onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"], system=True)
    if "tensorrt" in sys.modules:  # only when this export built engines with it
        versions["tensorrt"] = sys.modules["tensorrt"].__version__
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def write_manifest(
    result: ExportResult, card: ModelCard, checkpoint: Path, images: VerifyImages, verified: bool
) -> Path:
    """Write `result.manifest` (atomically: a reader never sees half a manifest)."""
    records = result.records
    manifest = {
        "format_version": 1,
        "artefacts": [r.to_dict() for r in records if r.passed],
        "failed": [r.to_dict() for r in records if not r.passed],
        "skipped": result.skipped,
        "model": {
            "variant": card.variant,
            "framework": card.framework,
            "capabilities": card.capabilities,
            "card": CARD_NAME,
        },
        "source": {"checkpoint": str(checkpoint), "weights_sha256": _weights_sha(checkpoint)},
        "verification": {"images": len(images.images), "image_source": images.source, "enabled": verified},
        "reference_latency_ms": (
            {"torch-eager-fp32": result.reference_latency_ms} if result.reference_latency_ms else {}
        ),
        "versions": manifest_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return atomic_write_text(result.manifest, json.dumps(manifest, indent=2) + "\n")


def _weights_sha(checkpoint: Path) -> str | None:
    """The digest of the weights the artefacts came from (a checkpoint folder, its .safetensors or its
    model.json), which `supmae_serve.features` compares to tell whether two vectors are comparable."""
    p = Path(checkpoint)
    if p.is_dir():
        w = p / "model.safetensors"
    elif p.suffix == ".json":
        w = p.with_name("model.safetensors")
    else:
        w = p
    return sha256_file(w) if w.exists() else None


# ---------------------------------------------------------------------------- the table
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _parity(r: Record) -> tuple[str, str]:
    """The table's parity and status cells for one artefact."""
    v = r.verify or {}
    if v.get("skipped"):
        return "not verified (--no-verify)", "-"
    if "max_rel_err" not in v:
        return "hash checked", "-"
    parity = f"{v['max_rel_err']:.1e} / {v['cosine_min']:.5f}"
    parity += f" / {100 * v['top1_agreement']:.1f}%" if v.get("top1_agreement") is not None else " / -"
    if v.get("exact"):
        parity += " (mask exact)" if all(v["exact"].values()) else " (mask differs)"
    return parity, "PASS" if v.get("passed") else "FAIL"


def format_table(result: ExportResult, batches: tuple[int, ...] = (1, 32)) -> str:
    """Artefact, size, precision, parity with torch, status and latency per batch size, one row each."""
    header = ["artefact", "size", "precision", "parity (max rel err / min cosine / top-1 agree)", "status"]
    header += [f"ms @ b{b}" for b in batches]
    rows = []
    if result.reference_latency_ms:
        rows.append(
            ["torch eager (reference)", "-", "fp32", "-", "-"]
            + [_ms(result.reference_latency_ms.get(str(b))) for b in batches]
        )
    for r in result.records:
        rows.append(
            [r.file, _size(r.bytes), r.precision, *_parity(r)]
            + [_ms(r.latency_ms.get(str(b))) for b in batches]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])
