"""Retrieval quality by label agreement: precision@k and mean average precision.

A neighbour is relevant when its label equals the query's (the standard image-retrieval protocol on a labelled
collection: held-out queries against an index of the training images). Pure functions over labels, so they
score any search: an index's `search`, exact k-NN, another system's results.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _relevance(
    query_labels: Sequence[Hashable], neighbour_labels: Sequence[Sequence[Hashable]]
) -> list[np.ndarray]:
    if len(query_labels) != len(neighbour_labels):
        raise ValueError(f"{len(query_labels)} query labels but {len(neighbour_labels)} neighbour lists")
    if not len(query_labels):
        raise ValueError("no queries")
    if any(q is None for q in query_labels):
        raise ValueError("every query needs a label: relevance is label agreement")
    return [
        np.array([n == q for n in row], dtype=bool)
        for q, row in zip(query_labels, neighbour_labels, strict=True)
    ]


def precision_at_k(
    query_labels: Sequence[Hashable], neighbour_labels: Sequence[Sequence[Hashable]], k: int
) -> float:
    """Mean over queries of (relevant among the first k neighbours) / k. A list shorter than k counts its
    missing places as not relevant."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rel = _relevance(query_labels, neighbour_labels)
    return float(np.mean([r[:k].sum() / k for r in rel]))


def average_precision(relevant: Sequence[bool], num_relevant: int | None = None) -> float:
    """AP of one ranked list: sum over relevant ranks i of precision@i, divided by min(num_relevant, list
    length) when the number of relevant items in the collection is known (the full AP when the whole
    collection is ranked), else by the number of relevant items retrieved. 0 when nothing relevant exists."""
    r = np.asarray(relevant, dtype=bool)
    hits = np.cumsum(r)
    precisions = hits[r] / (np.flatnonzero(r) + 1)  # precision@i at each relevant rank i (1-based)
    denom = min(num_relevant, len(r)) if num_relevant is not None else int(r.sum())
    return float(precisions.sum() / denom) if denom > 0 else 0.0


def mean_average_precision(
    query_labels: Sequence[Hashable],
    neighbour_labels: Sequence[Sequence[Hashable]],
    num_relevant: Sequence[int] | None = None,
) -> float:
    """mAP of label agreement over the neighbour lists (mAP@k for lists of length k). `num_relevant[q]`: how
    many items in the collection share query q's label (excluding q itself when it is in the collection);
    see `average_precision` for the normalisation."""
    rel = _relevance(query_labels, neighbour_labels)
    if num_relevant is not None and len(num_relevant) != len(rel):
        raise ValueError(f"{len(num_relevant)} relevant counts for {len(rel)} queries")
    counts = num_relevant if num_relevant is not None else [None] * len(rel)
    return float(np.mean([average_precision(r, c) for r, c in zip(rel, counts, strict=True)]))
