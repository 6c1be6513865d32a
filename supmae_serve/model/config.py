"""`ModelConfig`: everything that defines a model's shape and losses, saved verbatim in the model card.

One config describes every framework; `framework` picks the model class (`variants.create_model`):
`SupMAE` (supmae.py) builds supmae, mae, supervised and finetuned models, `SimMIM` (simmim.py) simmim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .masking import block_mask_count, num_visible

FRAMEWORKS = ("supmae", "mae", "simmim", "supervised", "finetuned")
MASKED_FRAMEWORKS = ("supmae", "mae", "simmim")


@dataclass
class ModelConfig:
    """Everything that defines the network's shape and losses. Saved verbatim in the model card."""

    framework: str = "supmae"
    # encoder: a timm VisionTransformer
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    # MAE decoder; the SupMAE ViT-B recipe uses 512-d with ONE block (PRETRAIN.md, `dec512d1b`)
    decoder_embed_dim: int = 512
    decoder_depth: int = 1
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    mask_patch_size: int = 32  # simmim: side of SimMIM's square mask blocks in pixels (MaskGenerator)
    norm_pix_loss: bool = True
    # classification branch: Linear(D->hidden) -> BN -> ReLU -> Linear(hidden->classes); hidden 0 = linear
    num_classes: int = 1000
    cls_hidden_dim: int = 3072
    cls_pool: str = "avg"  # "avg": mean of the (visible) patch tokens; "cls": the cls token
    cls_loss_ratio: float = 0.01  # official default
    cls_temperature: float = 10.0  # official default: CE(logits / 10, y)
    label_smoothing: float = 0.0
    norm_eps: float = 1e-6  # every LayerNorm's eps (official: 1e-6; Hugging Face ViTMAE configs: 1e-12)

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}; expected one of {FRAMEWORKS}")
        if self.cls_pool not in ("avg", "cls"):
            raise ValueError(f"cls_pool must be 'avg' or 'cls', got {self.cls_pool!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        num_visible(self.num_patches, self.mask_ratio)  # validates the ratio
        if self.framework == "simmim":
            self._check_mask_blocks()

    def _check_mask_blocks(self) -> None:
        """SimMIM's mask blocks must tile the image in whole patches and leave at least one block visible."""
        if self.mask_patch_size % self.patch_size or self.img_size % self.mask_patch_size:
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be a multiple of patch_size {self.patch_size} "
                f"and divide img_size {self.img_size}"
            )
        count, blocks = block_mask_count(self.grid, self.mask_patch_size // self.patch_size, self.mask_ratio)
        if count >= blocks:
            raise ValueError(
                f"SimMIM block masking with {self.mask_patch_size}-px mask patches on {self.img_size}-px "
                f"images masks all {blocks} blocks at mask_ratio {self.mask_ratio}; lower mask_patch_size"
            )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def has_decoder(self) -> bool:
        return self.framework in MASKED_FRAMEWORKS

    @property
    def has_head(self) -> bool:
        return self.framework != "mae" and self.num_classes > 0

    @property
    def logit_temperature(self) -> float:
        """T of the head's distribution softmax(logits / T), the one rule for training and serving: masked
        frameworks train their head with CE(logits / T, y), T = cls_temperature (10 in the official
        engine_pretrain.py), so serving divides by the same T; supervised and fine-tuned heads use T = 1."""
        return self.cls_temperature if self.framework in MASKED_FRAMEWORKS else 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)
