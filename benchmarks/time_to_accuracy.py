"""Time to accuracy on CIFAR-10, and the paper's efficiency claim at small scale.

From raw images to a checkpoint: SupMAE (and MAE) pretraining for several epoch budgets, each followed
by an optional short fine-tuning, all timed by wall clock and scored on the same seeded 5,000-image
hold-out of the training set. Then, from the (pretraining compute, fine-tuned accuracy) points of each
framework, the compute each needs to reach the same accuracy, and their ratio (the paper: MAE needs
about 3x SupMAE's compute).

GPU (issue 7's target: >= 90% top-1 within 5 minutes of total wall clock on one H100):

    python benchmarks/time_to_accuracy.py --data data/cifar10/train --out runs/tta \\
        --pretrain-epochs 25 50 100 --finetune-epochs 15 --frameworks supmae mae

CPU smoke run (toy size; checks the script, not the target):

    python benchmarks/time_to_accuracy.py --data synthetic --out /tmp/tta --toy

Prints one table row per run and the ratio; `--json` writes everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_flops import step_flops  # noqa: E402

from training.engine import train  # noqa: E402
from training.recipes import TrainConfig, get_recipe  # noqa: E402


@dataclasses.dataclass
class Run:
    framework: str
    pretrain_epochs: int
    finetune_epochs: int
    pretrain_s: float
    finetune_s: float
    pretrain_pflop: float  # training-step FLOPs of pretraining, 1e15
    head_top1: float | None  # classification head of the pretrained model (SupMAE only), percent
    top1: float  # after fine-tuning (or the head when finetune_epochs == 0), percent
    checkpoint: str

    @property
    def total_s(self) -> float:
        return self.pretrain_s + self.finetune_s


# --toy: a few hundred synthetic images in place of the data set, for the CPU smoke run
TOY_DATA = dict(
    data="synthetic",
    dataset="synthetic",
    holdout=64,
    synthetic_images=512,
    batch_size=64,
    recon_images=0,
    eval_batch_size=256,
)
LOGGING = dict(progress="log", tensorboard=False, log_every=50)


def _data(args) -> dict:
    """The data fields both stages take from the command line."""
    return dict(TOY_DATA) if args.toy else dict(data=args.data, batch_size=args.batch_size)


def pretrain_config(args, framework: str, epochs: int) -> TrainConfig:
    cfg = get_recipe("cifar10_vit_tiny")
    over = dict(framework=framework, epochs=epochs, warmup_epochs=min(5.0, max(1.0, epochs / 10)))
    if framework == "mae":
        over["cls_loss_ratio"] = 0.0
    if args.toy:
        over["variant"] = "micro_patch4_32"
    return dataclasses.replace(cfg, **over, **_data(args), **LOGGING)


def finetune_config(args, checkpoint: Path, epochs: int) -> TrainConfig:
    cfg = get_recipe("cifar10_finetune")
    # augmentations that run on the device (mixup/cutmix, crops, flips): RandAug runs on the CPU in
    # DataLoader workers and would dominate a minutes-long GPU run
    over = dict(
        checkpoint=str(checkpoint),
        epochs=epochs,
        warmup_epochs=min(2.0, epochs / 5),
        randaug="",
        reprob=0.0,
        in_memory="true",
    )
    return dataclasses.replace(cfg, **over, **_data(args), **LOGGING)


def _top1(metrics: dict) -> float | None:
    """The model card's hold-out (or validation) top-1, in percent as the trainer writes it."""
    for k in ("holdout_top1", "val_top1"):
        if k in metrics:
            return float(metrics[k])
    return None


