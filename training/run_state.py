"""Run state: everything `--resume` needs, written atomically.

`last.pt` (and `epoch_NNNN.pt` every N epochs) hold the model, optimiser, loss scaler, EMA, epoch and
step, every process's RNG states and the config. Each is written to a temp file in the same folder,
fsynced, then renamed over the old one, so a crash mid-write leaves the previous file whole.
They load with `torch.load(weights_only=True)`: nothing is unpickled but tensors and plain values.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supmae_serve.common.files import atomic_write

LAST = "last.pt"


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
