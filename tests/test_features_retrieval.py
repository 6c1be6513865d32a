"""precision@k and mAP of label agreement against values computed by hand."""

from __future__ import annotations

import pytest

from supmae_serve.features.retrieval import average_precision, mean_average_precision, precision_at_k

QUERIES = ["a", "b"]
NEIGHBOURS = [["a", "b", "a", "a"], ["a", "a", "b", "c"]]  # relevant: 1 0 1 1 | 0 0 1 0


def test_precision_at_k_by_hand():
    assert precision_at_k(QUERIES, NEIGHBOURS, 1) == pytest.approx((1 + 0) / 2)
    assert precision_at_k(QUERIES, NEIGHBOURS, 2) == pytest.approx((1 / 2 + 0 / 2) / 2)
    assert precision_at_k(QUERIES, NEIGHBOURS, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert precision_at_k(["a"], [["a", "a"]], 4) == pytest.approx(
        2 / 4
    )  # short list: missing places count 0


def test_average_precision_by_hand():
    # q1: relevant at ranks 1, 3, 4 -> precisions 1, 2/3, 3/4
    assert average_precision([1, 0, 1, 1]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision([1, 0, 1, 1], num_relevant=5) == pytest.approx(
        (1 + 2 / 3 + 3 / 4) / 4
    )  # min(5, 4)
    assert average_precision([1, 0, 1, 1], num_relevant=3) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision([0, 0, 1, 0], num_relevant=2) == pytest.approx((1 / 3) / 2)
    assert average_precision([0, 0, 0]) == 0.0 and average_precision([0, 0], num_relevant=0) == 0.0
    assert average_precision([1, 1, 1, 0, 0]) == 1.0


def test_mean_average_precision_by_hand():
    q1, q2 = (1 + 2 / 3 + 3 / 4), 1 / 3
    assert mean_average_precision(QUERIES, NEIGHBOURS) == pytest.approx((q1 / 3 + q2 / 1) / 2)
    assert mean_average_precision(QUERIES, NEIGHBOURS, num_relevant=[5, 2]) == pytest.approx(
        (q1 / 4 + q2 / 2) / 2
    )
    assert mean_average_precision([3, 1], [[3, 1], [1, 3]]) == pytest.approx(1.0)  # any hashable labels


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every query needs a label"):
        precision_at_k(["a", None], NEIGHBOURS, 1)
    with pytest.raises(ValueError, match="2 query labels but 1 neighbour lists"):
        mean_average_precision(QUERIES, NEIGHBOURS[:1])
    with pytest.raises(ValueError, match="k must be at least 1"):
        precision_at_k(QUERIES, NEIGHBOURS, 0)
    with pytest.raises(ValueError, match="1 relevant counts for 2 queries"):
        mean_average_precision(QUERIES, NEIGHBOURS, num_relevant=[1])
