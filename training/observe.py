"""Observability: JSONL metrics, TensorBoard, reconstruction grids (the progress bar: supmae_serve.common.progress)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from supmae_serve.common.optional import install_hint
from supmae_serve.common.progress import Progress  # noqa: F401  (re-exported: training.observe.Progress)
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import denormalize


class MetricsLog:
    """Append-only JSON lines (`metrics.jsonl`); one record per log interval and per evaluation."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records from steps after the resumed state (they will be redone)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if rec.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TensorBoard:
    def __init__(self, logdir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    f"TensorBoard logging needs tensorboard: {install_hint('tensorboard')} (or --set tensorboard=false)"
                ) from e
            self.writer = SummaryWriter(str(logdir))

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def reconstruction_grid(
    model, images: torch.Tensor, prep: Preprocessing, path: Path, upscale: int = 4
) -> Path:
    """PNG with one column per image and four rows: original, masked, reconstruction,
    reconstruction with the visible patches pasted back. `images` are normalised (N, 3, S, S)."""
    rec = model.reconstruct(images, seed=list(range(images.shape[0])))
    rows = [images, rec.masked, rec.reconstruction, rec.pasted]
    arrays = [denormalize(r, prep) for r in rows]  # each (N, S, S, 3) uint8
    n, s = arrays[0].shape[0], arrays[0].shape[1]
    pad = 2
    canvas = Image.new("RGB", (n * (s + pad) + pad, 4 * (s + pad) + pad), (255, 255, 255))
    for r, arr in enumerate(arrays):
        for i in range(n):
            canvas.paste(Image.fromarray(arr[i]), (pad + i * (s + pad), pad + r * (s + pad)))
    if upscale > 1:
        canvas = canvas.resize((canvas.width * upscale, canvas.height * upscale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
