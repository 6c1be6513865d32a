"""Pure tensor helpers: patchify/unpatchify, per-sample random masking, sin-cos position tables.

Conventions follow the official MAE/SupMAE code (facebookresearch/mae `models_mae.py`):
patches are flattened as (p, q, c) and the mask is 0 for a kept (visible) patch, 1 for a removed one.
"""

from __future__ import annotations

import numpy as np
import torch


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
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch, num_patches, device=gen_device, generator=generator)
    noise = noise.to(device) if device is not None else noise
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
