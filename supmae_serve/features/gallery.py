"""The files behind an index's results, and the index a server loads for its model.

Where the sources live. An index records, in its manifest's `sources`, the input root of each feature set it
holds (the folder the ids are relative to) when those inputs were local image files (an ImageFolder, a
folder, a list file or a glob; not tar shards). With `supmae-embed index --relative-sources` the sources
and the roots are stored relative to the index folder, so a folder holding the images and the index can be
moved or installed anywhere as one (the shipped CIFAR-10 gallery is built so).

`SourceFiles` turns a neighbour's source into a file to show: a relative source is joined to the index
folder, the path is resolved (links and '..' followed), and only a regular file inside one of the recorded
roots is given back; anything else raises `SourceRefused`. The demo reads its thumbnails through it, so an
index (or a crafted request) can never make the server read another file on its disk.

Which index a server loads (`--index`): a folder; `none`; or `auto` (the default): the shipped gallery when
the served model is the bundled one, no index for any other model. `load_served_index` refuses an index whose
model identity (weights digest, pooling, normalisation, dimension, preprocessing) is not the served model's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supmae_serve.settings import DEFAULT_MODEL

from .identity import check_identity, model_identity

if TYPE_CHECKING:
    from supmae_serve.model.checkpoint import ModelCard

    from .featureset import Features, FeatureSet
    from .index import FeatureIndex

log = logging.getLogger("supmae.features")

GALLERY_DIR = DEFAULT_MODEL.parent / "cifar10_gallery"
GALLERY_INDEX = GALLERY_DIR / "index"
FILE_KINDS = ("folder", "files", "list", "glob")  # inputs whose sources are image files
INDEX_CHOICES = (
    "a folder built by `supmae-embed index`, `auto` (the shipped gallery for the bundled model) or `none`"
)


class SourceRefused(ValueError):
    """A source that is not a readable image file inside the index's recorded roots; the message says why."""


def _relative(path: str | Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()


def sources_record(sets: Sequence[FeatureSet], out: Path, relative: bool) -> dict[str, Any]:
    """The manifest's `sources` for an index over `sets` written to `out`."""
    roots = []
    for s in sets:
        inp = s.manifest.get("input") or {}
        if inp.get("kind") in FILE_KINDS and inp.get("root"):
            roots.append(_relative(inp["root"], out) if relative else str(Path(inp["root"]).resolve()))
    return {
        "relative_to_index": bool(relative),
        "roots": sorted(set(roots)),
        "local_files": bool(sets) and len(roots) == len(sets),
    }


def relative_sources(feats: Features, out: Path) -> Features:
    """`feats` with each source stored relative to the index folder `out` (for --relative-sources)."""
    from .featureset import Features

    return Features(feats.ids, feats.labels, [_relative(s, out) for s in feats.sources], feats.embeddings)


def merge_sources(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The `sources` record after adding feature sets (`new`) to an index (`old`, None for older indexes)."""
    if old is None:
        return {**new, "roots": [], "local_files": False}  # the first sets' roots are unknown
    return {
        "relative_to_index": old.get("relative_to_index", False),
        "roots": sorted(set(old.get("roots", [])) | set(new["roots"])),
        "local_files": bool(old.get("local_files")) and bool(new["local_files"]),
    }


class SourceFiles:
    """Resolves an index's sources to image files inside its recorded roots (see the module docstring)."""

    def __init__(self, index_path: str | Path, manifest: dict[str, Any]):
        record = manifest.get("sources") or {}
        self.base = Path(index_path).resolve()
        self.relative = bool(record.get("relative_to_index"))
        self.roots = [self._resolve(r) for r in record.get("roots", [])]
        self.local_files = bool(record.get("local_files")) and bool(self.roots)

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        if self.relative and not p.is_absolute():
            p = self.base / p
        return p.resolve()

    def path(self, source: str) -> Path:
        """The file behind `source`, or SourceRefused when it is not an existing file inside a recorded root."""
        if not self.roots:
            raise SourceRefused("this index records no folder of local image files to show neighbours from")
        if not isinstance(source, str) or not source or "://" in source or "\x00" in source:
            raise SourceRefused(f"{source!r} is not a local file path")
        try:
            resolved = self._resolve(source)
        except (OSError, RuntimeError, ValueError) as e:
            raise SourceRefused(f"{source}: cannot resolve it ({e})") from e
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise SourceRefused(
                f"{source}: outside the index's recorded image folder(s); only files inside them are shown"
            )
        if not resolved.is_file():
            raise SourceRefused(f"{source}: not an existing file")
        return resolved


# ---------------------------------------------------------------------------- the index a server loads
def resolve_index_spec(spec: str | Path | None, model: str | Path) -> Path | None:
    """`--index` -> the folder to load, or None: `none`/empty -> None; `auto` -> the shipped gallery when `model`
    is the bundled model (and the gallery is installed), else None; anything else is a folder."""
    text = str(spec).strip() if spec is not None else ""
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "auto":
        if Path(model).resolve() == DEFAULT_MODEL and (GALLERY_INDEX / "index.json").is_file():
            return GALLERY_INDEX
        return None
    return Path(text)


def load_served_index(
    path: str | Path, card: ModelCard, model: str | Path, export_dir: str | Path | None = None
) -> FeatureIndex:
    """Load the index at `path` for the model being served; IdentityError (what differs) when the index was
    made by another model, FeatureIndexError when it is not a readable index."""
    from .index import FeatureIndex

    index = FeatureIndex.load(path)
    made_by = index.identity
    served = model_identity(card, model, pooling=made_by.pooling, normalized=True, export_dir=export_dir)
    check_identity(made_by, served, what="index", other="served model")
    return index
