"""Observability: JSONL metrics, TensorBoard, reconstruction grids (the progress bar: supmae_serve.common.progress)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from PIL import Image

from supmae_serve.common.optional import install_hint
from supmae_serve.common.progress import Progress  # noqa: F401  (re-exported: training.observe.Progress)
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import denormalize

from .distributed import all_reduce_mean


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


# ------------------------------------------------------------------------------ the trainer's log
class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the intact checkpoint."""


class TrainLog:
    """The training loop's records: step losses buffered on the device and written every `log_every`
    steps (one device sync each), evaluation records, to metrics.jsonl, TensorBoard and the progress
    display. A non-finite loss among the buffered steps raises NonFiniteLossError, naming the step and
    `last`, the run state left untouched."""

    def __init__(self, metrics: MetricsLog, tb: TensorBoard, progress, terms: list[str], lr_at, last: Path):
        self.metrics, self.tb, self.progress, self.terms, self.lr_at, self.last = (
            metrics,
            tb,
            progress,
            terms,
            lr_at,
            last,
        )
        self.start(0)

    def start(self, step: int) -> None:
        """A new logging interval beginning after `step`."""
        self.buf: list[torch.Tensor] = []
        self.first, self.t0, self.images = step, time.perf_counter(), 0

    def add(self, losses: torch.Tensor, images: int) -> None:
        """One step's loss terms (T,) on the device, and the images of its global batch."""
        self.buf.append(losses)
        self.images += images

    def flush(self, epoch: int, step: int) -> None:
        """Write the interval's record (the mean over its steps and processes)."""
        if not self.buf:
            return
        vals = all_reduce_mean(torch.stack(self.buf)).cpu()  # (k, T): the global-batch means
        bad = (~torch.isfinite(vals)).any(1).nonzero()
        if len(bad):
            at = self.first + int(bad[0])
            msg = (
                f"non-finite loss ({vals[int(bad[0])].tolist()}) at step {at} (epoch {epoch}); run stopped. "
                f"The last good run state {self.last} is untouched"
                + (" (none was written yet)" if not self.last.exists() else "")
                + ". Lower the lr (blr), set clip_grad, or use amp=bf16/fp32, then --resume."
            )
            self.metrics.write({"kind": "error", "step": at, "epoch": epoch, "message": msg})
            raise NonFiniteLossError(msg)
        dt = time.perf_counter() - self.t0
        mean = vals.mean(0).tolist()
        rec = {"kind": "train", "epoch": epoch, "step": step, **dict(zip(self.terms, mean, strict=True))}
        rec["lr"] = self.lr_at(step - 1)
        rec["img_s"] = self.images / max(dt, 1e-9)
        self.metrics.write(rec)
        self.tb.scalars({k: v for k, v in rec.items() if k not in ("kind", "step")}, step, "train")
        info = {"ep": epoch, **{k: rec[k] for k in self.terms}, "lr": rec["lr"], "img/s": round(rec["img_s"])}
        self.progress.update(step, info)
        self.start(step)

    def evaluation(self, res: dict, epoch: int, step: int, is_main: bool) -> dict:
        """Record an evaluation's results (Validator's dict) -> the record kept in the run's history."""
        rec = {"kind": "eval", "epoch": epoch, "step": step, **res}
        self.metrics.write(rec)
        scores = {k: v for k, v in res.items() if k != "eval_s"}
        self.tb.scalars(scores, step, "val")
        if is_main and scores:
            self.progress.message(
                f"epoch {epoch}: holdout top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% ({res['images']} images)"
            )
        return rec

    def close(self) -> None:
        self.progress.close()
        self.tb.close()
