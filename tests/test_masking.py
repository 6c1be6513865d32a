import numpy as np
import pytest
import torch

from supmae_serve.model.masking import (
    block_masking,
    gather_tokens,
    interpolate_pos_embed,
    mask_from_keep,
    num_visible,
    patchify,
    random_masking,
    scatter_tokens,
    sincos_pos_embed_2d,
    unpatchify,
)


@pytest.mark.parametrize("ratio,L", [(0.75, 64), (0.75, 196), (0.6, 49), (0.0, 16), (0.9, 10)])
def test_masking_keeps_exact_count_per_sample(ratio, L):
    ids_keep, mask, ids_restore = random_masking(5, L, ratio)
    keep = int(L * (1 - ratio))
    assert ids_keep.shape == (5, keep)
    assert torch.equal(mask.sum(1), torch.full((5,), float(L - keep)))
    for i in range(5):
        assert len(set(ids_keep[i].tolist())) == keep  # no duplicates
        assert torch.all(mask[i, ids_keep[i]] == 0)


def test_ids_restore_inverts_the_shuffle_per_sample():
    noise = torch.rand(6, 49)
    ids_keep, mask, ids_restore = random_masking(6, 49, 0.75, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(49).expand(6, -1))
    # the official mask construction (ones, zero the first K, unshuffle) agrees with ours
    official = torch.ones(6, 49)
    official[:, : ids_keep.shape[1]] = 0
    assert torch.equal(official.gather(1, ids_restore), mask)
    # masks differ between samples
    assert not torch.equal(mask[0], mask[1])


def test_masking_is_deterministic_for_a_generator():
    a = random_masking(3, 64, 0.75, generator=torch.Generator().manual_seed(7))[0]
    b = random_masking(3, 64, 0.75, generator=torch.Generator().manual_seed(7))[0]
    c = random_masking(3, 64, 0.75, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(64, 1.0)


def test_patchify_roundtrip_and_layout():
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 8)
    assert x.shape == (2, 4 * 6, 8 * 8 * 3)
    # patch (row 1, col 2) holds pixels [8:16, 16:24] flattened as (p, q, c)
    assert torch.equal(x[:, 1 * 6 + 2].reshape(2, 8, 8, 3), imgs[:, :, 8:16, 16:24].permute(0, 2, 3, 1))
    assert torch.equal(unpatchify(x, 8, grid=(4, 6)), imgs)


def test_gather_scatter_inverse():
    x = torch.randn(3, 10, 4)
    ids = torch.stack([torch.randperm(10)[:4] for _ in range(3)])
    picked = gather_tokens(x, ids)
    assert torch.equal(picked[1, 2], x[1, ids[1, 2]])
    canvas = torch.zeros_like(x)
    back = scatter_tokens(canvas, ids, picked)
    keep = 1 - mask_from_keep(ids, 10)
    assert torch.equal(back, x * keep.unsqueeze(-1))


def test_sincos_table_matches_mae_definition():
    d, g = 16, 3
    emb = sincos_pos_embed_2d(d, g, cls_token=True)
    assert emb.shape == (g * g + 1, d)
    assert np.all(emb[0] == 0)
    # independent re-computation for position (row 1, col 2): first half encodes the column (w)
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    col, row = 2.0, 1.0
    expect = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    np.testing.assert_allclose(emb[1 + 1 * g + 2], expect, rtol=1e-6, atol=1e-6)


def test_block_masking_is_simmims_mask_generator():
    """ViT-B/16 at 224 px with 32-px mask patches: a 7 x 7 grid of 2 x 2-patch blocks, ceil(49 * 0.75) = 37
    blocks masked (SimMIM's MaskGenerator), so 148 of the 196 patches, whole blocks at a time."""
    ids_keep, mask = block_masking(500, 14, 2, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (500, 196) and ids_keep.shape == (500, 48)
    assert torch.equal(mask.sum(1), torch.full((500,), 148.0))
    blocks = mask.view(500, 7, 2, 7, 2)
    assert torch.equal(blocks.amin((2, 4)), blocks.amax((2, 4)))  # constant inside every block
    assert torch.equal(mask_from_keep(ids_keep, 196), mask)
    assert torch.all(ids_keep[:, 1:] > ids_keep[:, :-1])  # kept patches in order
    # every block is equally likely to be masked: 37 / 49 = 0.755
    freq = blocks[:, :, 0, :, 0].mean(0)
    assert (freq - 37 / 49).abs().max() < 0.1
    # the draw follows the noise: the smallest-noise blocks are masked
    noise = torch.rand(3, 196)
    _, m = block_masking(3, 14, 2, 0.75, noise=noise)
    top = torch.argsort(noise[:, :49], 1)[:, :37]
    coarse = torch.zeros(3, 49).scatter(1, top, 1.0).view(3, 7, 7)
    assert torch.equal(m, coarse.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(3, 196))


def test_block_masking_rejects_a_grid_it_cannot_cut():
    with pytest.raises(ValueError, match="cannot be cut"):
        block_masking(2, 14, 3, 0.75)


def test_interpolate_pos_embed_keeps_cls_and_orientation():
    """MAE's interpolate_pos_embed: the cls row is kept and the patch rows are resized as an image, so a
    table whose channel 0 is the row and channel 1 the column keeps that meaning on the new grid."""
    g = 4
    rows, cols = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="ij")
    table = torch.cat([torch.full((1, 1, 2), 7.0), torch.stack([rows, cols], -1).reshape(1, g * g, 2)], 1)
    assert interpolate_pos_embed(table, g) is table
    big = interpolate_pos_embed(table, 8)
    assert big.shape == (1, 65, 2) and torch.equal(big[:, 0], table[:, 0])
    grid = big[0, 1:].reshape(8, 8, 2)
    assert torch.all(grid[1:, :, 0] >= grid[:-1, :, 0] - 1e-5) and grid[:, :, 0].std(1).max() < 1e-5
    assert torch.all(grid[:, 1:, 1] >= grid[:, :-1, 1] - 1e-5) and grid[:, :, 1].std(0).max() < 1e-5
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.zeros(1, 11, 2), 4)
