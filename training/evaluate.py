"""The paper's evaluations as library functions: accuracy, k-NN, linear probe, few-shot, robustness.

Every task takes a checkpoint (a folder with model.safetensors + model.json) and an ImageFolder split,
reads images exactly as serving does (`supmae_serve.preprocess`: decode, the model card's resize and
centre crop, its mean/std), and returns an `EvalResult`: one summary row for tables (`summary`), the
full numbers (`details`) and the settings used (`config`). `save_result` writes it as JSON next to
the checkpoint and `update_card_metrics` records the summary in the model card. `supmae-eval`
(training/eval_cli.py) is a thin command line over these functions.

    accuracy    top-1/top-5 of the classification head; eval folders are mapped to the model's classes
                by name, and a subset of classes restricts the logits to that subset (ImageNet-A/-R)
    knn         weighted k-NN on L2-normalised embeddings (k=20, votes weighted exp(sim / 0.07), as
                in InstDisc and DINO)
    linprobe    standardised frozen features, a linear classifier fitted with full-batch L-BFGS
                (or minibatch Adam), L2 strength picked on a validation split unless given
    fewshot     k-shot linear probes (k = 5, 20, 50) over several seeds: mean +- std
    robustness  ImageNet-C-style corruptions on the fly (training/corruptions.py): per-corruption
                error, mean corruption error (mCE relative to a baseline when given), extra variant
                folders (ImageNet-A/-R/-Sketch style) and a combined score
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from supmae_serve.common.files import atomic_write_text
from supmae_serve.common.progress import track
from supmae_serve.common.system import resolve_device
from supmae_serve.common.versions import software_versions
from supmae_serve.model import CheckpointError, ModelCard, load_checkpoint
from supmae_serve.preprocess import ImageError, ImageLimits, decode_image, normalize, resize_crop
from training.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    CorruptionError,
    check_corruptions,
    check_table,
    corrupt,
    item_rng,
)
from training.data import DataError, batches, holdout_split, scan_image_folder

TASKS = ("accuracy", "knn", "linprobe", "fewshot", "robustness")
WD_GRID = (1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # L2 strengths tried (strong to weak)
DEFAULT_WD = 1e-3  # when no validation split can be made (one image per class)


class EvalError(ValueError):
    """Evaluation that cannot run as asked; the message says what was wrong and what is allowed."""


# ============================================================================ configuration
@dataclass
class DataSpec:
    """An ImageFolder split (`root/<class>/<image>`).

    `holdout` selects the seeded, class-stratified hold-out of `root` (a count such as 5000 or a
    fraction such as 0.1), the same split the trainer holds out (`training.data.holdout_split`);
    "card" reads the count and seed from the checkpoint's model card. Its complement is the training
    part for knn / linprobe / fewshot when no separate training folder is given. `max_per_class`
    keeps a seeded subset of each class (quick runs)."""

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
class RunConfig:
    """How to run: device, batching, workers. Shared by every task."""

    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    batch_size: int = 256
    workers: int = 0  # DataLoader worker processes decoding images
    amp: bool = False  # bf16 autocast on CUDA (fp32 otherwise)
    feature: str = "embedding"  # knn/linprobe/fewshot features: embedding (the card's pooling) | cls
    progress: bool = False  # progress bars on stderr
    cache_gb: float = 4.0  # robustness: keep decoded, cropped images in memory up to this size

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise EvalError(f"workers must be >= 0, got {self.workers}")
        if self.feature not in ("embedding", "cls"):
            raise EvalError(f"feature must be 'embedding' or 'cls', got {self.feature!r}")


@dataclass
class ProbeConfig:
    """The linear classifier of linprobe and fewshot: CE + weight_decay / 2 * |W|^2 on standardised
    features."""

    optimizer: str = "lbfgs"  # lbfgs (full batch) | adam (minibatches: bounded memory on very large sets)
    weight_decay: float | None = None  # None: pick from WD_GRID by accuracy on a validation split
    val_fraction: float = 0.2  # share of each class held out of the training features to pick it
    max_iter: int = 1000  # lbfgs iterations
    epochs: int = 100  # adam
    lr: float = 1e-3  # adam
    batch_size: int = 4096  # adam
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise EvalError(f"probe optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise EvalError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.val_fraction < 1:
            raise EvalError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


# ============================================================================ results
@dataclass
class EvalResult:
    task: str
    checkpoint: str
    name: str  # the row label in tables (default: the checkpoint path as given)
    summary: dict[str, Any]  # the headline numbers, in table order
    details: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # names the data split in file names and card keys
    created: str = ""
    software: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The summary row, then the task's detail table when it has one."""
        text = format_table(["checkpoint", *self.summary], [[self.name, *self.summary.values()]])
        if self.task == "robustness":
            text += "\n\n" + robustness_table(self)
        return text


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into a README) with columns padded to line up in a terminal."""
    cells = [[str(h) for h in headers]] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(r[i]) if i < len(r) else 1 for r in cells) for i in range(len(headers))]

    def line(r):
        padded = [(r[i] if i < len(r) else "-").ljust(widths[i]) for i in range(len(headers))]
        return "| " + " | ".join(padded) + " |"

    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def compare(results: Sequence[EvalResult]) -> str:
    """Side by side: one row per checkpoint, the union of their summary columns (in first-seen order)."""
    columns: list[str] = []
    for r in results:
        columns += [k for k in r.summary if k not in columns]
    rows = [[r.name, *(r.summary.get(c) for c in columns)] for r in results]
    return format_table(["checkpoint", *columns], rows)


def result_path(result: EvalResult) -> Path:
    """`<checkpoint folder>/eval/<task>-<tag>.json`."""
    return _checkpoint_dir(result.checkpoint) / "eval" / f"{result.task}-{result.tag}.json"


def save_result(result: EvalResult, path: str | os.PathLike | None = None) -> Path:
    """Write the result as JSON (atomically) next to its checkpoint, or to `path`."""
    out = Path(path) if path is not None else result_path(result)
    text = json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n"
    atomic_write_text(out, text)
    return out


def save_results(results: Sequence[EvalResult], path: str | os.PathLike) -> Path:
    """Write several results (a side-by-side run) to one JSON file: {"results": [...]}."""
    out = Path(path)
    text = json.dumps({"results": [r.to_dict() for r in results]}, indent=2, default=_json_default) + "\n"
    atomic_write_text(out, text)
    return out


def update_card_metrics(result: EvalResult) -> Path:
    """Record the summary in the checkpoint's model card under metrics["eval"]["<task>/<tag>"].

    Only model.json is rewritten (atomically, every other field kept as it was); the weights file is
    never touched."""
    card_path = _card_path(result.checkpoint)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{card_path}: cannot read the model card to update it ({e})") from e
    metrics = card.get("metrics") or {}
    evals = metrics.get("eval") or {}
    evals[f"{result.task}/{result.tag}"] = {**result.summary, "data": result.data, "created": result.created}
    metrics["eval"] = evals
    card["metrics"] = metrics
    ModelCard.from_dict(json.loads(json.dumps(card, default=_json_default)), source=str(card_path))
    atomic_write_text(card_path, json.dumps(card, indent=2, default=_json_default) + "\n")
    return card_path


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def _checkpoint_dir(checkpoint: str | os.PathLike) -> Path:
    p = Path(checkpoint)
    return p if p.is_dir() else p.parent


def _card_path(checkpoint: str | os.PathLike) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        return p / "model.json"
    if p.suffix == ".json":
        return p
    return p.with_suffix(".json") if p.with_suffix(".json").exists() else p.with_name("model.json")


# ============================================================================ data
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


def _resolve_spec(spec: DataSpec, card: ModelCard, checkpoint: str) -> DataSpec:
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
            f"{_short(unknown)}. The {target}'s classes are: {_short(list(target_names))}. Folders are "
            "matched to classes by name; pass a class map (JSON {folder: class name}) to rename them"
        )
    dup = sorted({target_names[i] for i in mapped if mapped.count(i) > 1})
    if dup:
        raise EvalError(f"several {source} folders map to the same {target} class: {_short(dup)}")
    return mapped


def _short(items: Sequence[str], n: int = 8) -> str:
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


# ============================================================================ model running
@dataclass
class Loaded:
    model: torch.nn.Module
    card: ModelCard
    path: str
    name: str
    device: torch.device


def load(checkpoint: str | os.PathLike, run: RunConfig, name: str | None = None) -> Loaded:
    device = resolve_device(run.device, EvalError)
    model, card = load_checkpoint(checkpoint, device=device)
    return Loaded(model, card, str(checkpoint), name or str(checkpoint), device)


def _require_head(loaded: Loaded, task: str) -> list[str]:
    cfg = loaded.card.config
    if not cfg.has_head:
        raise EvalError(
            f"{loaded.path}: {task} needs a classification head, but this is a {cfg.framework!r} checkpoint "
            f"without one (num_classes={cfg.num_classes}); evaluate its features with knn, linprobe or "
            "fewshot instead"
        )
    names = loaded.card.class_names
    if not names:
        raise EvalError(
            f"{loaded.path}: the model card has no class_names, so eval folders cannot be matched to the "
            f'head\'s {cfg.num_classes} classes; add "class_names" to model.json'
        )
    return list(names)


def _batches(dataset: Dataset, run: RunConfig, device: torch.device, desc: str):
    """Batches of `dataset` in order, decoded by `run.workers` processes; an error reading an image
    (named) is raised as itself, not as the DataLoader's re-raised worker traceback."""
    return track(
        batches(
            dataset,
            (EvalError, CorruptionError),
            batch_size=run.batch_size,
            shuffle=False,
            num_workers=run.workers,
            pin_memory=device.type == "cuda",
        ),
        total=math.ceil(len(dataset) / run.batch_size),
        desc=desc,
        enabled=run.progress,
    )


