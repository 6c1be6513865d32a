"""WebDataset tar shards, read with the standard library.

A WebDataset shard is a plain tar whose members are grouped into samples by key: the member's path up to
the first dot of its file name (`train/000123.jpg` and `train/000123.cls` are the sample `train/000123` with
the fields `jpg` and `cls`). The trainer streams shards through the `webdataset` package (shuffling,
splitting by node and worker); the bulk job needs random access instead (any sample, in any DataLoader
worker, in a fixed order), so it indexes each shard once (`scan_tar`) and reads a member's bytes by offset.
Both use the same rules for which field is the image and which the label.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # the first present is a sample's image (webdataset's names)
LABEL_FIELD = "cls"  # an integer class index, as text
URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


def image_field(sample: Mapping[str, object]) -> str | None:
    """The field of a sample that holds its image, or None."""
    return next((k for k in IMAGE_FIELDS if k in sample), None)


def looks_like_shards(spec: str) -> bool:
    """Whether a data string names WebDataset shards: a URL, a `.tar` path or a brace pattern."""
    return spec.startswith(URL_PREFIXES) or ".tar" in spec or "{" in spec


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`shards-{000..002}.tar` -> the three names (zero padding kept); `{a,b}` -> each alternative. The
    leftmost group varies slowest, as in webdataset's braceexpand."""
    groups = [m for m in (_RANGE.search(pattern), _ALTERNATIVES.search(pattern)) if m]
    if not groups:
        return [pattern]
    m = min(groups, key=lambda g: g.start())
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        values = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        values = m.group(1).split(",")
    return [name for v in values for name in expand_braces(pattern[: m.start()] + v + pattern[m.end() :])]


@dataclass(frozen=True)
class Member:
    name: str  # path inside the tar
    offset: int  # where its data starts in the tar file
    size: int


@dataclass
class TarSample:
    key: str
    fields: dict[str, Member] = field(default_factory=dict)
    label: str | None = None  # the `cls` field's text, when present


def split_key(member_name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> ("dir/000123", "seg.png"): key up to the first dot of the file name."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def scan_tar(path: str | Path, max_label_bytes: int = 64) -> list[TarSample]:
    """Index an uncompressed tar shard: its samples in file order, each field's offset and size, and the
    `cls` label's text. Only headers (and the tiny label members) are read."""
    path = Path(path)
    samples: dict[str, TarSample] = {}
    with tarfile.open(path, mode="r:") as tar:  # "r:" refuses compressed tars: they have no random access
        for info in tar:
            if not info.isfile() or info.name.startswith(".") or "/." in info.name:
                continue
            key, ext = split_key(info.name)
            s = samples.setdefault(key, TarSample(key))
            s.fields[ext] = Member(info.name, info.offset_data, info.size)
            if ext == LABEL_FIELD and info.size <= max_label_bytes:
                s.label = tar.extractfile(info).read().decode("utf-8", "replace").strip()
    return list(samples.values())


def read_member(path: str | Path, member: Member) -> bytes:
    with open(path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{path}: {member.name} is cut short ({len(data)} of {member.size} bytes)")
    return data


def iter_samples(path: str | Path) -> Iterator[tuple[TarSample, dict[str, bytes]]]:
    """Each sample of a shard with its fields' bytes, in file order."""
    for s in scan_tar(path):
        yield s, {ext: read_member(path, m) for ext, m in s.fields.items()}
