"""supmae-train: a thin command line over `training.engine.train`.

supmae-train --recipe cifar10_vit_tiny --data ../shared/data/cifar10/train --out runs/c10
supmae-train --recipe cifar10_vit_tiny --data ... --out runs/c10 --set epochs=20 --set max_minutes=60
supmae-train --out runs/c10 --resume                      # continue a killed run where it stopped
supmae-train --recipe cifar10_finetune --checkpoint runs/c10/final --data ... --out runs/c10_ft
torchrun --nproc-per-node 8 -m training.cli --recipe in1k_vit_base_paper --data /data/in1k/train ...
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .recipes import RECIPES, STAGES, apply_overrides, get_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae-train",
        description="Train SupMAE models: pretrain, fine-tune, linear probe. Recipes live in training/recipes.py.",
        epilog="recipes: " + ", ".join(sorted(RECIPES)),
    )
    p.add_argument("--recipe", help="recipe name (training/recipes.py); with --resume it may be omitted")
    p.add_argument(
        "--data", help="training data: ImageFolder root, CIFAR-10 python folder, WebDataset shards, synthetic"
    )
    p.add_argument("--out", required=True, help="run folder (last.pt, metrics.jsonl, tb/, recon/, final/)")
    p.add_argument("--stage", choices=STAGES, help="override the recipe's stage")
    p.add_argument("--checkpoint", help="pretrained checkpoint folder (finetune / linprobe)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt (model, optimiser, schedule, RNG, data order)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change any TrainConfig field, e.g. --set epochs=20 --set blr=1e-4 (repeatable); a key may "
        "name the field's group: --set optim.blr=1e-4",
    )
    return p


def recorded_command(args: argparse.Namespace, start: str | None = None) -> str:
    """The command as the model card records it (`training.command`): `supmae-train` and the flags
    given, in the order of `--help`, with paths relative to the directory the run started in (see
    `training.engine.card_path`); `--out`, where the card itself sits, always."""
    from .engine import PATH_FIELDS, card_path

    start = os.path.abspath(start if start is not None else os.getcwd())
    words = ["supmae-train"]
    if args.recipe:
        words += ["--recipe", args.recipe]
    if args.data:
        words += ["--data", card_path(args.data, start)]
    words += ["--out", card_path(args.out, start, always=True)]
    if args.stage:
        words += ["--stage", args.stage]
    if args.checkpoint:
        words += ["--checkpoint", card_path(args.checkpoint, start)]
    if args.resume:
        words.append("--resume")
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip().replace("-", "_").rpartition(".")[2] in PATH_FIELDS:  # data.val_data too
            item = f"{key}={card_path(value.strip(), start)}"
        words += ["--set", item]
    return shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .engine import NonFiniteLossError, config_from_state, train
    from .run_state import RunStateError

    try:
        if args.resume and (Path(args.out) / "last.pt").exists():
            cfg = config_from_state(args.out)  # the run's own config; --set may extend it (e.g. epochs)
        elif args.recipe:
            cfg = get_recipe(args.recipe)
        else:
            print(f"supmae-train: give --recipe NAME (one of: {', '.join(sorted(RECIPES))})", file=sys.stderr)
            return 2
        extra = []
        if args.data:
            extra.append(f"data={args.data}")
        if args.stage:
            extra.append(f"stage={args.stage}")
        if args.checkpoint:
            extra.append(f"checkpoint={args.checkpoint}")
        cfg = apply_overrides(cfg, extra + args.overrides).validate()
        result = train(
            cfg,
            args.out,
            resume=args.resume and (Path(args.out) / "last.pt").exists(),
            command=recorded_command(args),
        )
    except NonFiniteLossError as e:
        print(f"supmae-train: {e}", file=sys.stderr)
        return 3
    except (DataError, RunStateError, ValueError, ImportError) as e:
        print(f"supmae-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        from .distributed import cleanup

        cleanup()
    if result.checkpoint is not None:
        print(f"supmae-train: wrote {result.checkpoint} ({result.metrics})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
