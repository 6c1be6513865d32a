"""Run state: everything `--resume` needs, written atomically.

`RunState` is where the loop is (epoch, step, the evaluations so far, time spent) with its
`state_dict`/`load_state_dict`; `Checkpointer` owns `last.pt` for it: saving the model, optimiser, loss
scaler, EMA, every process's RNG states and the config beside it, and resuming all of them.

`last.pt` (and `epoch_NNNN.pt` every N epochs) hold the model, optimiser, loss scaler, EMA, epoch and
step, every process's RNG states and the config. Each is written to a temp file in the same folder,
fsynced, then renamed over the old one, so a crash mid-write leaves the previous file whole.
They load with `torch.load(weights_only=True)`: nothing is unpickled but tensors and plain values.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.files import atomic_write

from .distributed import all_gather_objects, barrier

LAST = "last.pt"
RUN_KEYS = ("epoch", "step_in_epoch", "step", "history", "elapsed_s")  # RunState's part of last.pt


class RunStateError(RuntimeError):
    pass


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through `supmae_serve.common.files.atomic_write`: a crash mid-write keeps the old file."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, save)


def load_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunStateError(f"{path}: no run state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise RunStateError(f"{path}: cannot read run state ({e})") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise RunStateError(f"{path}: not a supmae-train run state")
    return state


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ where the loop is
@dataclass
class RunState:
    """Where a run is: the epoch and the step within it, the global step, the evaluation records so far
    (`history`), and the seconds spent before this process started (`elapsed_before`, from a resume)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)  # this process's start

    def elapsed(self) -> float:
        """Seconds of training so far, over every process lifetime of the run."""
        return self.elapsed_before + time.perf_counter() - self.started

    def advance(self) -> None:
        """One optimiser step done."""
        self.step += 1
        self.step_in_epoch += 1

    def end_epoch(self, steps_per_epoch: int) -> None:
        """After an epoch's batches: a whole epoch moves to the next (one cut short by max_steps does not)."""
        if self.step_in_epoch >= steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    @property
    def last_eval(self) -> dict | None:
        return self.history[-1] if self.history else None

    @property
    def best(self) -> dict | None:
        """The evaluation with the highest top-1 (None before any, or without a classifier)."""
        scored = [h for h in self.history if "top1" in h]
        return max(scored, key=lambda h: h["top1"]) if scored else None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "history": list(self.history),
            "elapsed_s": self.elapsed(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        self.history = list(state.get("history", []))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.started = time.perf_counter()


class Checkpointer:
    """`last.pt` of a run folder: saves and resumes the run state with the objects it names.

    `parts` maps a key of last.pt to an object with `state_dict`/`load_state_dict` (model, optimizer,
    scaler, ema; None where the run has none: saved as None, skipped on resume). `extra` are plain values
    stored beside them (config, class names). Every process calls `save` (it gathers their RNG states);
    the main process writes."""

    def __init__(self, out: Path, parts: dict[str, Any], extra: dict, *, rank: int = 0, is_main: bool = True):
        self.out, self.parts, self.extra, self.rank, self.is_main = Path(out), parts, extra, rank, is_main
        self.path = self.out / LAST

    def state(self, run: RunState, rngs: list) -> dict:
        """last.pt's content (the keys every version so far wrote)."""
        parts = {k: (p.state_dict() if p is not None else None) for k, p in self.parts.items()}
        return {**parts, **run.state_dict(), "rng": rngs, **self.extra}

    def save(self, run: RunState) -> None:
        rngs = all_gather_objects(rng_state())
        if self.is_main:
            atomic_save(self.state(run, rngs), self.path)
        barrier()

    def keep_epoch(self, epoch: int) -> Path:
        """A copy of last.pt as `epoch_NNNN.pt` (main process)."""
        return atomic_save(load_state(self.path), self.out / f"epoch_{epoch:04d}.pt")

    def resume(self, run: RunState) -> None:
        """Load last.pt into the parts, `run` and this process's RNGs."""
        state = load_state(self.path)
        for k, p in self.parts.items():
            if p is not None and state.get(k) is not None:
                p.load_state_dict(state[k])
        run.load_state_dict(state)
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
