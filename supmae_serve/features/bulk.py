"""The bulk job behind `supmae-embed run`: inputs -> DataLoader workers decode -> a Backend embeds -> shards.

Stages, per process:

1. list the inputs in their fixed order (`inputs.list_inputs`) and cut them into chunks of `shard_size`;
2. check the folder's plan (`_run.json`: inputs, chunking, model, backend) or write it, so a resumed run
   cannot mix two models or two input lists;
3. take this process's chunks (chunk k belongs to rank k % world_size, as torchrun numbers ranks), skip
   those whose shard is already written, and stream the rest through DataLoader workers, which read and
   decode with `supmae_serve.preprocess` exactly as the server does (bytes -> `decode_image` -> the card's
   resize + centre crop), while the main process normalises each batch and runs `Backend.embed`;
4. commit each chunk when its last batch is done (errors file, then the Parquet shard, each renamed into
   place); a bad input becomes an `errors.jsonl` record, or stops the run under `strict`;
5. rank 0 waits until every chunk's shard exists (no collectives: it watches the folder), then writes
   `features.json`.

Batches never cross a chunk boundary, so a chunk's vectors come from the same batches whether it was embedded
in one run, after a restart, or by another process: a resumed or scaled-out run gives the same feature set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from supmae_serve.backends import Backend, BackendConfig, choose_backend, create_backend
from supmae_serve.common.files import atomic_write_text
from supmae_serve.common.progress import Progress
from supmae_serve.common.shards import Member, read_member
from supmae_serve.common.versions import software_versions
from supmae_serve.preprocess import ImageError, ImageLimits, decode_image, normalize, resize_crop
from supmae_serve.settings import DEFAULT_MODEL

from .featureset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    FeatureSetError,
    FeatureSetWriter,
    import_pyarrow,
    l2_normalize,
    now_iso,
)
from .identity import model_identity
from .inputs import InputItem, Inputs, default_workers, list_inputs

log = logging.getLogger("supmae.embed")

WAIT_POLL_S = 0.5


class EmbedError(RuntimeError):
    """The bulk job cannot go on (a bad input under --strict, other processes that never finish)."""


@dataclass(frozen=True)
class EmbedConfig:
    """Everything `supmae-embed run` takes; the CLI builds one from its flags."""

    input: str
    out: Path
    model: Path = DEFAULT_MODEL
    export_dir: Path | None = None
    backend: str = "auto"  # auto | torch | onnxruntime | tensorrt (| any registered name)
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 for torch on a GPU, the backend's own choice otherwise
    threads: int = 0
    input_kind: str = "auto"
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    shard_size: int = 10_000
    pooling: str = "avg"
    normalize: bool = True
    dtype: str = "float32"
    strict: bool = False
    limits: ImageLimits = ImageLimits()
    progress: bool = True
    wait_timeout_s: float = 0.0  # rank 0's wait for the other processes' shards; 0: no limit
    command: str = ""  # recorded in features.json

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch size and shard size must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 (decode in the main process) or more")


@dataclass(frozen=True)
class DistPart:
    """This process's part of a multi-process run (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistPart:
        try:
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError as e:
            raise EmbedError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
        if world < 1 or not 0 <= rank < world:
            raise EmbedError(f"RANK={rank} is not within WORLD_SIZE={world}")
        return cls(rank, world, local)


# ---------------------------------------------------------------------------- decoding (in workers)
def read_input(item: InputItem, limits: ImageLimits) -> bytes:
    """An input's bytes (a file, or a tar member by offset); an over-size file is refused before reading."""
    size = item.size if item.offset >= 0 else os.stat(item.path).st_size
    if size > limits.max_bytes:
        raise ImageError(
            f"image is {size} bytes; the limit is {limits.max_bytes} bytes per image", 413, "image_too_large"
        )
    if item.offset >= 0:
        return read_member(item.path, Member(item.source, item.offset, item.size))
    with open(item.path, "rb") as f:
        return f.read()


def error_record(item: InputItem, reason: str, message: str, status: int | None = None) -> dict[str, Any]:
    return {"id": item.id, "source": item.source, "reason": reason, "status": status, "message": message}


