"""A run killed with SIGKILL mid-epoch and resumed reproduces the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from supmae_serve.model import load_checkpoint
from training.engine import train
from training.observe import read_metrics
from training.recipes import apply_overrides, get_recipe

ROOT = Path(__file__).resolve().parents[1]
# 96 training images / batch 12 = 8 steps per epoch; last.pt every 5 steps, so the resume point is
# usually inside an epoch (the mid-epoch data-order and RNG path), and every epoch end
SETS = [
    "synthetic_images=128", "holdout=32", "batch_size=12",
    "epochs=8", "save_every_steps=5", "progress=none", "tensorboard=false", "recon_images=0", "log_every=1",
]  # fmt: skip
ARGS = ["--recipe", "debug", *[a for s in SETS for a in ("--set", s)]]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", "--out", str(out), *ARGS, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _last_step(path: Path) -> int:
    if not path.exists():
        return -1
    step = -1
    for line in path.read_text().splitlines():
        try:
            step = max(step, json.loads(line).get("step", -1))
        except json.JSONDecodeError:
            pass  # a line being written
    return step


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_reproduces_the_losses(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float results
    train(apply_overrides(get_recipe("debug"), SETS), ref)  # the uninterrupted run, in this process

    proc = subprocess.Popen(
        _cmd(run), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while _last_step(run / "metrics.jsonl") < 13 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _last_step(run / "metrics.jsonl")
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 13 <= killed_at < 64 and not (run / "final").exists()

    resumed = subprocess.run(
        _cmd(run, "--resume"), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    want, got = _losses(ref), _losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 65))  # each step logged once, none lost
    diffs = [abs(got[s] - want[s]) for s in want]
    assert max(diffs) < 1e-6, max(diffs)  # the same computation, the same thread count: identical
    a, _ = load_checkpoint(ref / "final")
    b, _ = load_checkpoint(run / "final")
    for k, v in a.state_dict().items():
        assert (v.float() - b.state_dict()[k].float()).abs().max() < 1e-6, k
