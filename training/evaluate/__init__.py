"""The paper's evaluations as library functions: accuracy, k-NN, linear probe, few-shot, robustness, retrieval.

Every task takes a checkpoint (a folder with model.safetensors + model.json) and an ImageFolder split,
reads images exactly as serving does (`supmae_serve.preprocess`: decode, the model card's resize and
centre crop, its mean/std), and returns an `EvalResult`: one summary row for tables (`summary`), the
full numbers (`details`) and the settings used (`config`). `save_result` writes it as JSON next to
the checkpoint and `update_card_metrics` records the summary in the model card. `supmae-eval`
(training/eval_cli.py) is a thin command line over the task registry (`registry.REGISTRY`).
Accuracies, errors, precisions and mAP are percentages (0-100), as the trainer's model-card metrics.

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
    retrieval   held-out queries against a FAISS index of the training images: precision@k and mAP of
                label agreement, next to the k-NN accuracy on the same features

The modules (the shape of big_vision's `evaluators/`):

    errors.py        EvalError
    datasets.py      DataSpec -> Split (hold-out, per-class cap), class matching, ImageDataset
    common.py        RunConfig, load, run_model / features / head_outputs, the feature tasks' train/test split
    metrics.py       top-k accuracy (also the trainer's in-loop evaluation), per-class accuracy, k-NN votes
    results.py       EvalResult, tables, compare, saving, update_card_metrics
    linear_probe.py  ProbeConfig, fit_linear_probe
    accuracy.py  knn.py  linprobe.py  fewshot.py  robustness.py  retrieval.py    one module per task
    registry.py      task name -> function + its options; what supmae-eval dispatches through
"""

from supmae_serve.model import CheckpointError
from training.corruptions import CORRUPTIONS, SEVERITIES
from training.data import DataError

from .accuracy import evaluate_accuracy
from .common import Loaded, Outputs, RunConfig, decode_all, features, load, run_model, top1_hits_per_pass
from .datasets import DataSpec, ImageDataset, Split, load_split, map_classes, parse_holdout
from .errors import EvalError
from .fewshot import evaluate_fewshot, sample_few_shot
from .knn import evaluate_knn
from .linear_probe import DEFAULT_WD, WD_GRID, LinearProbe, ProbeConfig, fit_linear_probe
from .linprobe import evaluate_linprobe
from .metrics import knn_votes, per_class_accuracy, percent, topk_accuracy, topk_correct
from .registry import REGISTRY, TASK_FUNCTIONS, TASKS, Option, Task
from .results import (
    EvalResult,
    compare,
    format_table,
    format_value,
    result_path,
    save_result,
    save_results,
    update_card_metrics,
)
from .retrieval import evaluate_retrieval
from .robustness import combined_score, evaluate_robustness, mean_corruption_error, robustness_table

# fewshot looks these two up here when it runs, so a caller can wrap them (see evaluate_fewshot)
_features = features

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_WD",
    "REGISTRY",
    "SEVERITIES",
    "TASKS",
    "TASK_FUNCTIONS",
    "CheckpointError",
    "DataError",
    "DataSpec",
    "EvalError",
    "EvalResult",
    "ImageDataset",
    "LinearProbe",
    "Loaded",
    "Option",
    "Outputs",
    "ProbeConfig",
    "RunConfig",
    "Split",
    "Task",
    "WD_GRID",
    "combined_score",
    "compare",
    "decode_all",
    "evaluate_accuracy",
    "evaluate_fewshot",
    "evaluate_knn",
    "evaluate_linprobe",
    "evaluate_retrieval",
    "evaluate_robustness",
    "features",
    "fit_linear_probe",
    "format_table",
    "format_value",
    "knn_votes",
    "load",
    "load_split",
    "map_classes",
    "mean_corruption_error",
    "parse_holdout",
    "per_class_accuracy",
    "percent",
    "result_path",
    "robustness_table",
    "run_model",
    "sample_few_shot",
    "save_result",
    "save_results",
    "top1_hits_per_pass",
    "topk_accuracy",
    "topk_correct",
    "update_card_metrics",
]