def decode_crop(
    read: Callable[[], bytes], prep, limits: ImageLimits
) -> tuple[np.ndarray | None, tuple | None]:
    """Read and decode one image as the server does, then resize + centre-crop it as the card says:
    -> ((S, S, 3) uint8, None), or (None, (reason, message, HTTP-like status)). Never raises for a bad input."""
    try:
        img = decode_image(read(), limits)
        return np.asarray(resize_crop(img, prep), dtype=np.uint8), None
    except ImageError as e:
        return None, (e.code, str(e), e.status)
    except OSError as e:
        return None, ("unreadable_file", f"cannot read: {e.strerror or e}", None)
    except Exception as e:  # noqa: BLE001 - one bad input must never stop the job
        return None, ("corrupt_image", f"cannot decode: {type(e).__name__}: {e}", 422)


class DecodeDataset(Dataset):
    """Item i -> (i, its (S, S, 3) uint8 crop or None, its error record or None). Never raises for a bad input."""

    def __init__(self, items: list[InputItem], prep, limits: ImageLimits):
        self.items, self.prep, self.limits = items, prep, limits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, dict | None]:
        item = self.items[i]
        if item.error is not None:
            return i, None, error_record(item, "no_image", item.error, 422)
        crop, err = decode_crop(lambda: read_input(item, self.limits), self.prep, self.limits)
        return i, crop, error_record(item, err[0], err[1], err[2]) if err else None


def collate(batch: list[tuple[int, np.ndarray | None, dict | None]]) -> dict[str, Any]:
    """Worker-side: the good crops as one uint8 (n, 3, S, S) tensor, plus every item's index and the errors."""
    good = [(i, a) for i, a, _ in batch if a is not None]
    images = (
        torch.from_numpy(np.stack([a for _, a in good])).permute(0, 3, 1, 2).contiguous() if good else None
    )
    return {
        "indices": [i for i, _, _ in batch],
        "good": [i for i, _ in good],
        "images": images,  # (n, 3, S, S) uint8
        "errors": [(i, e) for i, _, e in batch if e is not None],
    }


class ChunkBatches(Sampler[list[int]]):
    """Batches of item indices, chunk by chunk, never crossing a chunk boundary (see the module docstring)."""

    def __init__(self, chunks: list[int], shard_size: int, total: int, batch_size: int):
        self.chunks, self.shard_size, self.total, self.batch_size = chunks, shard_size, total, batch_size

    def chunk_range(self, k: int) -> range:
        return range(k * self.shard_size, min(self.total, (k + 1) * self.shard_size))

    def __iter__(self):
        for k in self.chunks:
            r = self.chunk_range(k)
            for start in range(r.start, r.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, r.stop)))

    def __len__(self) -> int:
        return sum(math.ceil(len(self.chunk_range(k)) / self.batch_size) for k in self.chunks)


# ---------------------------------------------------------------------------- the job
def for_this_process(bc: BackendConfig, local_rank: int = 0) -> BackendConfig:
    """A bulk job's backend: its own GPU under torchrun (`cuda:<local rank>`), and bf16 for torch on a GPU
    when the precision is auto (fp32's range at half the memory traffic; fp16 can overflow in unnormalised
    activations). Shared by `supmae-embed` and the Ray Data callable."""
    if bc.device == "auto" and torch.cuda.is_available():
        bc = replace(bc, device=f"cuda:{local_rank % torch.cuda.device_count()}")
    if bc.precision == "auto" and bc.device.startswith("cuda") and choose_backend(bc)[0] == "torch":
        bc = replace(bc, backend="torch", precision="bf16")
    return bc


def backend_config(cfg: EmbedConfig, part: DistPart) -> BackendConfig:
    bc = BackendConfig(
        model=Path(cfg.model),
        export_dir=Path(cfg.export_dir) if cfg.export_dir else None,
        backend=cfg.backend,
        device=cfg.device,
        precision=cfg.precision,
        threads=cfg.threads,
        max_batch_size=cfg.batch_size,
    )
    return for_this_process(bc, part.local_rank)


def _plan(cfg: EmbedConfig, inputs: Inputs, identity, info, chunks: int) -> dict[str, Any]:
    """What must not change between the runs (and processes) that fill one folder."""
    ids = hashlib.sha256("\n".join(i.id for i in inputs.items).encode()).hexdigest()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "input": {"kind": inputs.kind, "root": inputs.root, "count": len(inputs), "ids_sha256": ids},
        "shard_size": cfg.shard_size,
        "chunks": chunks,
        "dtype": cfg.dtype,
        "model": identity.to_dict(),
        "backend": {"name": info.name, "precision": info.precision},
    }


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN_NAME
    if not path.exists():
        atomic_write_text(path, json.dumps(plan, indent=2, sort_keys=True) + "\n")
        return
    old = json.loads(path.read_text())
    diffs = [
        f"{k}: folder {json.dumps(old.get(k), sort_keys=True)} vs now {json.dumps(plan.get(k), sort_keys=True)}"
        for k in sorted(set(old) | set(plan))
        if old.get(k) != plan.get(k)
    ]
    if diffs:
        raise FeatureSetError(
            f"{out} holds (part of) a feature set made with other settings, so this run cannot continue it: "
            + "; ".join(diffs)
            + ". Use a new --out folder (or delete this one)."
        )