@dataclass
class Outputs:
    labels: torch.Tensor  # (N,) int64
    embeddings: torch.Tensor | None = None  # (N, D) float32 on the CPU
    logits: torch.Tensor | None = None  # (N, C) float32 on the CPU


@torch.no_grad()  # not inference_mode: the features feed the linear probe's autograd
def run_model(
    loaded: Loaded, dataset: ImageDataset, run: RunConfig, *, logits: bool, embeddings: bool, desc: str = ""
) -> Outputs:
    """One pass over a dataset -> labels and the requested outputs, in dataset order."""
    if len(dataset) == 0:
        raise EvalError(f"{desc or 'evaluation'}: no images to evaluate")
    prep, dev = loaded.card.preprocessing, loaded.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if run.amp and dev.type == "cuda" else nullcontext()
    ys, embs, outs = [], [], []
    for x, y in _batches(dataset, run, dev, desc):
        x = normalize(x.to(dev, non_blocking=True), prep)  # uint8 (N, 3, S, S) -> normalised float32
        with amp:
            f = loaded.model.forward_features(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
        if embeddings:
            e = f.embedding if run.feature == "embedding" else f.cls_token
            embs.append(e.float().cpu())
        if logits:
            outs.append(f.logits.float().cpu())
    return Outputs(
        labels=torch.cat(ys),
        embeddings=torch.cat(embs) if embeddings else None,
        logits=torch.cat(outs) if logits else None,
    )


@torch.no_grad()
def top1_hits_per_pass(
    loaded: Loaded, dataset: ImageDataset, cols: Sequence[int], run: RunConfig, desc: str
) -> np.ndarray:
    """Stream a multi-pass dataset through the head -> correct top-1 predictions per pass (no logits
    kept, so memory does not grow with the number of passes). `cols`: the head's column of each eval
    folder; the arg-max is taken over those columns only."""
    n, prep, dev = len(dataset.samples), loaded.card.preprocessing, loaded.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if run.amp and dev.type == "cuda" else nullcontext()
    cols_t = torch.as_tensor(list(cols), device=dev)
    hits = np.zeros(len(dataset.passes), dtype=np.int64)
    start = 0
    for x, y in _batches(dataset, run, dev, desc):
        x = normalize(x.to(dev, non_blocking=True), prep)  # (B, 3, S, S)
        with amp:
            logits = loaded.model.forward_features(x).logits.float()  # (B, classes)
        pred = logits[:, cols_t].argmax(1).cpu()  # (B,) index of the eval folder
        np.add.at(hits, (start + np.arange(len(y))) // n, (pred == y).numpy())
        start += len(y)
    return hits


def decode_all(dataset: ImageDataset, run: RunConfig, desc: str = "decode") -> np.ndarray:
    """Decode and crop every image once: (N, S, S, 3) uint8 (for the many passes of robustness)."""
    s = dataset.prep.image_size
    out = np.empty((len(dataset), s, s, 3), dtype=np.uint8)
    i = 0
    for x, _ in _batches(dataset, run, torch.device("cpu"), desc):
        out[i : i + len(x)] = x.permute(0, 2, 3, 1).numpy()
        i += len(x)
    return out


# ============================================================================ metrics (pure)
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the k largest logits (k capped at the class count)."""
    if len(labels) == 0:
        raise EvalError("no predictions to score")
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top == labels[:, None]  # (N, maxk)
    return {k: 100.0 * hit[:, : min(k, maxk)].any(1).sum().item() / len(labels) for k in ks}  # exact ratio


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    out = []
    for c in range(num_classes):
        m = labels == c
        out.append(100.0 * (pred[m] == c).sum().item() / m.sum().item() if m.any() else None)
    return out


def knn_votes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class votes (N_test, C): cosine similarity to the k nearest training points,
    each voting exp(sim / temperature) for its label (Wu et al. 2018; DINO's eval_knn)."""
    if k < 1 or temperature <= 0:
        raise EvalError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_x.float(), dim=1)
    test = F.normalize(test_x.float(), dim=1)
    k = min(k, len(train))
    votes = []
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # (B, N_train)
        s, idx = sim.topk(k, dim=1)  # (B, k)
        w = (s / temperature).exp()  # (B, k)
        v = torch.zeros(len(s), num_classes, device=s.device, dtype=w.dtype)
        votes.append(v.scatter_add_(1, train_y.to(s.device)[idx], w))  # (B, C)
    return torch.cat(votes)


@dataclass
class LinearProbe:
    """Standardise, then a linear layer: logits = ((x - mean) / std) @ weight + bias."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    weight_decay: float
    selection: dict = field(default_factory=dict)  # validation top-1 and loss per L2 strength tried

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float32)
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def _fit_linear(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    wd: float,
    cfg: ProbeConfig,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE(z @ W + b, y) + wd / 2 * |W|^2, from zero or `init` (a warm start along the
    weight-decay grid). The problem is convex, so the start changes the iterations, not the answer."""
    if init is None:
        w = torch.zeros(z.shape[1], num_classes, device=z.device)
        b = torch.zeros(num_classes, device=z.device)
    else:
        w, b = (t.detach().clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def objective(zb, yb):
        return F.cross_entropy(zb @ w + b, yb) + 0.5 * wd * (w * w).sum()

    if cfg.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=cfg.max_iter,
            history_size=20,
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = objective(z, y)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
    else:
        opt = torch.optim.Adam([w, b], lr=cfg.lr)
        steps_per_epoch = math.ceil(len(z) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                perm = torch.randperm(len(z), generator=gen).to(z.device)
                for start in range(0, len(z), cfg.batch_size):
                    idx = perm[start : start + cfg.batch_size]
                    opt.zero_grad()
                    objective(z[idx], y[idx]).backward()
                    opt.step()
                    sched.step()
    return w.detach(), b.detach()


def _stratified_val(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `fraction` of each class with >= 2 items goes to val (at least one)."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    labels = y.cpu().numpy()
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(len(idx) * fraction)) if len(idx) >= 2 else 0
        va.extend(idx[:n_val])
        tr.extend(idx[n_val:])
    return torch.as_tensor(sorted(tr), dtype=torch.long), torch.as_tensor(sorted(va), dtype=torch.long)


@contextmanager
def _few_threads_for_small_cpu_work(device: torch.device, numel: int):
    """Intra-op threads only slow down the many tiny matmuls of a small probe (few-shot: hundreds of
    rows), badly so on a busy machine: use one thread for those, restored afterwards."""
    if device.type != "cpu" or numel > 1 << 21:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Fit a linear probe on frozen features (on `device`). Features are standardised with the
    training mean and std; without a given weight decay, each of WD_GRID is fitted on a stratified
    split of the training features, and the one with the best accuracy on the held-out part (ties:
    the lower cross-entropy there) is refitted on all of them."""
    if len(train_x) == 0:
        raise EvalError("linear probe: no training features")
    device = torch.device(device)
    with _few_threads_for_small_cpu_work(device, train_x.numel()):
        return _fit_linear_probe(
            train_x.to(device, torch.float32), train_y.to(device, torch.long), num_classes, cfg
        )


def _fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> LinearProbe:
    device = x.device
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    wd, selection = cfg.weight_decay, {}
    if wd is None:
        tr, va = _stratified_val(y, cfg.val_fraction, cfg.seed)
        tr, va = tr.to(device), va.to(device)
        if len(va) == 0 or len(tr) == 0:
            wd, selection = DEFAULT_WD, {"note": "too few images per class for a validation split"}
        else:
            best, params = None, None
            for cand in WD_GRID:  # strong to weak, each fit starting from the previous solution
                params = _fit_linear(z[tr], y[tr], num_classes, cand, cfg, init=params)
                w, b = params
                with torch.no_grad():
                    val_logits = z[va] @ w + b
                    acc = 100.0 * (val_logits.argmax(1) == y[va]).sum().item() / len(va)
                    loss = F.cross_entropy(val_logits, y[va]).item()
                selection[f"{cand:g}"] = {"val_top1": acc, "val_loss": loss}
                if best is None or (acc, -loss) > best[0]:  # accuracy first, then the lower loss
                    best = ((acc, -loss), cand)
            wd = best[1]
    w, b = _fit_linear(z, y, num_classes, wd, cfg)
    return LinearProbe(mean, std, w, b, float(wd), selection)


def sample_few_shot(
    labels: Sequence[int], k: int, seed: int, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """Exactly k indices per class, drawn without replacement with a seeded generator (sorted)."""
    if k < 1:
        raise EvalError(f"shots must be >= 1, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            name = class_names[c] if class_names is not None else c
            raise EvalError(f"class {name!r} has {len(idx)} training images; {k}-shot needs at least {k}")
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def mean_corruption_error(
    errors: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]] | None = None,
    clean_error: float | None = None,
    baseline_clean_error: float | None = None,
) -> dict[str, Any]:
    """Corruption errors (percent, per corruption the errors at each severity) -> summary numbers.

    - mean_error: the plain mean over corruptions and severities (no baseline needed).
    - with a baseline, Hendrycks & Dietterich's CE_c = sum_s E_s,c / sum_s E^base_s,c, mCE = mean_c CE_c,
      and relative CE_c = sum_s (E_s,c - E_clean) / sum_s (E^base_s,c - E^base_clean)."""
    names = list(errors)
    if not names:
        raise EvalError("no corruption errors to summarise")
    out: dict[str, Any] = {
        "mean_error": float(np.mean([np.mean(errors[n]) for n in names])),
        "corruption_mean_error": {n: float(np.mean(errors[n])) for n in names},
    }
    if baseline is None:
        return out
    missing = [n for n in names if n not in baseline]
    if missing:
        raise EvalError(f"the baseline has no errors for {missing}; it must cover the same corruptions")
    ce, rce = {}, {}
    for n in names:
        e, eb = np.asarray(errors[n], float), np.asarray(baseline[n], float)
        if e.shape != eb.shape:
            raise EvalError(f"{n}: {len(e)} severities evaluated but the baseline has {len(eb)}")
        if eb.sum() <= 0:
            raise EvalError(f"{n}: the baseline makes no errors, so the corruption error is undefined")
        ce[n] = 100.0 * e.sum() / eb.sum()
        if clean_error is not None and baseline_clean_error is not None:
            denom = (eb - baseline_clean_error).sum()
            rce[n] = 100.0 * (e - clean_error).sum() / denom if denom > 0 else float("nan")
    out["ce"] = ce
    out["mCE"] = float(np.mean(list(ce.values())))
    if rce:
        out["relative_ce"] = rce
        out["relative_mCE"] = float(np.mean(list(rce.values())))
    return out


def combined_score(corruption_error: float, variant_top1: Mapping[str, float]) -> float:
    """The poster's robustness summary: mean of (100 - corruption error) and each variant's top-1."""
    return float(np.mean([100.0 - corruption_error, *variant_top1.values()]))


# ============================================================================ tasks
def _result(task, loaded, summary, details, config, data, tag) -> EvalResult:
    return EvalResult(
        task=task,
        checkpoint=loaded.path,
        name=loaded.name,
        summary=summary,
        details=details,
        config=config,
        data=data,
        tag=tag,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        software=software_versions(),
    )


def _head_outputs(
    loaded: Loaded, split: Split, class_map, run: RunConfig, desc: str, dataset: ImageDataset | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Logits restricted to the eval set's classes, labels indexing those columns, and the columns."""
    model_names = _require_head(loaded, "accuracy")
    cols = map_classes(split.class_names, model_names, class_map, source=f"eval set {split.spec.root}")
    ds = dataset or ImageDataset(split.samples, loaded.card.preprocessing)
    out = run_model(loaded, ds, run, logits=True, embeddings=False, desc=desc)
    # folder c is model class cols[c]; a subset keeps only those columns (ImageNet-A/-R evaluation),
    # so column j of the restricted logits is eval folder j and the folder labels index it directly
    logits = out.logits if cols == list(range(len(model_names))) else out.logits[:, cols]
    return logits, out.labels, cols


def evaluate_accuracy(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    *,
    class_map: Mapping[str, str] | None = None,
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """Top-1 / top-5 of the classification head on an ImageFolder split.

    Eval folders are matched to the model's classes by name (through `class_map` if given); when they
    are a subset, the prediction is the arg-max over that subset's logits, as ImageNet-A and
    ImageNet-R (200 of the 1000 classes) are scored."""
    t0 = time.perf_counter()
    loaded = load(checkpoint, run, name)
    model_names = _require_head(loaded, "accuracy")
    spec = _resolve_spec(data, loaded.card, loaded.path)
    split = load_split(spec)
    logits, labels, cols = _head_outputs(loaded, split, class_map, run, "accuracy")
    acc = topk_accuracy(logits, labels, (1, 5))
    per_class = per_class_accuracy(logits.argmax(1), labels, len(cols))
    present = [a for a in per_class if a is not None]
    subset = len(cols) < len(model_names)
    summary = {
        "images": len(labels),
        "classes": len(cols) if not subset else f"{len(cols)} of {len(model_names)}",
        "top-1": acc[1],
        f"top-{min(5, len(cols))}": acc[5],
        "mean per-class": float(np.mean(present)),
    }
    details = {
        "top1": acc[1],
        "top5": acc[5],
        "top5_k": min(5, len(cols)),
        "mean_per_class": float(np.mean(present)),
        "per_class": dict(zip(split.class_names, per_class, strict=True)),
        "images": len(labels),
        "class_subset": [model_names[c] for c in cols] if subset else None,
        "seconds": time.perf_counter() - t0,
    }
    return _result(
        "accuracy",
        loaded,
        summary,
        details,
        {"class_map": dict(class_map) if class_map else None, "run": asdict(run)},
        {"eval": spec.describe()},
        spec.tag(),
    )


def _train_test(
    loaded: Loaded, data: DataSpec, train: DataSpec | None, task: str
) -> tuple[Split, Split, list[int], str]:
    """The training and test splits of a feature task, the test folders mapped onto training classes,
    and the result's tag. Without `train`, `data`'s hold-out is the test set and its complement the
    training set (the trainer's split)."""
    spec = _resolve_spec(data, loaded.card, loaded.path)
    test = load_split(spec)
    if train is None:
        if test.rest is None:
            raise EvalError(
                f"{task} needs labelled training images: pass a training folder (--train-data PATH), or a "
                "hold-out (--holdout 5000 --seed 0) to split --data into a training part and a held-out test part"
            )
        train_split = Split(test.rest, test.class_names, None, spec)
        tag = spec.tag()
    else:
        train_split = load_split(replace(train, holdout=None))
        overlap = {str(p.resolve()) for p, _ in train_split.samples} & {
            str(p.resolve()) for p, _ in test.samples
        }
        if overlap:
            raise EvalError(
                f"{len(overlap)} images are in both the training set ({train.root}) and the test set "
                f"({data.root}), e.g. {sorted(overlap)[0]}; use separate folders, or one folder with --holdout"
            )
        tag = f"{spec.tag()}-from-{train.tag()}"
    cols = map_classes(test.class_names, train_split.class_names, source="test set", target="training set")
    return train_split, test, cols, tag


def _features(loaded: Loaded, samples, run: RunConfig, desc: str) -> Outputs:
    return run_model(
        loaded,
        ImageDataset(samples, loaded.card.preprocessing),
        run,
        logits=False,
        embeddings=True,
        desc=desc,
    )


def evaluate_knn(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """Weighted k-NN classification of the test split by the training split's embeddings."""
    t0 = time.perf_counter()
    loaded = load(checkpoint, run, name)
    train_split, test, cols, tag = _train_test(loaded, data, train, "knn")
    tr = _features(loaded, train_split.samples, run, "knn train")
    te = _features(loaded, test.samples, run, "knn test")
    test_y = torch.as_tensor(cols)[te.labels]  # test folder -> training class
    votes = knn_votes(
        tr.embeddings.to(loaded.device),
        tr.labels.to(loaded.device),
        te.embeddings.to(loaded.device),
        len(train_split.class_names),
        k,
        temperature,
    ).cpu()
    acc = topk_accuracy(votes, test_y, (1, 5))
    summary = {"train": len(tr.labels), "test": len(te.labels), "k": k, "top-1": acc[1], "top-5": acc[5]}
    details = {"top1": acc[1], "top5": acc[5], "seconds": time.perf_counter() - t0}
    config = {"k": k, "temperature": temperature, "run": asdict(run)}
    data_d = {"test": test.spec.describe(), "train": (train or test.spec).describe()}
    return _result("knn", loaded, summary, details, config, data_d, tag)


def evaluate_linprobe(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    probe: ProbeConfig = ProbeConfig(),
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """A linear classifier on frozen, standardised features: train and test top-1."""
    t0 = time.perf_counter()
    loaded = load(checkpoint, run, name)
    train_split, test, cols, tag = _train_test(loaded, data, train, "linprobe")
    tr = _features(loaded, train_split.samples, run, "linprobe train")
    te = _features(loaded, test.samples, run, "linprobe test")
    t1 = time.perf_counter()
    clf = fit_linear_probe(tr.embeddings, tr.labels, len(train_split.class_names), probe, loaded.device)
    fit_s = time.perf_counter() - t1
    test_y = torch.as_tensor(cols)[te.labels]
    train_acc = topk_accuracy(clf.logits(tr.embeddings).cpu(), tr.labels, (1,))[1]
    test_acc = topk_accuracy(clf.logits(te.embeddings).cpu(), test_y, (1, 5))
    summary = {
        "train": len(tr.labels),
        "test": len(te.labels),
        "weight decay": f"{clf.weight_decay:g}",
        "train top-1": train_acc,
        "test top-1": test_acc[1],
    }
    details = {
        "train_top1": train_acc,
        "test_top1": test_acc[1],
        "test_top5": test_acc[5],
        "weight_decay": clf.weight_decay,
        "weight_decay_selection": clf.selection,
        "fit_seconds": fit_s,
        "seconds": time.perf_counter() - t0,
    }
    config = {"probe": asdict(probe), "run": asdict(run)}
    data_d = {"test": test.spec.describe(), "train": (train or test.spec).describe()}
    return _result("linprobe", loaded, summary, details, config, data_d, tag)


def evaluate_fewshot(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    train: DataSpec | None = None,
    *,
    shots: Sequence[int] = (5, 20, 50),
    seeds: Sequence[int] = (0, 1, 2),
    probe: ProbeConfig = ProbeConfig(),
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """k-shot linear probes: for each k and seed, exactly k training images per class, a probe fitted
    on their features, top-1 on the whole test split; mean +- std over seeds."""
    t0 = time.perf_counter()
    if not shots or not seeds:
        raise EvalError("fewshot needs at least one shot count and one seed")
    loaded = load(checkpoint, run, name)
    train_split, test, cols, tag = _train_test(loaded, data, train, "fewshot")
    labels = [y for _, y in train_split.samples]
    picks = {(k, s): sample_few_shot(labels, k, s, train_split.class_names) for k in shots for s in seeds}
    union = np.unique(np.concatenate(list(picks.values())))  # features only for images some run uses
    pos = {int(i): j for j, i in enumerate(union)}
    tr = _features(loaded, [train_split.samples[i] for i in union], run, "fewshot train")
    te = _features(loaded, test.samples, run, "fewshot test")
    test_y = torch.as_tensor(cols)[te.labels]
    per_k: dict[str, dict] = {}
    for k in shots:
        accs = []
        for s in seeds:
            rows = torch.as_tensor([pos[int(i)] for i in picks[(k, s)]])
            clf = fit_linear_probe(
                tr.embeddings[rows],
                tr.labels[rows],
                len(train_split.class_names),
                replace(probe, seed=s),
                loaded.device,
            )
            accs.append(topk_accuracy(clf.logits(te.embeddings).cpu(), test_y, (1,))[1])
        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        per_k[str(k)] = {"mean": float(np.mean(accs)), "std": std, "top1_per_seed": accs}
    summary = {"test": len(te.labels), "seeds": len(seeds)}
    summary.update({f"{k}-shot": f"{per_k[str(k)]['mean']:.2f} ± {per_k[str(k)]['std']:.2f}" for k in shots})
    details = {"shots": per_k, "seconds": time.perf_counter() - t0}
    config = {"shots": list(shots), "seeds": list(seeds), "probe": asdict(probe), "run": asdict(run)}
    data_d = {"test": test.spec.describe(), "train": (train or test.spec).describe()}
    return _result("fewshot", loaded, summary, details, config, data_d, tag)


def _read_baseline_json(path: Path) -> tuple[dict, float | None]:
    """Baseline corruption errors from a JSON file: a robustness result of this tool, or a plain
    {corruption: [error at severity 1, ..., 5]} table (e.g. AlexNet's ImageNet-C errors)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot read baseline errors ({e})") from e
    if isinstance(d, dict) and isinstance(d.get("details"), dict) and "errors" in d["details"]:
        return d["details"]["errors"], d["details"].get("clean_error")
    if isinstance(d, dict) and "errors" in d:
        return d["errors"], d.get("clean_error")
    if isinstance(d, dict) and all(isinstance(v, list) for v in d.values()):
        return d, None
    raise EvalError(
        f"{path}: expected a robustness result or a JSON object {{corruption: [errors per severity]}}"
    )


def evaluate_robustness(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    corruption_seed: int = 0,
    table: str = "auto",
    baseline: str | os.PathLike | EvalResult | None = None,
    variants: Mapping[str, DataSpec] | None = None,
    class_map: Mapping[str, str] | None = None,
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """The classification head under ImageNet-C-style corruptions applied on the fly to `data`, plus
    any variant folders (`{"imagenet-r": DataSpec(...)}`, class subsets allowed).

    Errors are percentages (100 - top-1). The corruption score is the mCE relative to `baseline` (a
    checkpoint, evaluated here the same way; its robustness result; or a JSON file of its errors) when
    given, else the mean error;
    `combined` = mean(100 - corruption score, each variant's top-1), the poster's summary."""
    t0 = time.perf_counter()
    corruptions = check_corruptions(corruptions)
    check_table(table)
    severities = tuple(severities)
    if not severities or any(not 1 <= int(s) <= 5 for s in severities):
        raise EvalError(f"severities must be in 1-5, got {list(severities)}")
    loaded = load(checkpoint, run, name)
    _require_head(loaded, "robustness")
    spec = _resolve_spec(data, loaded.card, loaded.path)
    split = load_split(spec)
    prep = loaded.card.preprocessing

    # the baseline first: a bad one fails before the long run
    base_errors = base_clean = base_info = None
    if isinstance(baseline, EvalResult):  # evaluated already (the CLI does it once for many models)
        if baseline.task != "robustness":
            raise EvalError(f"the baseline must be a robustness result, got a {baseline.task!r} result")
        same = baseline.config.get("severities") == list(severities) and all(
            c in baseline.details["errors"] for c in corruptions
        )
        same = same and baseline.config.get("corruption_seed") == corruption_seed
        if not same or baseline.config.get("table") != table:
            raise EvalError(
                "the baseline result was computed with other corruptions, severities, seed or table"
            )
        base_errors, base_clean = baseline.details["errors"], baseline.details["clean_error"]
        base_info = {"source": baseline.checkpoint, "errors": base_errors, "clean_error": base_clean}
    elif baseline is not None:
        bpath = Path(baseline)
        if bpath.is_file() and bpath.suffix == ".json" and bpath.name != "model.json":
            base_errors, base_clean = _read_baseline_json(bpath)
            base_info = {"source": str(bpath)}
            bad = [c for c in corruptions if len(base_errors.get(c) or []) != len(severities)]
            if bad:
                raise EvalError(
                    f"{bpath}: the baseline needs {len(severities)} errors (one per severity) for each of "
                    f"{_short(bad)}; it has {', '.join(f'{c}: {len(base_errors.get(c) or [])}' for c in bad[:4])}"
                )
        else:
            b = evaluate_robustness(
                baseline,
                spec,
                corruptions=corruptions,
                severities=severities,
                corruption_seed=corruption_seed,
                table=table,
                class_map=class_map,
                run=run,
            )
            base_errors, base_clean = b.details["errors"], b.details["clean_error"]
            base_info = {"source": str(baseline), "errors": base_errors, "clean_error": base_clean}

    # decode + crop once; every corrupted pass reads the crops from memory when they fit
    base = ImageDataset(split.samples, prep)
    if len(base) * prep.image_size**2 * 3 <= run.cache_gb * 2**30:
        base.pixels = decode_all(base, run)

    cols = map_classes(
        split.class_names, _require_head(loaded, "robustness"), class_map, source=f"eval set {spec.root}"
    )
    passes = [(None, 0)] + [(c, s) for c in corruptions for s in severities]  # clean first
    ds = ImageDataset(
        split.samples, prep, pixels=base.pixels, passes=passes, seed=corruption_seed, table=table
    )
    top1 = 100.0 * top1_hits_per_pass(loaded, ds, cols, run, "robustness") / len(split.samples)
    clean_error = 100.0 - float(top1[0])
    errors: dict[str, list[float]] = {}
    for (c, _), t in zip(passes[1:], top1[1:], strict=True):
        errors.setdefault(c, []).append(100.0 - float(t))

    scores = mean_corruption_error(errors, base_errors, clean_error, base_clean)

    variant_top1 = {}
    for vname, vspec in (variants or {}).items():
        vsplit = load_split(_resolve_spec(vspec, loaded.card, loaded.path))
        logits, labels, _ = _head_outputs(loaded, vsplit, class_map, run, vname)
        variant_top1[vname] = topk_accuracy(logits, labels, (1,))[1]

    corruption_score = scores["mCE"] if baseline is not None else scores["mean_error"]
    score_name = "mCE" if baseline is not None else "mean corruption error"
    summary: dict[str, Any] = {"clean error": clean_error}
    summary.update({c: scores["corruption_mean_error"][c] for c in corruptions})
    summary[score_name] = corruption_score
    if "relative_mCE" in scores:
        summary["relative mCE"] = scores["relative_mCE"]
    summary.update({f"{v} top-1": a for v, a in variant_top1.items()})
    summary["combined"] = combined_score(corruption_score, variant_top1)
    details = {
        "clean_error": clean_error,
        "errors": errors,
        **scores,
        "corruption_score": corruption_score,
        "corruption_score_kind": "mCE" if baseline is not None else "mean_error",
        "variants_top1": variant_top1,
        "combined": summary["combined"],
        "baseline": base_info,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    config = {
        "corruptions": list(corruptions),
        "severities": list(severities),
        "corruption_seed": corruption_seed,
        "table": table,
        "class_map": dict(class_map) if class_map else None,
        "run": asdict(run),
    }
    data_d = {"eval": spec.describe(), "variants": {v: s.describe() for v, s in (variants or {}).items()}}
    return _result("robustness", loaded, summary, details, config, data_d, spec.tag())


def robustness_table(result: EvalResult) -> str:
    """Per-corruption errors at each severity (and CE against the baseline when there is one)."""
    d = result.details
    sev = result.config["severities"]
    has_ce = "ce" in d
    headers = ["corruption", *(f"s{s}" for s in sev), "mean"] + (["CE"] if has_ce else [])
    rows = []
    for c, errs in d["errors"].items():
        rows.append([c, *errs, float(np.mean(errs))] + ([d["ce"][c]] if has_ce else []))
    return format_table(headers, rows)


TASK_FUNCTIONS = {
    "accuracy": evaluate_accuracy,
    "knn": evaluate_knn,
    "linprobe": evaluate_linprobe,
    "fewshot": evaluate_fewshot,
    "robustness": evaluate_robustness,
}

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "TASKS",
    "CheckpointError",
    "DataError",
    "DataSpec",
    "EvalError",
    "EvalResult",
    "ImageDataset",
    "LinearProbe",
    "ProbeConfig",
    "RunConfig",
    "compare",
    "combined_score",
    "evaluate_accuracy",
    "evaluate_fewshot",
    "evaluate_knn",
    "evaluate_linprobe",
    "evaluate_robustness",
    "fit_linear_probe",
    "format_table",
    "knn_votes",
    "load_split",
    "map_classes",
    "mean_corruption_error",
    "sample_few_shot",
    "save_result",
    "save_results",
    "topk_accuracy",
    "update_card_metrics",
]
