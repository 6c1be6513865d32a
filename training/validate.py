"""In-loop validation: the classification head's top-1/top-5 on the validation set, the EMA weights'
too, and a reconstruction grid, at the epochs `eval_every` says.

`evaluate_head` measures what a served checkpoint answers (whole images, no masking, eval-mode
BatchNorm); each process evaluates its share and the counts are summed over processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from supmae_serve.model import SupMAE, create_model
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import normalize

from . import data as D
from .distributed import DistInfo, all_reduce_sum
from .observe import reconstruction_grid


def _val_batches(val, batch_size: int, dist: DistInfo, prep: Preprocessing, limit: int | None = None):
    """This process's share of the validation set, in batches of normalised images."""
    if isinstance(val, D.TensorImages):
        idx = torch.arange(len(val) if limit is None else min(limit, len(val)))[dist.rank :: dist.world_size]
        for chunk in idx.split(batch_size):
            chunk = chunk.to(val.images.device)
            yield normalize(val.images[chunk], prep), val.labels[chunk]
    else:
        n = len(val) if limit is None else min(limit, len(val))
        shard = torch.utils.data.Subset(val, list(range(dist.rank, n, dist.world_size)))
        for x, y in D.batches(shard, batch_size=batch_size, num_workers=2):  # a bad image: DataError
            yield x.to(dist.device), y.to(dist.device)


@torch.no_grad()
def evaluate_head(
    model: SupMAE, val, batch_size: int, dist: DistInfo, prep: Preprocessing, amp_dtype
) -> dict:
    """Top-1/top-5 of the classification head on whole images (no masking), eval-mode BatchNorm:
    what a served checkpoint answers. Percentages, from the evaluator's top-k code."""
    from training.evaluate.metrics import percent, topk_correct  # one top-k code and unit with supmae-eval

    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=dist.device)  # correct@1, correct@5, n
    for x, y in _val_batches(val, batch_size, dist, prep):
        with torch.autocast(
            dist.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model.forward_features(x).logits
        hits = topk_correct(logits.float(), y, (1, 5))
        counts += torch.cat([hits, hits.new_tensor([len(y)])]).double()
    counts = all_reduce_sum(counts).tolist()
    model.train(was_training)
    n = max(counts[2], 1)
    return {"top1": percent(counts[0], n), "top5": percent(counts[1], n), "images": int(counts[2])}


def is_probe(model: nn.Module) -> bool:
    """A linear probe (its head folds into one linear layer when saved): EMA weights do not apply."""
    return hasattr(getattr(model, "cls_head", None), "folded")


@dataclass
class Validator:
    """What validation uses, fixed for a run (the `eval` settings, the data, the precision)."""

    val: object  # D.TensorImages | a torch Dataset | None
    batch_size: int
    dist: DistInfo
    prep: Preprocessing
    amp_dtype: torch.dtype | None
    recon_images: int = 0  # reconstructions drawn at each evaluation (main process, in-memory data)
    recon_dir: Path | None = None  # where recon/epoch_NNNN.png go

    def __call__(self, model: SupMAE, ema=None, epoch: int = 0) -> dict:
        """-> {"top1", "top5", "images"[, "ema_top1"], "eval_s"} ({"eval_s"} alone without a head or data)."""
        t0 = time.perf_counter()
        res = {}
        mcfg = model.config
        if self.val is not None and mcfg.has_head:
            ev = evaluate_head(model, self.val, self.batch_size, self.dist, self.prep, self.amp_dtype)
            res = {"top1": ev["top1"], "top5": ev["top5"], "images": ev["images"]}
            if ema is not None and not is_probe(model):
                shadow = create_model(mcfg).to(self.dist.device)
                shadow.load_state_dict(ema.state_dict())
                res["ema_top1"] = evaluate_head(
                    shadow, self.val, self.batch_size, self.dist, self.prep, self.amp_dtype
                )["top1"]
        if self.draws_reconstructions(model):
            x = normalize(self.val.images[: self.recon_images], self.prep)
            was = model.training
            model.eval()
            reconstruction_grid(model, x, self.prep, self.recon_dir / f"epoch_{epoch:04d}.png")
            model.train(was)
        return {**res, "eval_s": round(time.perf_counter() - t0, 2)}

    def draws_reconstructions(self, model: SupMAE) -> bool:
        return (
            self.dist.is_main
            and model.config.has_decoder
            and self.recon_images > 0
            and self.recon_dir is not None
            and isinstance(self.val, D.TensorImages)
        )
