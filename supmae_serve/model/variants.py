"""Model sizes in one table, and the one way in: `create_model(name or config, **overrides)`, which picks
the model class from the config's framework (`SupMAE`, or `SimMIM` for simmim).

Names read `<size>_patch<p>_<img>`: `base_patch16_224` is ViT-B/16 at 224 px, `tiny_patch4_32` is
ViT-T/4 at 32 px (CIFAR). Encoder widths are the ViT paper's / DeiT's; decoders are the SupMAE recipe's
(512-d, 1 block for ViT-B, PRETRAIN.md) and MAE's (512-d, 8 blocks) for the larger models.
"""

from __future__ import annotations

import dataclasses

from .config import ModelConfig
from .simmim import SimMIM
from .supmae import SupMAE

# the class that builds each framework
MODEL_CLASSES: dict[str, type[SupMAE]] = {f: cls for cls in (SupMAE, SimMIM) for f in cls.frameworks}

# encoder sizes: (embed_dim, depth, num_heads)
_SIZES = {
    "micro": (64, 2, 2),  # for tests only: seconds on a CPU
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

# decoder per size: (decoder_embed_dim, decoder_depth, decoder_num_heads)
_DECODERS = {
    "micro": (32, 1, 2),
    "tiny": (128, 2, 4),  # the small-scale CIFAR setting in docs/anchors.md (2 x 128-d)
    "small": (256, 2, 8),
    "base": (512, 1, 16),  # SupMAE: mae_vit_base_patch16_dec512d1b
    "large": (512, 8, 16),  # MAE defaults
    "huge": (512, 8, 16),
}

# the timm architecture each size corresponds to (for exporting the encoder to timm)
TIMM_NAMES = {
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
    "micro": "vit_tiny_patch16_224",
}

_PATCHINGS = {  # (patch_size, img_size, SimMIM mask_patch_size)
    # SimMIM masks 32-px blocks at 192-224 px (MaskGenerator); 32 px is a whole CIFAR image, so small
    # images use 8-px blocks (16 per image) and 64-px images 16-px blocks; 28 px = 2 x 2 patches of 14
    "patch4_32": (4, 32, 8),
    "patch2_32": (2, 32, 8),
    "patch16_224": (16, 224, 32),
    "patch14_224": (14, 224, 28),
    "patch8_64": (8, 64, 16),
}


def _build_table() -> dict[str, dict]:
    table = {}
    for size, (dim, depth, heads) in _SIZES.items():
        ddim, ddepth, dheads = _DECODERS[size]
        for suffix, (patch, img, mask_patch) in _PATCHINGS.items():
            table[f"{size}_{suffix}"] = dict(
                img_size=img,
                patch_size=patch,
                mask_patch_size=mask_patch,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                decoder_embed_dim=ddim,
                decoder_depth=ddepth,
                decoder_num_heads=dheads,
                cls_hidden_dim=4 * dim,  # 3072 for ViT-B, as in the paper
            )
    return table


VARIANTS: dict[str, dict] = _build_table()


def size_of(variant: str) -> str:
    return variant.split("_", 1)[0]


def size_defaults(embed_dim: int, depth: int) -> dict:
    """What the weights of an imported encoder cannot say, from the table size of that width and depth:
    its attention heads, decoder and head width ({} when no size matches)."""
    for size, (dim, d, heads) in _SIZES.items():
        if (dim, d) == (embed_dim, depth):
            ddim, ddepth, dheads = _DECODERS[size]
            return dict(
                num_heads=heads,
                decoder_embed_dim=ddim,
                decoder_depth=ddepth,
                decoder_num_heads=dheads,
                cls_hidden_dim=4 * dim,
            )
    return {}


def decoder_heads(decoder_embed_dim: int) -> int | None:
    """Attention heads of a decoder of this width in the table (512-d: 16, every official decoder)."""
    return next((h for d, _, h in _DECODERS.values() if d == decoder_embed_dim), None)


def find_variant(config: ModelConfig) -> str | None:
    """The table name whose shape the config has (None for shapes outside the table)."""
    keys = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
    return next((n for n, v in VARIANTS.items() if all(v[k] == getattr(config, k) for k in keys)), None)


def model_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named variant with any field overridden."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return ModelConfig(**{**VARIANTS[name], **overrides})


def create_model(spec: str | ModelConfig, **overrides) -> SupMAE:
    """A fresh model of a variant name or a config, of the class its framework needs (`MODEL_CLASSES`).

    create_model("base_patch16_224") is the paper's SupMAE ViT-B/16; any ModelConfig field can be
    overridden, e.g. create_model("tiny_patch4_32", num_classes=10, framework="simmim"), also of a
    config: create_model(card.config, img_size=64)."""
    if isinstance(spec, ModelConfig):
        config = dataclasses.replace(spec, **overrides)
    else:
        config = model_config(spec, **overrides)
    return MODEL_CLASSES[config.framework](config)