@dataclass
class _Chunk:
    k: int
    size: int
    started: str = field(default_factory=now_iso)
    t0: float = field(default_factory=time.perf_counter)
    wall0: float = field(default_factory=time.time)
    seen: int = 0
    rows: list[int] = field(default_factory=list)  # item indices, in order
    vectors: list[np.ndarray] = field(default_factory=list)
    errors: list[tuple[int, dict]] = field(default_factory=list)


def _fail_strict(record: dict) -> None:
    raise EmbedError(
        f"{record['id']} ({record['source']}): {record['reason']}: {record['message']}; --strict stops at the "
        "first bad input (without it, bad inputs are recorded in errors.jsonl and skipped). Shards written so "
        "far are kept: fix or remove the input and run the same command again."
    )


def _embed_chunks(
    cfg: EmbedConfig,
    inputs: Inputs,
    backend: Backend,
    writer: FeatureSetWriter,
    todo: list[int],
    part: DistPart,
) -> int:
    """Embed and commit `todo`'s chunks; returns the number of inputs processed."""
    if not todo:
        return 0  # (a DataLoader would still start its workers)
    info = backend.info()
    prep = backend.card.preprocessing
    loop_start = time.time()
    # normalise where the model runs: torch on a GPU gets uint8 batches (4x less to copy)
    device = torch.device(info.device) if info.name == "torch" else torch.device("cpu")
    sampler = ChunkBatches(todo, cfg.shard_size, len(inputs), cfg.batch_size)
    loader = DataLoader(
        DecodeDataset(inputs.items, prep, cfg.limits),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
    )
    total = sum(len(sampler.chunk_range(k)) for k in todo)
    desc = "embed" if part.world_size == 1 else f"embed (rank 0 of {part.world_size})"
    bar = Progress("auto", total, enabled=cfg.progress and part.rank == 0, unit="img", desc=desc)
    items, current, done = inputs.items, None, 0
    try:
        for b in loader:
            k = b["indices"][0] // cfg.shard_size
            if current is None or current.k != k:
                current = _Chunk(k, len(sampler.chunk_range(k)))
            errors = list(b["errors"])
            if b["images"] is not None:
                x = normalize(b["images"].to(device, non_blocking=True), prep)  # (n, 3, S, S) float32
                emb = backend.embed(x, cfg.pooling).embedding  # (n, D) float32
                finite = np.isfinite(emb).all(axis=1)
                for j in np.flatnonzero(~finite):
                    i = b["good"][j]
                    errors.append(
                        (i, error_record(items[i], "non_finite_embedding", "the model gave NaN or inf"))
                    )
                emb = l2_normalize(emb) if cfg.normalize else emb
                current.rows += [i for i, ok in zip(b["good"], finite, strict=True) if ok]
                current.vectors.append(emb[finite])
            if errors and cfg.strict:
                _fail_strict(min(errors, key=lambda e: e[0])[1])
            current.errors += errors
            current.seen += len(b["indices"])
            done += len(b["indices"])
            bar.update(done, {})
            if current.seen == current.size:
                _commit(writer, items, current, part, loop_start)
                current = None
    finally:
        bar.close()
    return done


def _commit(
    writer: FeatureSetWriter, items: list[InputItem], c: _Chunk, part: DistPart, loop_start: float
) -> None:
    dim = writer.dim
    emb = np.concatenate(c.vectors) if c.vectors else np.zeros((0, dim), np.float32)
    rows = [items[i] for i in c.rows]
    writer.write_chunk(
        c.k,
        [it.id for it in rows],
        [it.label for it in rows],
        [it.source for it in rows],
        emb,
        [e for _, e in sorted(c.errors, key=lambda e: e[0])],
        {
            "inputs": c.size,
            "started": c.started,
            "seconds": round(time.perf_counter() - c.t0, 3),
            # epoch seconds, for per-process spans (benchmarks/embed_throughput.py)
            "loop_start": loop_start,
            "t_start": c.wall0,
            "t_end": time.time(),
            "rank": part.rank,
            "world_size": part.world_size,
        },
    )


