"""What is evaluated: an ImageFolder split (`DataSpec` -> `Split`), its classes matched to the model's, and the
images read exactly as serving reads them (`ImageDataset`)."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from supmae_serve.model import ModelCard
from supmae_serve.preprocess import ImageError, ImageLimits, decode_image, resize_crop
from training.corruptions import corrupt, item_rng
from training.data import holdout_split, scan_image_folder

from .errors import EvalError


@dataclass
class DataSpec:
    """An ImageFolder split (`root/<class>/<image>`).

    `holdout` selects the seeded, class-stratified hold-out of `root` (a count such as 5000 or a
    fraction such as 0.1), the same split the trainer holds out (`training.data.holdout_split`);
    "card" reads the count and seed from the checkpoint's model card. Its complement is the training
    part for knn / linprobe / fewshot / retrieval when no separate training folder is given.
    `max_per_class` keeps a seeded subset of each class (quick runs)."""

    root: str | os.PathLike
    holdout: int | float | str | None = None
    seed: int = 0
    max_per_class: int | None = None

    def tag(self) -> str:
        """A file-name-safe name of the split: `train-holdout5000-seed0`."""
        parts = [Path(self.root).name or "data"]
        if self.holdout is not None:
            parts.append(f"holdout{self.holdout}-seed{self.seed}")
        if self.max_per_class:
            parts.append(f"max{self.max_per_class}")
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(parts))

    def describe(self) -> str:
        text = str(self.root)
        if self.holdout is not None:
            text += f" (hold-out {self.holdout}, seed {self.seed})"
        if self.max_per_class:
            text += f" (at most {self.max_per_class} per class)"
        return text


@dataclass
class Split:
    samples: list[tuple[Path, int]]  # (path, index into class_names)
    class_names: list[str]
    rest: list[tuple[Path, int]] | None  # the complement of a hold-out: the trainer's training part
    spec: DataSpec


def _cap_per_class(samples: list[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    """A seeded subset of at most n images per class, in the original order."""
    by_class: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(samples):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    keep = set()
    for y in sorted(by_class):
        idx = list(by_class[y])
        rng.shuffle(idx)
        keep.update(idx[:n])
    return [s for i, s in enumerate(samples) if i in keep]


def load_split(spec: DataSpec) -> Split:
    """Scan `spec.root` and apply its hold-out and per-class cap. Errors name the path and the fix."""
    if spec.max_per_class is not None and spec.max_per_class < 1:
        raise EvalError(f"max per class must be >= 1, got {spec.max_per_class}")
    samples, names = scan_image_folder(spec.root)
    rest = None
    if spec.holdout is not None:
        if isinstance(spec.holdout, str):
            raise EvalError(f"hold-out {spec.holdout!r} was not resolved (use a count, a fraction or 'card')")
        rest, samples = holdout_split(samples, spec.holdout, spec.seed)
    if spec.max_per_class:
        samples = _cap_per_class(samples, spec.max_per_class, spec.seed)
        rest = _cap_per_class(rest, spec.max_per_class, spec.seed) if rest is not None else None
    if not samples:
        raise EvalError(f"{spec.describe()}: the split is empty")
    return Split(samples, names, rest, spec)


def parse_holdout(text: str | int | float | None) -> int | float | str | None:
    """'5000' -> 5000 (a count), '0.1' -> 0.1 (a fraction), 'card' -> 'card', None -> None."""
    if text is None or isinstance(text, (int, float)):
        return text
    if text == "card":
        return text
    try:
        value = float(text)
    except ValueError:
        raise EvalError(
            f"hold-out must be a count (5000), a fraction (0.1) or 'card', got {text!r}"
        ) from None
    if value >= 1:
        if value != int(value):
            raise EvalError(f"a hold-out count must be a whole number, got {text!r}")
        return int(value)
    if value <= 0:
        raise EvalError(f"hold-out must be > 0, got {text!r}")
    return value


def resolve_spec(spec: DataSpec, card: ModelCard, checkpoint: str) -> DataSpec:
    """Replace holdout='card' by the count and seed recorded in the model card's training section."""
    if spec.holdout != "card":
        return spec
    # supmae-train records the split it used in training.data (none when val_data replaced it, though
    # training.config still holds the recipe's count); other cards may give it at the top or in config
    data = card.training.get("data")
    sources = [data] if isinstance(data, Mapping) else [card.training, card.training.get("config") or {}]
    for src in sources:
        if isinstance(src, Mapping) and src.get("holdout"):
            holdout = parse_holdout(src["holdout"])
            if isinstance(holdout, float) and holdout >= 1:
                holdout = int(holdout)
            seed = int(src.get("holdout_seed", src.get("seed", 0)))
            return replace(spec, holdout=holdout, seed=seed)
    raise EvalError(
        f"{checkpoint}: the model card records no hold-out (training.holdout); "
        "pass the trainer's split explicitly, e.g. --holdout 5000 --seed 0"
    )


