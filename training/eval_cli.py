"""supmae-eval: the paper's evaluations on your checkpoints and data.

    supmae-eval accuracy   --checkpoint CKPT --data VAL_FOLDER
    supmae-eval knn        --checkpoint CKPT --data cifar10/train --holdout 5000 --seed 0
    supmae-eval linprobe   --checkpoint CKPT --data TEST_FOLDER --train-data TRAIN_FOLDER
    supmae-eval fewshot    --checkpoint CKPT --data cifar10/train --holdout 5000 --shots 5 20 50
    supmae-eval robustness --checkpoint CKPT --data VAL_FOLDER --variant imagenet-r=/data/imagenet-r
    supmae-eval retrieval  --checkpoint CKPT --data cifar10/train --holdout 5000 --seed 0

Repeat --checkpoint to compare several models side by side. Each result is printed as a table and
written to <checkpoint>/eval/<task>-<data>.json; --update-card also records it in model.json.
A thin wrapper over training.evaluate: one subcommand per entry of its task registry
(training/evaluate/registry.py), each a Python function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training import evaluate as ev
from training.corruptions import CorruptionError
from training.evaluate.results import DETAIL_TABLES


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints and data")
    g.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="PATH",
        help="checkpoint folder (model.safetensors + model.json); repeat to compare side by side",
    )
    g.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="LABEL",
        help="table label per --checkpoint, in the same order (default: the path as given)",
    )
    g.add_argument(
        "--data", required=True, metavar="PATH", help="ImageFolder root (root/<class>/<image>) to evaluate on"
    )
    g.add_argument(
        "--holdout",
        default=None,
        metavar="N|FRACTION|card",
        help="evaluate on the seeded, class-stratified hold-out of --data (the trainer's split: "
        "--holdout 5000 --seed 0 on CIFAR-10; 'card' reads it from the model card)",
    )
    g.add_argument("--seed", type=int, default=0, help="hold-out seed (default 0, as the trainer)")
    g.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        metavar="N",
        help="at most N images per class (seeded), for quick runs",
    )
    g.add_argument(
        "--class-map",
        default=None,
        metavar="JSON",
        help="file with {eval folder: model class name}, when folder names differ from class names",
    )
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-decoding processes"
    )
    r.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    r.add_argument(
        "--feature",
        choices=("embedding", "cls"),
        default="embedding",
        help="knn/linprobe/fewshot/retrieval features: the card's pooled embedding (default) or the cls token",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    o = p.add_argument_group("output")
    o.add_argument(
        "--update-card",
        action="store_true",
        help="also record the summary in each checkpoint's model.json (metrics.eval); weights untouched",
    )
    o.add_argument("--no-save", action="store_true", help="do not write <checkpoint>/eval/<task>-<data>.json")
    o.add_argument("--output", default=None, metavar="PATH", help="also write all results to this JSON file")


def _train_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train-data",
        default=None,
        metavar="PATH",
        help="ImageFolder to fit on (retrieval: to index); default: the rest of --data outside --holdout",
    )


def _probe(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("linear probe")
    g.add_argument(
        "--optimizer",
        choices=("lbfgs", "adam"),
        default="lbfgs",
        help="lbfgs: full batch on the device (default); adam: minibatches, for very large feature sets",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"L2 strength; default: the best of {', '.join(f'{w:g}' for w in ev.WD_GRID)} "
        "on a 20%% validation split of the training features",
    )
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations")
    g.add_argument("--epochs", type=int, default=100, help="adam epochs")
    g.add_argument("--lr", type=float, default=1e-3, help="adam learning rate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supmae-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task in ev.REGISTRY.values():
        p = sub.add_parser(task.name, help=task.help)
        _common(p)
        if task.train:
            _train_data(p)
        if task.probe:
            _probe(p)
        for opt in task.options:
            p.add_argument(*opt.flags, dest=opt.param, **opt.argparse)
    return parser


def _class_map(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ev.EvalError(f"--class-map {path}: cannot read ({e})") from e
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise ev.EvalError(f"--class-map {path}: expected a JSON object {{eval folder: model class name}}")
    return m


def _task_kwargs(task: ev.Task, args: argparse.Namespace) -> dict:
    """The task's own keywords from the command line (RunConfig fields excluded)."""
    out = {}
    for opt in task.options:
        if not opt.run:
            value = getattr(args, opt.param)
            out[opt.param] = opt.convert(value, args) if opt.convert else value
    return out


def run(args: argparse.Namespace) -> list[ev.EvalResult]:
    """Run the task for each checkpoint; returns the results (printing and saving is main's job)."""
    if args.name and len(args.name) != len(args.checkpoint):
        raise ev.EvalError(
            f"got {len(args.name)} --name for {len(args.checkpoint)} --checkpoint; give one each"
        )
    task = ev.REGISTRY[args.task]
    names = args.name or [None] * len(args.checkpoint)
    data = ev.DataSpec(args.data, ev.parse_holdout(args.holdout), args.seed, args.max_per_class)
    run_fields = {opt.param: getattr(args, opt.param) for opt in task.options if opt.run}
    kwargs = _task_kwargs(task, args)
    kwargs["run"] = ev.RunConfig(
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        feature=args.feature,
        progress=not args.no_progress and sys.stderr.isatty(),
        **run_fields,
    )
    if task.class_map:
        kwargs["class_map"] = _class_map(args.class_map)
    else:
        _class_map(args.class_map)  # a bad file is an error for every task, as it always was
    if task.probe:
        kwargs["probe"] = ev.ProbeConfig(
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            max_iter=args.max_iter,
            epochs=args.epochs,
            lr=args.lr,
        )
    train = None
    if task.train and args.train_data:
        train = ev.DataSpec(args.train_data, None, args.seed, args.max_per_class)
    if task.prepare is not None:
        kwargs = task.prepare(kwargs, data, args.checkpoint)
    results = []
    for ckpt, name in zip(args.checkpoint, names, strict=True):
        positional = (ckpt, data, train) if task.train else (ckpt, data)
        results.append(task.function(*positional, name=name, **kwargs))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
        if len(results) == 1:
            print(results[0].table())
        else:
            print(ev.compare(results))
            detail = DETAIL_TABLES.get(args.task)  # robustness: the per-corruption errors of each model
            if detail is not None:
                for r in results:
                    print(f"\n{r.name}:\n{detail(r)}")
        for r in results:
            if not args.no_save:
                print(f"wrote {ev.save_result(r)}", file=sys.stderr)
            if args.update_card:
                print(f"updated {ev.update_card_metrics(r)}", file=sys.stderr)
        if args.output:
            print(f"wrote {ev.save_results(results, args.output)}", file=sys.stderr)
    except (ev.EvalError, ev.DataError, ev.CheckpointError, CorruptionError) as e:
        print(f"supmae-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