def run_one(args, framework: str, epochs: int) -> Run:
    out = Path(args.out) / f"{framework}_e{epochs}"
    pcfg = pretrain_config(args, framework, epochs)
    t0 = time.perf_counter()
    pre = train(pcfg, out / "pretrain", command="benchmarks/time_to_accuracy.py")
    t_pre = time.perf_counter() - t0
    flops = (
        step_flops(
            pcfg.variant, batch=2, framework=framework if framework != "mae" else "mae", num_classes=10
        )["train_step_GFLOP_per_img"]
        * pre.steps
        * pcfg.batch_size
        / 1e6
    )
    head = _top1(pre.metrics)
    top1, t_ft, ck = head, 0.0, pre.checkpoint
    if args.finetune_epochs > 0:
        fcfg = finetune_config(args, pre.checkpoint, args.finetune_epochs)
        t0 = time.perf_counter()
        ft = train(fcfg, out / "finetune", command="benchmarks/time_to_accuracy.py")
        t_ft = time.perf_counter() - t0
        top1, ck = _top1(ft.metrics), ft.checkpoint
    return Run(
        framework,
        epochs,
        args.finetune_epochs,
        t_pre,
        t_ft,
        flops,
        head,
        float(top1) if top1 is not None else float("nan"),
        str(ck),
    )


def compute_to_reach(runs: list[Run], target: float) -> float | None:
    """Pretraining compute (PFLOP) at which a framework's accuracy first reaches `target`, linearly
    interpolated between its measured budgets; None if it never does."""
    pts = sorted((r.pretrain_pflop, r.top1) for r in runs)
    prev = (0.0, float("-inf"))
    for c, a in pts:
        if a >= target:
            if prev[1] == float("-inf") or a == prev[1]:
                return c
            return prev[0] + (target - prev[1]) / (a - prev[1]) * (c - prev[0])
        prev = (c, a)
    return None


def efficiency_ratio(runs: list[Run], slow: str = "mae", fast: str = "supmae") -> dict:
    """MAE compute / SupMAE compute to the same fine-tuned accuracy: the highest accuracy both reach."""
    a = [r for r in runs if r.framework == slow]
    b = [r for r in runs if r.framework == fast]
    if not a or not b:
        return {}
    target = min(max(r.top1 for r in a), max(r.top1 for r in b))
    ca, cb = compute_to_reach(a, target), compute_to_reach(b, target)
    ratio = ca / cb if ca and cb else None
    return {"target_top1": target, f"{slow}_pflop": ca, f"{fast}_pflop": cb, "ratio": ratio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--out", required=True)
    ap.add_argument("--frameworks", nargs="+", default=["supmae", "mae"])
    ap.add_argument("--pretrain-epochs", nargs="+", type=int, default=[25, 50, 100])
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--budget-minutes", type=float, default=5.0, help="the time-to-accuracy target")
    ap.add_argument("--target-top1", type=float, default=90.0, help="percent (default 90)")
    ap.add_argument("--toy", action="store_true", help="micro model on synthetic data (CPU smoke run)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.toy:
        args.pretrain_epochs = [e for e in args.pretrain_epochs if e <= 4] or [1, 2]
        args.finetune_epochs = min(args.finetune_epochs, 1)

    runs = [run_one(args, fw, e) for fw in args.frameworks for e in args.pretrain_epochs]
    print(
        "| framework | pretrain epochs | finetune epochs | pretrain s | finetune s | total s | "
        "pretrain PFLOP | head top-1 | top-1 | within budget and target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        ok = r.total_s <= args.budget_minutes * 60 and r.top1 >= args.target_top1
        head = f"{r.head_top1:.2f}" if r.head_top1 is not None else "-"
        print(
            f"| {r.framework} | {r.pretrain_epochs} | {r.finetune_epochs} | {r.pretrain_s:.1f} | "
            f"{r.finetune_s:.1f} | {r.total_s:.1f} | {r.pretrain_pflop:.3g} | {head} | {r.top1:.2f} | "
            f"{'yes' if ok else 'no'} |"
        )
    eff = efficiency_ratio(runs)
    if eff:
        ratio = f"{eff['ratio']:.2f}x" if eff["ratio"] else "n/a (one framework never reached it)"

        def fmt(v):
            return f"{v:.3g}" if v else "never"

        print(
            f"\ncompute to reach {eff['target_top1']:.2f}% top-1: MAE {fmt(eff['mae_pflop'])} PFLOP, "
            f"SupMAE {fmt(eff['supmae_pflop'])} PFLOP; MAE / SupMAE = {ratio} (the paper: about 3x)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"runs": [dataclasses.asdict(r) | {"total_s": r.total_s} for r in runs], "efficiency": eff},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