def _wait_for_all(writer: FeatureSetWriter, chunks: int, timeout_s: float) -> None:
    """Rank 0 waits for the other processes' shards by watching the folder (no collectives needed)."""
    t0, told = time.monotonic(), False
    while True:
        missing = [k for k in range(chunks) if not writer.done(k)]
        if not missing:
            return
        if not told:
            log.info("waiting for %d shards from the other processes", len(missing))
            told = True
        if timeout_s and time.monotonic() - t0 > timeout_s:
            raise EmbedError(
                f"{len(missing)} shards (e.g. {writer.shard_path(missing[0]).name}) were not written within "
                f"{timeout_s:.0f} s; a process may have died: run the same command again to finish them"
            )
        time.sleep(WAIT_POLL_S)


def _versions(info) -> dict[str, str]:
    runtimes = {"onnxruntime": ["onnxruntime", "onnxruntime-gpu"], "tensorrt": ["tensorrt"]}.get(
        info.name, []
    )
    return software_versions(["pillow", "pyarrow", *runtimes])


def embed_inputs(
    cfg: EmbedConfig, backend: Backend | None = None, part: DistPart | None = None
) -> dict[str, Any]:
    """Run (or continue) the bulk job for this process; returns its JSON summary. With `backend` given, that
    backend is used as is (tests, Ray workers); `cfg.model` then only names where its weights live."""
    t_start = time.perf_counter()
    import_pyarrow()  # fail before any work when the extra is missing
    part = part or DistPart.from_env()
    inputs = list_inputs(cfg.input, cfg.input_kind)
    for note in inputs.notes:
        log.warning("%s", note)
    backend = backend or create_backend(backend_config(cfg, part))
    info = backend.info()
    identity = model_identity(
        backend.card, cfg.model, pooling=cfg.pooling, normalized=cfg.normalize, export_dir=cfg.export_dir
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(inputs)
    chunks = math.ceil(n / cfg.shard_size)
    _check_plan(out, _plan(cfg, inputs, identity, info, chunks))
    writer = FeatureSetWriter(out, identity.dim, cfg.dtype)
    mine = [k for k in range(chunks) if k % part.world_size == part.rank]
    todo = [k for k in mine if not writer.done(k)]
    complete = (out / MANIFEST_NAME).exists()
    t_embed = time.perf_counter()
    processed = 0 if complete else _embed_chunks(cfg, inputs, backend, writer, todo, part)
    embed_s = time.perf_counter() - t_embed
    manifest = None
    if complete:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    elif part.rank == 0:
        _wait_for_all(writer, chunks, cfg.wait_timeout_s)
        manifest = writer.finalize(chunks, _manifest_fields(cfg, inputs, identity, info, part))
    summary = {
        "out": str(out),
        "complete": manifest is not None,
        "inputs": n,
        "embedded": manifest["count"] if manifest else None,
        "failed": manifest["failed"] if manifest else None,
        "shards": chunks,
        "shards_this_process": len(mine),
        "shards_resumed": len(mine) - len(todo),
        "processed_now": processed,
        "embed_seconds": round(embed_s, 3),
        "images_per_s": round(processed / embed_s, 1) if processed and embed_s > 0 else None,
        "seconds": round(time.perf_counter() - t_start, 3),
        "backend": {"name": info.name, "device": info.device, "precision": info.precision},
        "rank": part.rank,
        "world_size": part.world_size,
    }
    if manifest is not None:
        summary["errors_file"] = str(out / manifest["errors_file"])
    return summary


def _manifest_fields(cfg: EmbedConfig, inputs: Inputs, identity, info, part: DistPart) -> dict[str, Any]:
    limits = cfg.limits
    return {
        "pooling": cfg.pooling,
        "normalized": cfg.normalize,
        "model": {**identity.to_dict(), "path": str(cfg.model)},
        "backend": {"name": info.name, "device": info.device, "precision": info.precision},
        "input": inputs.describe(),
        "run": {
            "processes": part.world_size,
            "batch_size": cfg.batch_size,
            "workers": cfg.workers,
            "shard_size": cfg.shard_size,
            "strict": cfg.strict,
            "limits": {
                "max_bytes": limits.max_bytes,
                "max_pixels": limits.max_pixels,
                "min_side": limits.min_side,
            },
            "command": cfg.command,
        },
        "software": _versions(info),
    }
