"""The task registry: each `supmae-eval` task by name, with its function and its own options.

`supmae-eval` (training/eval_cli.py) builds one subcommand per entry and dispatches through it: the shared
options (checkpoints, data, running, output) are the CLI's; `train`, `probe` and `class_map` say which shared
inputs the function takes; `options` are the task's own flags, each naming the keyword it sets. A new task is
a module with an `evaluate_*` function plus one entry here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from supmae_serve.features.index import KINDS
from training.corruptions import CORRUPTIONS, TABLE_SIZES

from .accuracy import evaluate_accuracy
from .datasets import DataSpec
from .fewshot import evaluate_fewshot
from .knn import evaluate_knn
from .linprobe import evaluate_linprobe
from .results import EvalResult
from .retrieval import evaluate_retrieval
from .robustness import evaluate_robustness, parse_variants, shared_baseline


@dataclass(frozen=True)
class Option:
    """One command-line flag of a task: `argparse` keywords, and the function keyword it sets (`param`);
    `run=True` sets a RunConfig field instead. `convert(value, args)` turns the parsed value into what the
    function takes (args: the whole parsed command line)."""

    flags: tuple[str, ...]
    param: str
    argparse: Mapping[str, Any] = field(default_factory=dict)
    run: bool = False
    convert: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    function: Callable[..., EvalResult]
    help: str
    train: bool = False  # takes a training split (`train`; the CLI's --train-data)
    probe: bool = False  # takes a ProbeConfig (`probe`; the CLI's linear-probe options)
    class_map: bool = False  # takes `class_map` (the CLI's --class-map)
    options: tuple[Option, ...] = ()
    # work shared by every checkpoint of one command, done once: (keywords, data, checkpoints) -> keywords
    prepare: Callable[[dict, DataSpec, Sequence[str]], dict] | None = None


# ---------------------------------------------------------------------------- the tasks
_KNN_OPTIONS = (
    Option(("--k",), "k", {"type": int, "default": 20, "help": "neighbours (default 20)"}),
    Option(
        ("--temperature",),
        "temperature",
        {"type": float, "default": 0.07, "help": "vote weight exp(sim / T) (default 0.07)"},
    ),
)

REGISTRY: dict[str, Task] = {
    t.name: t
    for t in (
        Task("accuracy", evaluate_accuracy, "top-1/top-5 of the classification head", class_map=True),
        Task("knn", evaluate_knn, "weighted k-NN on normalised embeddings", train=True, options=_KNN_OPTIONS),
        Task(
            "linprobe",
            evaluate_linprobe,
            "linear classifier on frozen, standardised features",
            train=True,
            probe=True,
        ),
        Task(
            "fewshot",
            evaluate_fewshot,
            "k-shot linear probes, mean +- std over seeds",
            train=True,
            probe=True,
            options=(
                Option(
                    ("--shots",),
                    "shots",
                    {
                        "type": int,
                        "nargs": "+",
                        "default": [5, 20, 50],
                        "help": "images per class (default 5 20 50)",
                    },
                ),
                Option(
                    ("--seeds",),
                    "seeds",
                    {
                        "type": int,
                        "nargs": "+",
                        "default": [0, 1, 2],
                        "help": "sampling seeds (default 0 1 2)",
                    },
                ),
            ),
        ),
        Task(
            "robustness",
            evaluate_robustness,
            "ImageNet-C-style corruptions, variant folders, mCE, combined score",
            class_map=True,
            options=(
                Option(
                    ("--corruptions",),
                    "corruptions",
                    {
                        "nargs": "+",
                        "default": ["all"],
                        "metavar": "NAME",
                        "help": f"'all' (default) or some of: {', '.join(CORRUPTIONS)}",
                    },
                ),
                Option(
                    ("--severities",), "severities", {"type": int, "nargs": "+", "default": [1, 2, 3, 4, 5]}
                ),
                Option(
                    ("--corruption-seed",),
                    "corruption_seed",
                    {"type": int, "default": 0, "help": "seed of the random corruptions"},
                ),
                Option(
                    ("--table",),
                    "table",
                    {
                        "default": "auto",
                        "choices": ("auto", *TABLE_SIZES),
                        "help": "corruption parameter table (auto: by image size)",
                    },
                ),
                Option(
                    ("--baseline",),
                    "baseline",
                    {
                        "default": None,
                        "metavar": "CKPT|JSON",
                        "help": "report mCE relative to this checkpoint (evaluated the same way) or JSON of its errors",
                    },
                ),
                Option(
                    ("--variant",),
                    "variants",
                    {
                        "action": "append",
                        "default": [],
                        "metavar": "NAME=PATH",
                        "help": "an extra eval folder (ImageNet-A/-R/-Sketch style; class subsets allowed); repeatable",
                    },
                    convert=parse_variants,
                ),
                Option(
                    ("--cache-gb",),
                    "cache_gb",
                    {
                        "type": float,
                        "default": 4.0,
                        "help": "keep decoded images in memory up to this size (default 4)",
                    },
                    run=True,
                ),
            ),
            prepare=shared_baseline,
        ),
        Task(
            "retrieval",
            evaluate_retrieval,
            "precision@k and mAP of held-out queries against a FAISS index of the training images, with k-NN",
            train=True,
            options=(
                Option(
                    ("--precision-at",),
                    "precision_at",
                    {
                        "type": int,
                        "nargs": "+",
                        "default": [1, 10, 100],
                        "metavar": "K",
                        "help": "precision@K of label agreement for each K (default 1 10 100)",
                    },
                ),
                Option(
                    ("--map-at",),
                    "map_at",
                    {
                        "type": int,
                        "default": 100,
                        "metavar": "K",
                        "help": "mAP over the first K neighbours (default 100)",
                    },
                ),
                *_KNN_OPTIONS,
                Option(
                    ("--index",),
                    "index_kind",
                    {
                        "default": "auto",
                        "choices": KINDS,
                        "help": "FAISS index over the training features (auto: exact when small, as supmae-embed index)",
                    },
                ),
            ),
        ),
    )
}

TASKS = tuple(REGISTRY)
TASK_FUNCTIONS = {name: task.function for name, task in REGISTRY.items()}
