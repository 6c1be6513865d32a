"""Pure metrics: top-k accuracy (the one top-k code the trainer's in-loop evaluation also uses), per-class
accuracy, weighted k-NN votes.

Accuracies are percentages (0-100) everywhere in supmae: the paper, the evaluator's tables, the robustness
errors and mCE are all percentages, and so is what the trainer writes into the model card
(`holdout_top1: 65.98`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import EvalError


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many rows have their label among the k largest logits, for each k (capped at the class count):
    a (len(ks),) int64 tensor on the logits' device. No host sync, so a loop can sum it over batches (and
    processes) before turning it into a percentage with `percent`."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top == labels.to(top.device)[:, None]  # (N, maxk)
    return torch.stack([hit[:, : min(k, maxk)].any(1).sum() for k in ks])


def percent(correct: float, total: float) -> float:
    """100 * correct / total, the one formula every accuracy in supmae goes through."""
    return 100.0 * correct / total


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the k largest logits (k capped at the class count)."""
    if len(labels) == 0:
        raise EvalError("no predictions to score")
    hits = topk_correct(logits, labels, ks).tolist()
    return {k: percent(h, len(labels)) for k, h in zip(ks, hits, strict=True)}  # exact ratio


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    out = []
    for c in range(num_classes):
        m = labels == c
        out.append(percent((pred[m] == c).sum().item(), m.sum().item()) if m.any() else None)
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
