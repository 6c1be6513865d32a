"""Datasets for training and evaluation.

`scan_image_folder` and `holdout_split` are the shared base: an ImageFolder-layout root
(`root/<class>/<image>`) listed deterministically, and a seeded, class-stratified hold-out split.
"""

from __future__ import annotations

import random
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DataError(ValueError):
    """Bad training/evaluation data; the message names the path and what is wrong."""


def scan_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """List `root/<class>/<file>` images -> ([(path, class_index)], class_names), sorted, so the same
    folder always gives the same order and labels."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data path does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder in ImageFolder layout (root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders found (expected root/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    empty = []
    for idx, name in enumerate(classes):
        files = sorted(
            f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(name)
        samples.extend((f, idx) for f in files)
    if empty:
        raise DataError(
            f"{root}: class folders with no images ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}"
        )
    return samples, classes


def holdout_split(
    samples: list[tuple[Path, int]], holdout: int | float, seed: int = 0
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Seeded, class-stratified split -> (train, held_out). `holdout` is a count (e.g. 5000) or a
    fraction (e.g. 0.1); each class gives the same share. Deterministic for a seed."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    n = len(samples)
    frac = holdout / n if isinstance(holdout, int) and holdout >= 1 else float(holdout)
    if not 0 < frac < 1:
        raise DataError(f"hold-out must leave both splits non-empty; got {holdout} of {n} samples")
    rng = random.Random(seed)
    train, held = [], []
    for cls in sorted(by_class):
        items = list(by_class[cls])
        rng.shuffle(items)
        k = max(1, round(len(items) * frac))
        if k >= len(items):
            raise DataError(f"class {cls} has {len(items)} images: too few to hold out {k}")
        held.extend(items[:k])
        train.extend(items[k:])
    return train, held
