"""Pure tensor helpers: patchify/unpatchify, per-sample random masking, SimMIM block masking, sin-cos
position tables and their interpolation to another grid.

Conventions follow the official MAE/SupMAE code (facebookresearch/mae `models_mae.py`):
patches are flattened as (p, q, c) and the mask is 0 for a kept (visible) patch, 1 for a removed one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with L = (H/p)*(W/p), row-major over the patch grid."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)  # (N, C, gh, p, gw, q)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, gh, gw, p, q, C)
    return x.reshape(n, gh * gw, p * p * c)  # (N, L, p*p*C)


def unpatchify(
    x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None, channels: int = 3
) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the grid defaults to square."""
    n, length, _ = x.shape
    p = patch_size
    if grid is None:
        g = int(round(length**0.5))
        if g * g != length:
            raise ValueError(f"{length} patches do not form a square grid; pass grid=")
        grid = (g, g)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, channels)  # (N, gh, gw, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, gh, p, gw, q)
    return x.reshape(n, channels, gh * p, gw * p)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Exactly int(L * (1 - mask_ratio)) patches stay visible, as in the official code."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def _noise(batch, n, device, generator, noise) -> torch.Tensor:
    """The given masking noise on `device`, or (N, n) uniform noise drawn on the generator's device."""
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch, n, device=gen_device, generator=generator)
    return noise.to(device) if device is not None else noise


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    Returns ids_keep (N, K) with K = int(L*(1-ratio)), mask (N, L) with 0 = keep / 1 = remove,
    and ids_restore (N, L) such that ids_shuffle.gather(1, ids_restore) == arange(L).
    With `generator` the noise is drawn on the generator's device, then moved (deterministic per seed).
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = _noise(batch, num_patches, device, generator, noise)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]  # (N, K)
    mask = mask_from_keep(ids_keep, num_patches)
    return ids_keep, mask, ids_restore


def seeded_keep_indices(num_patches: int, mask_ratio: float, seeds: list[int]) -> torch.Tensor:
    """(N, K) kept patch indices where row i depends only on seeds[i] (not on batch position).

    The one definition of "the mask for seed s", shared by `SupMAE.reconstruct` and every backend."""
    noise = torch.stack(
        [torch.rand(num_patches, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )
    return random_masking(len(seeds), num_patches, mask_ratio, noise=noise)[0]


def block_mask_count(grid: int, block: int, mask_ratio: float) -> tuple[int, int]:
    """(mask blocks masked, mask blocks in all) of SimMIM's MaskGenerator on a `grid` x `grid` patch grid
    cut into `block` x `block`-patch mask blocks: ceil(blocks * ratio) of them are masked."""
    if block < 1 or grid % block:
        raise ValueError(f"a {grid}x{grid} patch grid cannot be cut into {block}x{block}-patch mask blocks")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    blocks = (grid // block) ** 2
    return math.ceil(blocks * mask_ratio), blocks


def block_masking(
    batch: int,
    grid: int,
    block: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimMIM's block masking (microsoft/SimMIM `data_simmim.py` MaskGenerator): the patch grid is cut
    into square mask blocks of `block` x `block` patches (32-px mask patches over the model's patches),
    ceil(blocks * ratio) random blocks are masked, and every patch of a masked block is masked.

    `noise` (N, >= blocks) fixes the draw: the blocks with the smallest noise values are masked (its first
    `blocks` columns are used, so the trainer's (N, L) masking noise serves here too).
    Returns ids_keep (N, K) in ascending patch order and mask (N, L) with 0 = keep / 1 = remove."""
    count, blocks = block_mask_count(grid, block, mask_ratio)
    noise = _noise(batch, blocks, device, generator, noise)[:, :blocks]
    if noise.shape != (batch, blocks):
        raise ValueError(
            f"block masking needs noise of shape ({batch}, >= {blocks}), got {tuple(noise.shape)}"
        )
    rank = noise.argsort(dim=1).argsort(dim=1)  # (N, blocks): 0 for the smallest noise
    coarse = (rank < count).float().view(batch, grid // block, grid // block)
    mask = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2).reshape(batch, grid * grid)
    keep = grid * grid - count * block * block
    ids_keep = torch.argsort(mask, dim=1, stable=True)[:, :keep]  # (N, K): the kept patches, in order
    return ids_keep, mask


def mask_from_keep(ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(N, K) kept indices -> (N, L) float mask, 0 = keep, 1 = remove."""
    mask = torch.ones(ids_keep.shape[0], num_patches, device=ids_keep.device)
    return mask.scatter(1, ids_keep, 0.0)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D): the tokens at `ids`, per sample."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(canvas: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Write tokens (N, K, D) into canvas (N, L, D) at ids (N, K); the inverse of gather_tokens.

    Equivalent to the official "append mask tokens then gather with ids_restore" unshuffle, but it
    needs only the kept indices, which is what the exported reconstruction graph takes as input.
    """
    return canvas.scatter(1, ids.unsqueeze(-1).expand(-1, -1, canvas.shape[-1]), tokens)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, D) with sin on the first half, cos on the second (MAE's util/pos_embed.py)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def sincos_pos_embed_2d(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False
) -> np.ndarray:
    """Fixed 2-D sin-cos table, (gh*gw [+1], D); the cls row (first) is zeros, as in MAE."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dim divisible by 4, got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    # MAE uses w first for the first half of the channels, h for the second
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """A (1, extra + g*g, D) position table resized to (1, extra + grid*grid, D): the extra (cls) rows
    are kept, the patch rows are resized bicubically as a g x g image (facebookresearch/mae
    `util/pos_embed.py` interpolate_pos_embed, from DeiT). Used to serve or fine-tune a 224-px checkpoint
    at another resolution."""
    n, length, dim = pos_embed.shape
    old = int(round((length - extra_tokens) ** 0.5))
    if old * old != length - extra_tokens:
        raise ValueError(f"a position table of {length - extra_tokens} patch rows is not a square grid")
    if old == grid:
        return pos_embed
    extra, tokens = pos_embed[:, :extra_tokens], pos_embed[:, extra_tokens:]
    tokens = tokens.reshape(n, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    tokens = F.interpolate(tokens.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, grid*grid, D)
    return torch.cat([extra, tokens], dim=1)
