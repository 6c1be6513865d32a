"""The feature-set format: a folder of Parquet shards plus `features.json`.

```
features/
  features.json            count, dim, dtype, pooling, normalised, the model's identity, backend, input,
                           software versions, start/end times, failures, the shard list
  part-000000.parquet      columns id (string), label (string, nullable), source (string),
  part-000001.parquet      embedding (fixed_size_list<float32 | float16>[dim]); one shard per chunk of inputs
  errors.jsonl             one line per input that failed: {"id", "source", "reason", "status", "message"}
  _run.json                the plan (inputs, chunking, model): a resumed run must match it
  _errors/part-*.jsonl     each chunk's failures, merged into errors.jsonl at the end
```

Chunk k holds inputs [k * shard_size, (k + 1) * shard_size) in input order, whichever process embeds it, so
the shards do not depend on the number of processes. Every file is written to a temp name and renamed
(`supmae_serve.common.files.atomic_write`); a shard's Parquet file is the chunk's commit point, written after
its errors file. pyarrow is imported lazily (`pip install 'supmae[features]'`).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supmae_serve.common.files import atomic_write, atomic_write_text, remove_stale_temp_files
from supmae_serve.common.optional import require

from .identity import ModelIdentity

FORMAT = "supmae-features"
FORMAT_VERSION = 1
MANIFEST_NAME = "features.json"
PLAN_NAME = "_run.json"
ERRORS_NAME = "errors.jsonl"
CHUNK_ERRORS_DIR = "_errors"
DTYPES = ("float32", "float16")
SHARD_META_KEY = b"supmae"


class FeatureSetError(ValueError):
    """A feature-set folder that cannot be read or written as asked; the message says what and why."""


def import_pyarrow():
    require("pyarrow.parquet", "feature sets")  # the submodule is what we use
    import pyarrow

    return pyarrow


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32, the rule `/v1/embed?normalize=true` applies."""
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def read_manifest(path: Path, fmt: str, version: int, error: type[Exception], what: str) -> dict[str, Any]:
    """A folder's JSON manifest, checked to be of format `fmt` and no newer than `version`; `error` (with
    `what` the folder should be) says what is wrong."""
    if not path.exists():
        raise error(f"{path.parent}: not {what} (no {path.name})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise error(f"{path}: not a {fmt} manifest (format {got!r})")
    if int(manifest.get("format_version", 0)) > version:
        raise error(
            f"{path}: format_version {manifest['format_version']} is newer than this supmae reads ({version}); "
            "upgrade supmae"
        )
    return manifest


def shard_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"


@dataclass
class FeatureSetWriter:
    """Writes one feature-set folder, chunk by chunk (from any number of processes), then its manifest."""

    out: Path
    dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.dtype not in DTYPES:
            raise FeatureSetError(f"embedding dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def shard_path(self, chunk: int) -> Path:
        return self.out / shard_name(chunk)

    def chunk_errors_path(self, chunk: int) -> Path:
        return self.out / CHUNK_ERRORS_DIR / shard_name(chunk).replace(".parquet", ".jsonl")

    def done(self, chunk: int) -> bool:
        return self.shard_path(chunk).exists()

    def write_chunk(
        self,
        chunk: int,
        ids: Sequence[str],
        labels: Sequence[str | None],
        sources: Sequence[str],
        embeddings: np.ndarray,
        errors: Sequence[dict] = (),
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Commit one chunk: its errors file, then its Parquet shard (the shard's rename is the commit point)."""
        pa = import_pyarrow()
        emb = np.asarray(embeddings, dtype=np.dtype(self.dtype)).reshape(len(ids), self.dim)  # (n, D)
        atomic_write_text(self.chunk_errors_path(chunk), "".join(_json_line(e) for e in errors))
        values = pa.array(emb.reshape(-1))
        table = pa.table(
            {
                "id": pa.array(list(ids), pa.string()),
                "label": pa.array(list(labels), pa.string()),
                "source": pa.array(list(sources), pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(values, self.dim),
            }
        )
        info = {"chunk": chunk, "rows": len(ids), "failed": len(errors), **(meta or {})}
        table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(info).encode()})
        return atomic_write(self.shard_path(chunk), lambda tmp: pa.parquet.write_table(table, tmp))

    def finalize(self, chunks: int, manifest: dict[str, Any]) -> dict[str, Any]:
        """Merge the chunks' errors into errors.jsonl and write features.json (after every chunk is done)."""
        pa = import_pyarrow()
        missing = [k for k in range(chunks) if not self.done(k)]
        if missing:
            raise FeatureSetError(f"{self.out}: {len(missing)} of {chunks} shards are not written yet")
        shards, errors, starts, count, failed = [], [], [], 0, 0
        for k in range(chunks):
            path = self.shard_path(k)
            info = json.loads(pa.parquet.read_schema(path).metadata[SHARD_META_KEY])
            text = self.chunk_errors_path(k).read_text() if self.chunk_errors_path(k).exists() else ""
            errors.append(text)
            shards.append(
                {
                    "file": path.name,
                    "rows": info["rows"],
                    "failed": info["failed"],
                    "bytes": path.stat().st_size,
                }
            )
            count += info["rows"]
            failed += info["failed"]
            if info.get("started"):
                starts.append(info["started"])
        atomic_write_text(self.out / ERRORS_NAME, "".join(errors))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": count,
            "failed": failed,
            "dim": self.dim,
            "dtype": self.dtype,
            "started": min(starts) if starts else now_iso(),  # the first chunk's start, over every run
            **manifest,
            "finished": now_iso(),
            "errors_file": ERRORS_NAME,
            "shards": shards,
        }
        atomic_write_text(self.out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        remove_stale_temp_files(self.out)
        remove_stale_temp_files(self.out / CHUNK_ERRORS_DIR)
        return manifest


@dataclass
class Features:
    """A feature set read into memory: aligned arrays, one row per embedded input."""

    ids: list[str]
    labels: list[str | None]
    sources: list[str]
    embeddings: np.ndarray  # (N, D) float32

    def __len__(self) -> int:
        return len(self.ids)


class ManifestFacts:
    """What feature sets and indexes both record in their `manifest`: the model identity and the dimension."""

    manifest: dict[str, Any]

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.manifest["model"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


@dataclass
class FeatureSet(ManifestFacts):
    """A finished feature-set folder (`FeatureSet.open`)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        if not (path / MANIFEST_NAME).exists() and (path / PLAN_NAME).exists():
            raise FeatureSetError(
                f"{path}: an unfinished feature set (no {MANIFEST_NAME} yet): run the same supmae-embed "
                "command again to finish it"
            )
        manifest = read_manifest(
            path / MANIFEST_NAME,
            FORMAT,
            FORMAT_VERSION,
            FeatureSetError,
            "a feature set; make one with supmae-embed",
        )
        return cls(path, manifest)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def iter_shards(self) -> Iterator[Features]:
        """Each shard as `Features` (embeddings float32), in order."""
        pa = import_pyarrow()
        for p in self.shard_paths():
            if not p.exists():
                raise FeatureSetError(f"{p}: shard listed in {MANIFEST_NAME} is missing")
            t = pa.parquet.read_table(p)
            emb = t.column("embedding").combine_chunks()
            flat = emb.flatten().to_numpy(zero_copy_only=False)  # (n * D,)
            yield Features(
                ids=t.column("id").to_pylist(),
                labels=t.column("label").to_pylist(),
                sources=t.column("source").to_pylist(),
                embeddings=flat.reshape(len(t), self.dim).astype(np.float32, copy=False),
            )

    def read(self) -> Features:
        """The whole set in memory."""
        parts = list(self.iter_shards())
        emb = np.concatenate([p.embeddings for p in parts]) if parts else np.zeros((0, self.dim), np.float32)
        return Features(
            ids=[i for p in parts for i in p.ids],
            labels=[x for p in parts for x in p.labels],
            sources=[s for p in parts for s in p.sources],
            embeddings=emb,
        )

    def errors(self) -> list[dict]:
        path = self.path / self.manifest.get("errors_file", ERRORS_NAME)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_feature_set(
    out: str | Path,
    features: Features,
    identity: ModelIdentity,
    *,
    dtype: str = "float32",
    shard_size: int = 100_000,
    extra: dict[str, Any] | None = None,
) -> FeatureSet:
    """Write vectors made elsewhere (a Ray Data pipeline, synthetic benchmark data) as a feature set."""
    emb = np.asarray(features.embeddings, dtype=np.float32)
    n = len(features)
    if emb.shape != (n, identity.dim):
        raise FeatureSetError(f"embeddings have shape {emb.shape}; expected ({n}, {identity.dim})")
    writer = FeatureSetWriter(Path(out), identity.dim, dtype)
    chunks = max(1, -(-n // shard_size))
    started = now_iso()
    for k in range(chunks):
        s = slice(k * shard_size, min(n, (k + 1) * shard_size))
        writer.write_chunk(
            k, features.ids[s], features.labels[s], features.sources[s], emb[s], meta={"started": started}
        )
    writer.finalize(
        chunks,
        {
            "pooling": identity.pooling,
            "normalized": identity.normalized,
            "model": identity.to_dict(),
            **(extra or {}),
        },
    )
    return FeatureSet.open(out)
