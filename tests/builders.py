"""What several test modules build: a small trainer config and WebDataset shards of synthetic images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.conftest import encode, synthetic_image
from training.recipes import TrainConfig, get_recipe


def small(**kw) -> TrainConfig:
    """The debug recipe, smaller: 96 training images, 8 steps per epoch, nothing written but the run."""
    base = dataclasses.replace(
        get_recipe("debug"),
        synthetic_images=128,
        holdout=32,
        batch_size=12,
        epochs=2,
        progress="none",
        tensorboard=False,
        recon_images=0,
    )
    return dataclasses.replace(base, **kw)


def write_wds_shard(path: Path, count: int, classes: int) -> Path:
    """A WebDataset tar of `count` 32-px PNGs (keys 0000, 0001, ...; image i is class i % classes)."""
    import webdataset as wds  # the callers skip without it

    with wds.TarWriter(str(path)) as w:
        for i in range(count):
            w.write({"__key__": f"{i:04d}", "png": encode(synthetic_image(seed=i)), "cls": str(i % classes)})
    return path
