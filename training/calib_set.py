"""A model's calibration set: a few hundred images it was not trained on, copied into `<checkpoint>/calib/`.

The graph cache (supmae_serve/backends/graph_cache.py) checks the graphs it builds, measures bf16's and
INT8's top-1 agreement with fp32, and calibrates static INT8 on these images. They are taken from the
hold-out the model card names (`training.data.holdout`, `holdout_seed`: the images it was validated on, never
trained on), `per_class` from each class with a fixed seed, and copied byte for byte.

    python -m training.calib_set --data ../shared/data/cifar10/train \\
        --checkpoint supmae_serve/assets/cifar10_vit_tiny --per-class 50 --seed 0
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from supmae_serve.common.files import scan_image_folder
from supmae_serve.model import load_model_card

from .data import DataError, holdout_split


def pick_calibration(
    data: Path, holdout: int | float, holdout_seed: int, per_class: int, seed: int = 0
) -> list[tuple[Path, str]]:
    """[(image, class name)]: `per_class` images of each class from the seeded hold-out of `data`."""
    samples, classes = scan_image_folder(data)
    _, held = holdout_split(samples, holdout, holdout_seed)
    rng = random.Random(seed)
    out = []
    for idx, name in enumerate(classes):
        pool = sorted(p for p, c in held if c == idx)
        if len(pool) < per_class:
            raise DataError(f"class {name} has {len(pool)} held-out images, fewer than {per_class}")
        out += [(p, name) for p in sorted(rng.sample(pool, per_class))]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.calib_set", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the ImageFolder the model was trained on")
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint folder; images go to its calib/"
    )
    p.add_argument("--per-class", type=int, default=50, help="images per class (default 50)")
    p.add_argument("--seed", type=int, default=0, help="which held-out images (default 0)")
    args = p.parse_args(argv)
    card = load_model_card(args.checkpoint)
    data = (card.training or {}).get("data", {})
    if "holdout" not in data:
        print(
            f"{args.checkpoint}: the model card names no hold-out; cannot tell unseen images", file=sys.stderr
        )
        return 2
    picked = pick_calibration(
        args.data, data["holdout"], data.get("holdout_seed", 0), args.per_class, args.seed
    )
    out = args.checkpoint / "calib"
    if out.exists():
        shutil.rmtree(out)
    for path, name in picked:
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / name / path.name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(picked)} images ({size / 1024:.0f} KiB) from the hold-out of {args.data} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
