"""Two torchrun processes (gloo, CPU) train and checkpoint, and match one process at the same
global batch.

Why they can match: the data order and the augmentation and mask of every step are drawn for the
whole global batch from (seed, step) and each process takes its rows; DDP averages gradients of
per-process means over equal shards (= the global mean); and the head's BatchNorm is synchronised
(`sync_bn`, an all-reduce BatchNorm on CPUs), so its statistics cover the global batch. What is left is
floating-point summation order in the gradient all-reduce and the BatchNorm statistics.
Measured (2026-11-26, this CPU): logged losses differ by at most 5e-7 with sync_bn and by 5e-2
without it; final weights by 6e-4 and 1.2e-2. Adam moves a weight by about lr per step whatever the
gradient's size, so a rounding-level change in a near-zero gradient can move it by up to
steps x lr (6 x 1.9e-4 here). Tolerances: 1e-5 on each logged loss, 2e-3 on the weights. The second
test shows the check can tell: without sync_bn each process normalises its own half batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supmae_serve.model import load_checkpoint
from training.engine import train
from training.observe import read_metrics
from training.recipes import apply_overrides, get_recipe
from training.run_state import load_state

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--recipe", "debug", "--set", "synthetic_images=128", "--set", "holdout=32",
    "--set", "epochs=2", "--set", "progress=none", "--set", "tensorboard=false",
    "--set", "recon_images=0", "--set", "log_every=1",
]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(out: Path, nproc: int, batch: int, *extra: str) -> None:
    cli = ["-m", "training.cli", "--out", str(out), *COMMON, "--set", f"batch_size={batch}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    sets = [s for s in COMMON[2:] if s != "--set"] + ["batch_size=32"]
    train(apply_overrides(get_recipe("debug"), sets), out)  # one process, in this one
    return out


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, one_process):
    two = tmp_path / "two"
    _torchrun(two, 2, 16)
    a, b = _losses(one_process), _losses(two)
    assert len(a) == len(b) == 6  # 96 images / global batch 32 x 2 epochs
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)

    state = load_state(two / "last.pt")
    assert state["epoch"] == 2 and len(state["rng"]) == 2  # both processes' RNG states, saved by rank 0
    m1, c1 = load_checkpoint(one_process / "final")
    m2, c2 = load_checkpoint(two / "final")
    assert c2.training["world_size"] == 2 and c2.training["global_batch"] == c1.training["global_batch"] == 32
    for k, v in m1.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, m2.state_dict()[k], atol=2e-3), k
    assert (
        abs(c1.metrics["holdout_top1"] - c2.metrics["holdout_top1"]) <= 100 / 30
    )  # percent: one image of 30


@pytest.mark.slow
def test_without_sync_bn_the_runs_differ(tmp_path, one_process):
    two = tmp_path / "two_nosync"
    _torchrun(two, 2, 16, "--set", "sync_bn=false")
    a, b = _losses(one_process), _losses(two)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-3  # 100x the tolerance above