def map_classes(
    names: Sequence[str],
    target_names: Sequence[str],
    class_map: Mapping[str, str] | None = None,
    *,
    source: str = "eval set",
    target: str = "model",
) -> list[int]:
    """Index into `target_names` of each folder name (renamed through `class_map` first).

    Raises EvalError naming the folders that match no class."""
    lookup = {n: i for i, n in enumerate(target_names)}
    mapped, unknown = [], []
    for n in names:
        t = class_map.get(n, n) if class_map else n
        if t in lookup:
            mapped.append(lookup[t])
        else:
            unknown.append(n)
    if unknown:
        raise EvalError(
            f"{len(unknown)} of the {source}'s {len(names)} class folders match no class of the {target}: "
            f"{short(unknown)}. The {target}'s classes are: {short(list(target_names))}. Folders are "
            "matched to classes by name; pass a class map (JSON {folder: class name}) to rename them"
        )
    dup = sorted({target_names[i] for i in mapped if mapped.count(i) > 1})
    if dup:
        raise EvalError(f"several {source} folders map to the same {target} class: {short(dup)}")
    return mapped


def short(items: Sequence[str], n: int = 8) -> str:
    """The first n items, comma-separated, and how many more there are."""
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


class ImageDataset(Dataset):
    """(uint8 (3, S, S) image, label) from image files, cropped as the model card says and optionally
    corrupted. Normalisation happens on the batch (`preprocess.normalize`), on the device.

    `pixels`, when given, holds the already decoded and cropped images (N, S, S, 3) uint8 in memory;
    `passes` lists several (corruption, severity) passes over the images, one after the other."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        prep,
        *,
        pixels: np.ndarray | None = None,
        corruption: str | None = None,
        severity: int = 0,
        seed: int = 0,
        table: str = "auto",
        limits: ImageLimits = ImageLimits(),
        passes: Sequence[tuple[str | None, int]] | None = None,
    ):
        self.samples = list(samples)
        self.prep = prep
        self.pixels = pixels
        # one (corruption, severity) per pass over the images; item j is image j % N of pass j // N,
        # so one DataLoader (and one set of workers) streams every pass of a robustness run
        self.passes = list(passes) if passes is not None else [(corruption, severity)]
        self.seed = seed
        self.table = table
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples) * len(self.passes)

    def crop(self, i: int) -> np.ndarray:
        """Decode and resize + centre-crop image i exactly as serving does: (S, S, 3) uint8."""
        if self.pixels is not None:
            return self.pixels[i]
        path = self.samples[i][0]
        try:
            img = decode_image(Path(path).read_bytes(), self.limits)
        except ImageError as e:
            raise EvalError(f"{path}: {e}") from e
        except OSError as e:
            raise EvalError(f"{path}: cannot read ({e})") from e
        return np.asarray(resize_crop(img, self.prep), dtype=np.uint8)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        p, i = divmod(j, len(self.samples))
        corruption, severity = self.passes[p]
        arr = self.crop(i)  # (S, S, 3)
        if corruption and severity:
            # the draw depends on the image index, never on the pass order, batch or worker
            arr = corrupt(arr, corruption, severity, item_rng(self.seed, corruption, severity, i), self.table)
        return torch.tensor(arr).permute(2, 0, 1), self.samples[i][1]  # (3, S, S)
