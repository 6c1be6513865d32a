"""supmae-import: an official SupMAE/MAE `.pth` or a Hugging Face ViTMAE folder -> a checkpoint folder.

    supmae-import supmae_vitb_ft_100e.pth --out ckpt/supmae_ft          # fine-tuned: ImageNet-1k names
    supmae-import mae_pretrain_vit_base.pth --out ckpt/mae --framework supmae   # fresh decoder + head
    supmae-import supmae_vitb_ft_100e.pth --out ckpt/ft384 --img-size 384       # interpolated positions
    supmae-import mae_visualize_vit_base.pth --out ckpt/mae_vis --set norm_pix_loss=false  # raw-pixel MAE
    supmae-import ~/.cache/huggingface/hub/models--facebook--vit-mae-base/snapshots/<rev> --out ckpt/hf

The result (model.safetensors + model.json) is what supmae-serve, supmae-eval, supmae-export and
supmae-train --checkpoint read; its card records the source file, its sha256, the layout and which
parts were imported or start fresh. A thin wrapper over `supmae_serve.model.import_official` /
`supmae_serve.model.hf.import_hf`. Exit status: 0 written; 2 the source was refused (the message says
why: an unknown layout lists the keys expected and found; a pickled object names its type).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from supmae_serve.model import (
    VARIANTS,
    CheckpointError,
    ModelConfig,
    import_official,
    save_checkpoint,
)
from supmae_serve.model.hf import import_hf, is_hf_folder
from supmae_serve.model.official import imagenet_classes

SYNSET_MAP = (
    "imagenet_class_map.json"  # {WordNet id: class name}: supmae-eval --class-map for ImageNet folders
)

DTYPES = ("float32", "float16", "bfloat16")


def read_class_names(path: Path) -> list[str]:
    """A JSON list of names, or a text file with one name per line (blank lines skipped)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"--class-names {path}: {e.strerror or e}") from e
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"--class-names {path}: not valid JSON ({e})") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"--class-names {path}: expected a JSON list of strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_sets(items: list[str]) -> dict:
    """`--set key=value` -> ModelConfig overrides, typed by the field (what the file cannot say, e.g.
    `norm_pix_loss=false` for MAE's visualisation models, trained on raw pixels)."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise CheckpointError(
                f"--set {item}: expected key=value with key a ModelConfig field ({', '.join(sorted(hints))})"
            )
        tp = hints[key]
        try:
            if tp is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"expected true or false, got {value!r}")
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = tp(value)
        except ValueError as e:
            raise CheckpointError(f"--set {item}: {e}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae-import",
        description="Convert an official SupMAE/MAE .pth or a Hugging Face ViTMAE folder into a supmae checkpoint "
        "folder (model.safetensors + model.json). Nothing in the source is unpickled beyond tensors, plain "
        "values and argparse.Namespace.",
    )
    p.add_argument(
        "source", type=Path, help="official .pth file, or a folder with config.json + model.safetensors"
    )
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        metavar="VARIANT",
        help="the size (e.g. base_patch16_224) when the weights' width and depth match no table size",
    )
    p.add_argument(
        "--framework",
        choices=("supmae", "mae", "finetuned"),
        help="default: what the file is (supmae, mae or finetuned); 'supmae' on an MAE file adds a fresh "
        "head (and decoder) to train SupMAE from MAE weights; 'mae' drops a SupMAE head",
    )
    p.add_argument(
        "--img-size", type=int, help="serve or fine-tune at this size: position tables are interpolated"
    )
    p.add_argument(
        "--num-classes", type=int, help="classes of a fresh head (--framework supmae; default 1000)"
    )
    p.add_argument(
        "--class-names",
        type=Path,
        help="a JSON list or a text file (one name per line); default for 1000 classes: ImageNet-1k's names",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype in the checkpoint")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any ModelConfig field the file cannot say, e.g. norm_pix_loss=false (MAE's visualisation files)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    try:
        names = read_class_names(args.class_names) if args.class_names else None
        kwargs = dict(
            framework=args.framework,
            img_size=args.img_size,
            num_classes=args.num_classes,
            class_names=names,
            **parse_sets(args.sets),
        )
        if not args.source.exists():
            raise CheckpointError(f"{args.source}: no such file or folder")
        if args.source.is_dir():
            if not is_hf_folder(args.source):
                raise CheckpointError(
                    f"{args.source}: a folder source must be a Hugging Face ViTMAE model (config.json with "
                    "model_type vit_mae + model.safetensors or pytorch_model.bin)"
                )
            model, card = import_hf(args.source, variant=args.variant, **kwargs)
        else:
            model, card = import_official(args.source, variant=args.variant, **kwargs)
        card = save_checkpoint(model, args.out, card=card, dtype=getattr(torch, args.dtype))
        synsets = card.training["imported"]["class_names"].startswith("imagenet-1k")
        if synsets:
            (args.out / SYNSET_MAP).write_text(json.dumps(dict(imagenet_classes()), indent=0) + "\n")
    except CheckpointError as e:
        print(f"supmae-import: error: {e}", file=sys.stderr)
        return 2
    imp = card.training["imported"]
    can = ", ".join(k for k, v in card.capabilities.items() if v)
    print(
        f"supmae-import: wrote {args.out} ({imp['layout']} -> {card.framework}, variant {card.variant or 'custom'}, "
        f"{card.config.img_size} px)\n"
        f"  imported: {', '.join(imp['parts'])}; fresh: {', '.join(imp['fresh']) or 'nothing'}\n"
        f"  class names: {imp['class_names']}; capabilities: {can}"
        + (
            f"\n  ImageNet folders (n01440764/...): supmae-eval ... --class-map {args.out / SYNSET_MAP}"
            if synsets
            else ""
        )
        + (f"\n  position tables: {imp['pos_embed']}" if "pos_embed" in imp else "")
        + f"\n  serve it: supmae-serve --model {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
