"""supmae-eval: the paper's evaluations on your checkpoints and data.

    supmae-eval accuracy   --checkpoint CKPT --data VAL_FOLDER
    supmae-eval knn        --checkpoint CKPT --data cifar10/train --holdout 5000 --seed 0
    supmae-eval linprobe   --checkpoint CKPT --data TEST_FOLDER --train-data TRAIN_FOLDER
    supmae-eval fewshot    --checkpoint CKPT --data cifar10/train --holdout 5000 --shots 5 20 50
    supmae-eval robustness --checkpoint CKPT --data VAL_FOLDER --variant imagenet-r=/data/imagenet-r

Repeat --checkpoint to compare several models side by side. Each result is printed as a table and
written to <checkpoint>/eval/<task>-<data>.json; --update-card also records it in model.json.
A thin wrapper over training.evaluate, where each task is a Python function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training import evaluate as ev
from training.corruptions import CORRUPTIONS, TABLE_SIZES, CorruptionError


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
        help="knn/linprobe/fewshot features: the card's pooled embedding (default) or the cls token",
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
        help="ImageFolder to fit on; default: the rest of --data outside --holdout",
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

    p = sub.add_parser("accuracy", help="top-1/top-5 of the classification head")
    _common(p)

    p = sub.add_parser("knn", help="weighted k-NN on normalised embeddings")
    _common(p)
    _train_data(p)
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")

    p = sub.add_parser("linprobe", help="linear classifier on frozen, standardised features")
    _common(p)
    _train_data(p)
    _probe(p)

    p = sub.add_parser("fewshot", help="k-shot linear probes, mean +- std over seeds")
    _common(p)
    _train_data(p)
    _probe(p)
    p.add_argument(
        "--shots", type=int, nargs="+", default=[5, 20, 50], help="images per class (default 5 20 50)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (default 0 1 2)")

    p = sub.add_parser(
        "robustness", help="ImageNet-C-style corruptions, variant folders, mCE, combined score"
    )
    _common(p)
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=["all"],
        metavar="NAME",
        help=f"'all' (default) or some of: {', '.join(CORRUPTIONS)}",
    )
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--corruption-seed", type=int, default=0, help="seed of the random corruptions")
    p.add_argument(
        "--table",
        default="auto",
        choices=("auto", *TABLE_SIZES),
        help="corruption parameter table (auto: by image size)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="CKPT|JSON",
        help="report mCE relative to this checkpoint (evaluated the same way) or JSON of its errors",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an extra eval folder (ImageNet-A/-R/-Sketch style; class subsets allowed); repeatable",
    )
    p.add_argument(
        "--cache-gb",
        type=float,
        default=4.0,
        help="keep decoded images in memory up to this size (default 4)",
    )
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


def _variants(items: list[str], max_per_class: int | None) -> dict[str, ev.DataSpec]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ev.EvalError(f"--variant expects NAME=PATH, got {item!r}")
        out[name] = ev.DataSpec(path, max_per_class=max_per_class)
    return out


def run(args: argparse.Namespace) -> list[ev.EvalResult]:
    """Run the task for each checkpoint; returns the results (printing and saving is main's job)."""
    if args.name and len(args.name) != len(args.checkpoint):
        raise ev.EvalError(
            f"got {len(args.name)} --name for {len(args.checkpoint)} --checkpoint; give one each"
        )
    names = args.name or [None] * len(args.checkpoint)
    data = ev.DataSpec(args.data, ev.parse_holdout(args.holdout), args.seed, args.max_per_class)
    cfg = ev.RunConfig(
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        feature=args.feature,
        progress=not args.no_progress and sys.stderr.isatty(),
        cache_gb=getattr(args, "cache_gb", 4.0),
    )
    train = None
    if getattr(args, "train_data", None):
        train = ev.DataSpec(args.train_data, None, args.seed, args.max_per_class)
    probe = None
    if args.task in ("linprobe", "fewshot"):
        probe = ev.ProbeConfig(
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            max_iter=args.max_iter,
            epochs=args.epochs,
            lr=args.lr,
        )
    class_map = _class_map(args.class_map)
    baseline = getattr(args, "baseline", None)
    if args.task == "robustness":
        corrupt = dict(
            corruptions=args.corruptions,
            severities=args.severities,
            corruption_seed=args.corruption_seed,
            table=args.table,
            class_map=class_map,
            run=cfg,
        )
        if baseline and len(args.checkpoint) > 1 and not Path(baseline).suffix == ".json":
            # several models against one baseline checkpoint: evaluate it once
            baseline = ev.evaluate_robustness(baseline, data, **corrupt)
    results = []
    for ckpt, name in zip(args.checkpoint, names, strict=True):
        if args.task == "accuracy":
            r = ev.evaluate_accuracy(ckpt, data, class_map=class_map, run=cfg, name=name)
        elif args.task == "knn":
            r = ev.evaluate_knn(ckpt, data, train, k=args.k, temperature=args.temperature, run=cfg, name=name)
        elif args.task == "linprobe":
            r = ev.evaluate_linprobe(ckpt, data, train, probe=probe, run=cfg, name=name)
        elif args.task == "fewshot":
            r = ev.evaluate_fewshot(
                ckpt, data, train, shots=args.shots, seeds=args.seeds, probe=probe, run=cfg, name=name
            )
        else:
            r = ev.evaluate_robustness(
                ckpt,
                data,
                baseline=baseline,
                variants=_variants(args.variant, args.max_per_class),
                name=name,
                **corrupt,
            )
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
        if len(results) == 1:
            print(results[0].table())
        else:
            print(ev.compare(results))
            if args.task == "robustness":
                for r in results:
                    print(f"\n{r.name}:\n{ev.robustness_table(r)}")
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
