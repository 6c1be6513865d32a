"""What `supmae-embed` reads: an ImageFolder, a plain folder of images, a list file, a glob, or WebDataset
tar shards, listed in a fixed order with stable ids.

Ids are the path relative to the input root (POSIX separators), or the tar key for shards, so the same input
gives the same ids on any machine and after any restart. Labels come from class folders, a list file's second
(tab-separated) column, or a shard sample's `cls` field.
"""

from __future__ import annotations

import glob as _glob
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from supmae_serve.common.files import (
    IMAGE_EXTENSIONS,
    DataError,
    is_image_file,
    list_image_files,
    scan_image_folder,
)
from supmae_serve.common.shards import (
    IMAGE_FIELDS,
    URL_PREFIXES,
    expand_braces,
    image_field,
    looks_like_shards,
    scan_tar,
)

KINDS = ("auto", "folder", "files", "list", "glob", "wds")


def default_workers() -> int:
    """Decoding processes for the bulk job: one core fewer than the machine has (the model needs one), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True, slots=True)
class InputItem:
    id: str
    label: str | None
    source: str  # what a person (or the demo) can open: a file path, or "shard.tar#member"
    path: str  # the file to read
    offset: int = -1  # a tar member's data offset; -1: the whole file
    size: int = -1  # a tar member's size
    error: str | None = None  # known bad when listed (a shard sample without an image)


@dataclass
class Inputs:
    items: list[InputItem]
    kind: str
    spec: str
    root: str  # absolute folder the ids are relative to (shards: the folder of the first shard)
    labels: str  # where labels come from
    notes: list[str] = field(default_factory=list)  # things a user should know (skipped files, ...)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "root": self.root,
            "labels": self.labels,
            "count": len(self.items),
            "notes": list(self.notes),
        }


def _rel_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _check_unique(items: list[InputItem], spec: str) -> None:
    seen, dup = set(), []
    for it in items:
        if it.id in seen:
            dup.append(it.id)
        seen.add(it.id)
    if dup:
        raise DataError(
            f"{spec}: {len(dup)} duplicate ids (each input must appear once), e.g. {', '.join(sorted(set(dup))[:5])}"
        )


def detect_kind(spec: str) -> str:
    p = Path(spec)
    if p.is_dir():
        has_classes = any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir())
        return "folder" if has_classes else "files"
    if looks_like_shards(spec):
        return "wds"
    if any(c in spec for c in _GLOB_CHARS):
        return "glob"
    if p.is_file():
        return "glob" if p.suffix.lower() in IMAGE_EXTENSIONS else "list"
    raise DataError(
        f"{spec}: no such file or folder (expected an ImageFolder, a folder of images, a list file with one "
        "path per line, a glob such as 'photos/**/*.jpg', or WebDataset shards such as 'shards-{0000..0009}.tar')"
    )


def list_inputs(spec: str, kind: str = "auto") -> Inputs:
    """List the inputs `spec` names, in their fixed order (see the module docstring)."""
    if kind not in KINDS:
        raise DataError(f"input kind must be one of {', '.join(KINDS)}, got {kind!r}")
    kind = detect_kind(spec) if kind == "auto" else kind
    inputs = {"folder": _folder, "files": _files, "list": _list_file, "glob": _glob_files, "wds": _shards}[
        kind
    ](spec)
    if not inputs.items:
        raise DataError(f"{spec}: no inputs found ({kind})")
    _check_unique(inputs.items, spec)
    return inputs


def _folder(spec: str) -> Inputs:
    root = Path(spec).resolve()
    samples, classes = scan_image_folder(root)
    items = [InputItem(id=_rel_id(p, root), label=classes[c], source=str(p), path=str(p)) for p, c in samples]
    notes = []
    loose = [f for f in root.iterdir() if is_image_file(f)]
    if loose:
        notes.append(
            f"{len(loose)} image files directly under {root} are not in a class folder and are not inputs "
            "(ImageFolder layout: root/<class>/<image>)"
        )
    return Inputs(items, "folder", spec, str(root), "class folders", notes)


def _files(spec: str) -> Inputs:
    root = Path(spec).resolve()
    if not root.is_dir():
        raise DataError(f"{spec}: not a folder")
    items = [
        InputItem(id=_rel_id(p, root), label=None, source=str(p), path=str(p)) for p in list_image_files(root)
    ]
    return Inputs(items, "files", spec, str(root), "none")


def _list_file(spec: str) -> Inputs:
    lst = Path(spec)
    try:
        lines = lst.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{spec}: cannot read the list file ({e})") from e
    root = lst.resolve().parent
    items, labelled = [], False
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path_text, _, label = line.partition("\t")
        labelled |= bool(label)
        p = Path(path_text)
        p = p if p.is_absolute() else root / p
        items.append(
            InputItem(
                id=_rel_id(Path(os.path.normpath(p)), root), label=label or None, source=str(p), path=str(p)
            )
        )
    return Inputs(items, "list", spec, str(root), "list column 2" if labelled else "none")


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    if len(fixed) == len(parts):  # no magic: a single file
        fixed = fixed[:-1]
    return Path(*fixed).resolve() if fixed else Path.cwd()


def _glob_files(spec: str) -> Inputs:
    root = _glob_root(spec)
    paths = sorted(Path(p).resolve() for p in _glob.glob(spec, recursive=True) if Path(p).is_file())
    items = [InputItem(id=_rel_id(p, root), label=None, source=str(p), path=str(p)) for p in paths]
    return Inputs(items, "glob", spec, str(root), "none")


def _shards(spec: str) -> Inputs:
    if spec.startswith(URL_PREFIXES):
        raise DataError(
            f"{spec}: supmae-embed reads local tar shards; copy remote shards to a local disk first"
        )
    paths: list[Path] = []
    for name in expand_braces(spec):
        matches = sorted(_glob.glob(name)) if any(c in name for c in _GLOB_CHARS) else [name]
        paths += [Path(m) for m in matches]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{spec}: {len(missing)} shards do not exist, e.g. {missing[0]}")
    items = []
    for shard in paths:
        try:
            samples = scan_tar(shard)
        except tarfile.ReadError as e:
            raise DataError(
                f"{shard}: not an uncompressed tar ({e}); WebDataset shards are read by offset, so "
                "compressed (.tar.gz) shards must be decompressed first"
            ) from e
        for s in samples:
            f = image_field(s.fields)
            if f is None:
                have = ", ".join(sorted(s.fields)) or "nothing"
                items.append(
                    InputItem(
                        id=s.key,
                        label=s.label,
                        source=f"{shard}#{s.key}",
                        path=str(shard),
                        error=f"no image in this sample (fields: {have}; expected one of {', '.join(IMAGE_FIELDS)})",
                    )
                )
                continue
            m = s.fields[f]
            items.append(
                InputItem(
                    id=s.key,
                    label=s.label,
                    source=f"{shard.resolve()}#{m.name}",
                    path=str(shard.resolve()),
                    offset=m.offset,
                    size=m.size,
                )
            )
    root = str(paths[0].resolve().parent) if paths else ""
    return Inputs(items, "wds", spec, root, "cls field" if any(i.label for i in items) else "none")
