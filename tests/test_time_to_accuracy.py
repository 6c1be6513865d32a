"""The efficiency-ratio arithmetic of benchmarks/time_to_accuracy.py on hand-made points."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from time_to_accuracy import Run, compute_to_reach, efficiency_ratio  # noqa: E402


def _run(fw, pflop, top1):
    return Run(fw, 0, 0, 0.0, 0.0, pflop, None, top1, "")


def test_compute_to_reach_interpolates_first_crossing():
    runs = [_run("mae", 1.0, 0.5), _run("mae", 3.0, 0.7), _run("mae", 5.0, 0.9)]
    assert compute_to_reach(runs, 0.8) == pytest.approx(4.0)
    assert compute_to_reach(runs, 0.5) == pytest.approx(1.0)
    assert compute_to_reach(runs, 0.95) is None


def test_ratio_uses_the_accuracy_both_reach():
    runs = [_run("mae", 3.0, 0.6), _run("mae", 9.0, 0.8), _run("supmae", 1.0, 0.7), _run("supmae", 3.0, 0.85)]
    eff = efficiency_ratio(runs)
    assert eff["target_top1"] == pytest.approx(0.8)  # MAE's best; SupMAE passes it too
    assert eff["mae_pflop"] == pytest.approx(9.0)
    assert eff["supmae_pflop"] == pytest.approx(1.0 + (0.8 - 0.7) / (0.85 - 0.7) * 2.0)
    assert eff["ratio"] == pytest.approx(9.0 / eff["supmae_pflop"])
