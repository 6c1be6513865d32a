"""`supmae-embed`: bulk embeddings, the index over them, and search from the command line.

```
supmae-embed run INPUT --out FEATURES [--model CKPT] [--backend ...] [--batch-size 64] [--workers N]
supmae-embed INPUT --out FEATURES ...                  # the same ("run" is the default subcommand)
torchrun --nproc-per-node 8 -m supmae_serve.features.cli run INPUT --out FEATURES   # one part per process
supmae-embed index FEATURES [FEATURES ...] --out INDEX [--kind auto|flat|hnsw|ivf]
supmae-embed index FEATURES2 --out INDEX --add         # add a feature set of the same model
supmae-embed search INDEX IMAGE [IMAGE ...] [--model CKPT] [--top-k 5]
```

A thin layer over `features.bulk.embed_inputs`, `features.index.build_index / add_to_index` and
`FeatureIndex.search`: each command ends with a JSON summary (or table) on stdout; problems end with
`supmae-embed: error: ...` and exit status 2 (bad arguments or input) or 1 (the job failed, e.g. --strict).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from supmae_serve.common.args import config_from_args
from supmae_serve.common.files import DataError
from supmae_serve.settings import BACKENDS, DEFAULT_MODEL

SUBCOMMANDS = ("run", "index", "search")
# the server's image limits (supmae_serve.preprocess.ImageLimits), spelled out so that `supmae-embed index`
# starts without importing torch
LIMIT_DEFAULTS = {"max_bytes": 10 * 1024 * 1024, "max_pixels": 40_000_000, "min_side": 8}


def _limits(args):
    from supmae_serve.preprocess import ImageLimits

    return ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_pixels, min_side=args.min_side)


def _model_flags(p: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**LIMIT_DEFAULTS)
    g = p.add_argument_group("model and backend")
    g.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="checkpoint or supmae-export folder (default: the bundled CIFAR-10 ViT-T/4)",
    )
    g.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="supmae-export folder for onnxruntime/tensorrt when --model is a checkpoint",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=[b for b in BACKENDS if b != "fake"],
        help="as supmae-serve (default: auto)",
    )
    g.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)"
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16", "int8"],
        help="auto: bf16 for torch on a GPU, fp32 on the CPU",
    )
    g.add_argument(
        "--threads", type=int, default=0, help="intra-op threads for torch / onnxruntime (0: library default)"
    )
    g.add_argument(
        "--pooling", default="avg", choices=["avg", "cls"], help="which vector per image (as /v1/embed)"
    )
    g = p.add_argument_group("image limits (the server's defaults)")
    g.add_argument("--max-image-bytes", type=int, default=d.max_bytes)
    g.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help="width x height; bigger images (decompression bombs) are refused",
    )
    g.add_argument("--min-side", type=int, default=d.min_side)


def build_parser() -> argparse.ArgumentParser:
    from .index import EXACT_MAX_FLOATS, KINDS
    from .inputs import default_workers

    parser = argparse.ArgumentParser(
        prog="supmae-embed",
        description="Embed a collection of images into a feature set, index it with FAISS, search it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="embed images into a feature set (Parquet shards + features.json)")
    r.add_argument(
        "input",
        help="ImageFolder, folder of images, list file (path[<TAB>label] per line), glob, or tar shards ('shards-{0000..0099}.tar')",
    )
    r.add_argument(
        "--out", type=Path, required=True, help="feature-set folder (a killed run continues from it)"
    )
    r.add_argument("--input-kind", default="auto", choices=["auto", "folder", "files", "list", "glob", "wds"])
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="decoding processes (default: cores - 1, at most 8)",
    )
    r.add_argument(
        "--shard-size", type=int, default=10_000, help="inputs per Parquet shard: the unit of resuming"
    )
    r.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored embedding type")
    r.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="store raw vectors (default: L2-normalised, as /v1/embed)",
    )
    r.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad input (default: record it in errors.jsonl)",
    )
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument(
        "--wait-timeout-s",
        type=float,
        default=0.0,
        help="under torchrun: how long rank 0 waits for the others' shards (0: no limit)",
    )
    _model_flags(r)

    i = sub.add_parser("index", help="build a FAISS index over feature sets, or add feature sets to one")
    i.add_argument("features", nargs="+", type=Path, help="feature-set folders (of the same model)")
    i.add_argument("--out", type=Path, required=True, help="index folder")
    i.add_argument("--add", action="store_true", help="add the feature sets to the existing index at --out")
    i.add_argument(
        "--kind", default="auto", choices=list(KINDS), help="auto: exact when small, HNSW, else IVF-Flat"
    )
    i.add_argument(
        "--exact-max-floats",
        type=int,
        default=EXACT_MAX_FLOATS,
        help="exact search while vectors x dim <= this",
    )
    i.add_argument(
        "--max-memory-gb",
        type=float,
        default=16.0,
        help="memory budget for the index (chooses HNSW's M, or IVF)",
    )
    i.add_argument(
        "--recall-target", type=float, default=0.95, help="recall@10 that efSearch / nprobe is tuned to"
    )
    i.add_argument(
        "--queries",
        type=int,
        default=1000,
        help="held-back queries measuring recall@10 (plus half as many for tuning)",
    )
    i.add_argument("--hnsw-m", type=int, default=0)
    i.add_argument("--nlist", type=int, default=0)
    i.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss's default)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument(
        "--relative-sources",
        action="store_true",
        help="store sources (and the image folders) relative to the index folder, so the images and the index "
        "move together (the shipped gallery); default: absolute paths",
    )

    s = sub.add_parser(
        "search", help="the nearest indexed images to query images (the model must match the index)"
    )
    s.add_argument("index", type=Path)
    s.add_argument("images", nargs="+", type=Path)
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _model_flags(s)
    return parser


def _run(args) -> int:
    from .bulk import EmbedConfig, embed_inputs

    cfg = config_from_args(EmbedConfig, args, limits=_limits(args), command=args.command_line)
    print(json.dumps(embed_inputs(cfg), indent=2))
    return 0


def _index(args) -> int:
    from .index import IndexConfig, add_to_index, build_index

    cfg = config_from_args(
        IndexConfig,
        args,
        max_memory_bytes=int(args.max_memory_gb * 2**30),
        tune_queries=args.queries // 2,
        eval_queries=args.queries,
        command=args.command_line,
    )
    m = add_to_index(args.out, args.features, cfg) if args.add else build_index(args.features, args.out, cfg)
    keys = ("kind", "faiss", "count", "dim", "params", "choice", "build", "recall", "notes")
    summary = {k: m[k] for k in keys if k in m}
    if "recall" in summary:
        summary["recall"] = {k: v for k, v in summary["recall"].items() if k != "tuning"}
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0


def _search(args) -> int:
    import numpy as np
    import torch

    from supmae_serve.backends import BackendConfig, create_backend
    from supmae_serve.preprocess import normalize

    from .bulk import decode_crop, for_this_process
    from .identity import check_identity, model_identity
    from .index import FeatureIndex

    index = FeatureIndex.load(args.index)
    bc = BackendConfig(
        args.model, args.export_dir, args.backend, args.device, args.precision, threads=args.threads
    )
    backend = create_backend(for_this_process(bc))
    check_identity(
        index.identity,
        model_identity(backend.card, args.model, pooling=args.pooling, export_dir=args.export_dir),
        what=f"index {args.index}",
        other=f"model {args.model}",
    )
    limits, prep = _limits(args), backend.card.preprocessing
    crops = []
    for path in args.images:
        crop, err = decode_crop(path.read_bytes, prep, limits)
        if err is not None:
            raise DataError(f"{path}: {err[0]}: {err[1]}")
        crops.append(crop)
    x = normalize(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2), prep)  # (Q, 3, S, S)
    results = index.search(backend.embed(x, args.pooling).embedding, args.top_k)
    if args.json:
        out = [
            {"query": str(p), "neighbors": [n.__dict__ for n in r]}
            for p, r in zip(args.images, results, strict=True)
        ]
        print(json.dumps(out, indent=2))
        return 0
    for path, found in zip(args.images, results, strict=True):
        print(f"{path}:")
        print("| rank | score | label | id |")
        print("| ---- | ----- | ----- | -- |")
        for rank, n in enumerate(found, 1):
            print(f"| {rank} | {n.score:.4f} | {n.label} | {n.id} |")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad arguments or input (exit status 2); imported when one happens."""
    from supmae_serve.backends import BackendError
    from supmae_serve.model import CheckpointError

    from .featureset import FeatureSetError
    from .identity import IdentityError
    from .index import FeatureIndexError, QueryError

    return (
        DataError,
        FeatureSetError,
        FeatureIndexError,
        IdentityError,
        QueryError,
        BackendError,
        CheckpointError,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_line = " ".join(shlex.quote(a) for a in ["supmae-embed", *argv])  # recorded in the manifests
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = command_line
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU build it tries
    try:
        return {"run": _run, "index": _index, "search": _search}[args.command](args)
    except Exception as e:
        from .bulk import EmbedError

        if isinstance(e, EmbedError):  # the job failed (--strict, other processes that never finished)
            print(f"supmae-embed: error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, (ImportError, ValueError, OSError, *_user_errors())):
            print(f"supmae-embed: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
