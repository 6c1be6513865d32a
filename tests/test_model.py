"""The model's behaviour against the paper and the official code, on a tiny variant."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from supmae_serve.model import VARIANTS, count_parameters, create_model
from supmae_serve.model.masking import patchify

from .conftest import tiny_model


def _official_forward(model, imgs, labels, noise):
    """The official SupMAE forward (models_supmae.py) re-written independently: gather with
    ids_restore, concatenated mask tokens, explicit norm-pix target."""
    c = model.config
    enc = model.encoder
    n, L = imgs.shape[0], c.num_patches
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    keep = int(L * (1 - c.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, x.shape[-1]))
    mask = torch.ones(n, L)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = enc.cls_token + enc.pos_embed[:, :1]
    x = torch.cat([cls.expand(n, -1, -1), x], 1)
    for blk in enc.blocks:
        x = blk(x)
    latent = enc.norm(x)
    # decoder, the official way
    y = model.decoder_embed(latent)
    mask_tokens = model.mask_token.repeat(n, L + 1 - y.shape[1], 1)
    y_ = torch.cat([y[:, 1:], mask_tokens], 1)
    y_ = torch.gather(y_, 1, ids_restore[..., None].repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1], y_], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        y = blk(y)
    pred = model.decoder_pred(model.decoder_norm(y))[:, 1:]
    target = patchify(imgs, c.patch_size)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    rec = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    logits = model.cls_head(latent[:, 1:].mean(1))
    ce = F.cross_entropy(logits / c.cls_temperature, labels)
    return rec + c.cls_loss_ratio * ce, rec, ce, mask


def test_supmae_loss_matches_official_recomputation(images, labels):
    m = tiny_model("supmae")
    noise = torch.rand(4, 64)
    out = m(images, labels, noise=noise)
    loss, rec, ce, mask = _official_forward(m, images, labels, noise)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.loss_rec, rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_cls, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert abs(out.loss.item() - (out.loss_rec.item() + 0.01 * out.loss_cls.item())) < 1e-5


def test_mae_has_no_branch_and_loss_is_reconstruction(images, labels):
    m = tiny_model("mae")
    noise = torch.rand(4, 64)
    out = m(images, labels, noise=noise)
    assert out.logits is None and out.loss_cls is None and not hasattr(m, "cls_head")
    sup = tiny_model("supmae")
    sup.load_state_dict(m.state_dict(), strict=False)
    _, rec, _, _ = _official_forward(sup, images, labels, noise)
    torch.testing.assert_close(out.loss, rec, rtol=1e-5, atol=1e-6)


def test_supervised_loss_is_plain_ce_on_all_patches(images, labels):
    m = tiny_model("supervised")
    assert not hasattr(m, "decoder_pred") and not hasattr(m, "mask_token")
    out = m(images, labels)
    feats = m.encoder.forward_features(images)  # timm's own path: every patch, final norm
    logits = m.cls_head(feats[:, 1:].mean(1))
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)


def test_simmim_loss_matches_recomputation(images, labels):
    m = tiny_model("simmim", mask_ratio=0.6)  # 8-px mask blocks on 32-px images: a 4 x 4 block grid
    noise = torch.rand(4, 64)
    out = m(images, labels, noise=noise)
    enc = m.encoder
    # SimMIM's MaskGenerator, written independently: ceil(16 * 0.6) = 10 of the 16 blocks are masked
    # (here the 10 with the smallest noise), each block is 2 x 2 patches of the 8 x 8 patch grid
    masked_blocks = np.argsort(noise[:, :16].numpy(), axis=1)[:, :10]
    coarse = np.zeros((4, 16))
    np.put_along_axis(coarse, masked_blocks, 1.0, axis=1)
    mask = torch.from_numpy(
        coarse.reshape(4, 4, 4).repeat(2, axis=1).repeat(2, axis=2).reshape(4, 64)
    ).float()
    assert torch.equal(out.mask, mask) and mask.sum(1).tolist() == [40.0] * 4
    x = enc.patch_embed(images)
    x = torch.where(mask[..., None].bool(), m.mask_token.expand_as(x), x) + enc.pos_embed[:, 1:]
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(4, -1, -1), x], 1)
    latent = enc.norm(enc.blocks(x))
    pred = m.decoder_pred(latent[:, 1:])
    target = patchify(images, 4)  # raw (normalised-image) pixels, no per-patch norm
    l1 = ((pred - target).abs().mean(-1) * mask).sum() / mask.sum()
    vis = 1 - mask
    pooled = (latent[:, 1:] * vis[..., None]).sum(1) / vis.sum(1, keepdim=True)
    ce = F.cross_entropy(m.cls_head(pooled) / 10.0, labels)
    torch.testing.assert_close(out.loss_rec, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, l1 + 0.01 * ce, rtol=1e-5, atol=1e-6)


def test_reconstruction_loss_ignores_visible_patches(images):
    m = tiny_model("supmae")
    mask = torch.zeros(4, 64)
    mask[:, ::3] = 1
    pred = torch.randn(4, 64, 48, requires_grad=True)
    loss = m.forward_loss(images, pred, mask)
    loss.backward()
    assert torch.all(pred.grad[mask == 0] == 0)
    assert torch.all(pred.grad[mask == 1].abs().sum(-1) > 0)
    pred2 = pred.detach().clone()
    pred2[mask == 0] += 100.0  # wreck every visible prediction: the loss does not move
    assert torch.equal(m.forward_loss(images, pred2, mask), loss.detach())


@pytest.mark.parametrize("framework", ["supmae", "simmim"])
def test_classification_branch_gets_no_gradient_from_masked_pixels(framework, images, labels):
    m = tiny_model(framework).train()
    noise = torch.rand(4, 64)
    x = images.clone().requires_grad_(True)
    out = m(x, labels, noise=noise)
    out.loss_cls.backward()
    g = patchify(x.grad, 4).abs().sum(-1)  # (N, L) gradient mass per patch
    assert torch.all(g[out.mask == 1] == 0)
    assert torch.all(g[out.mask == 0] > 0)
    # and the logits do not depend on masked pixels at all
    noisy = images.clone()
    noisy_p = patchify(noisy, 4)
    noisy_p[out.mask == 1] = torch.randn_like(noisy_p[out.mask == 1]) * 5
    from supmae_serve.model.masking import unpatchify

    with torch.no_grad():
        m.eval()
        a = m(images, labels, noise=noise).logits
        b = m(unpatchify(noisy_p, 4), labels, noise=noise).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_features_is_deterministic_and_matches_timm_path(images):
    m = tiny_model("supmae").eval()
    with torch.no_grad():
        a, b = m.forward_features(images), m.forward_features(images)
        timm_out = m.encoder(images)  # timm: avg pool of normed patch tokens
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits)
    assert a.patch_tokens.shape == (4, 64, 64) and a.logits.shape == (4, 10)
    torch.testing.assert_close(a.embedding, timm_out, rtol=1e-5, atol=1e-6)


def test_reconstruct_is_deterministic_per_seed_and_independent_of_batch(images):
    m = tiny_model("supmae").eval()
    r1 = m.reconstruct(images, 0.75, seed=5)
    r2 = m.reconstruct(images, 0.75, seed=5)
    r3 = m.reconstruct(images, 0.75, seed=6)
    single = m.reconstruct(images[2:3], 0.75, seed=5)
    assert torch.equal(r1.pasted, r2.pasted) and torch.equal(r1.mask, r2.mask)
    assert not torch.equal(r1.mask, r3.mask)
    torch.testing.assert_close(single.pasted[0], r1.pasted[2], rtol=1e-5, atol=1e-5)
    # visible patches are the input's, exactly
    vis = patchify(r1.pasted, 4)[r1.mask == 0]
    torch.testing.assert_close(vis, patchify(images, 4)[r1.mask == 0])
    assert torch.all(patchify(r1.masked, 4)[r1.mask == 1] == 0)
    assert r1.mask.sum(1).tolist() == [48.0] * 4


def test_reconstruct_needs_a_decoder(images):
    with pytest.raises(ValueError, match="no decoder"):
        tiny_model("supervised").reconstruct(images)


def test_cls_pooling_option(images):
    m = tiny_model("supmae", cls_pool="cls").eval()
    with torch.no_grad():
        f = m.forward_features(images)
    torch.testing.assert_close(f.embedding, f.cls_token)


def test_linear_head_option(images, labels):
    m = tiny_model("supmae", cls_hidden_dim=0)
    assert isinstance(m.cls_head, torch.nn.Linear)
    assert m(images, labels).loss.isfinite()


def test_no_weight_decay_names():
    names = tiny_model("supmae").no_weight_decay()
    assert {"encoder.cls_token", "encoder.pos_embed", "mask_token"} <= names


def test_pos_embed_fixed():
    m = tiny_model("supmae")
    assert not m.encoder.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


def test_finetuned_models_train_the_position_table_and_pool_as_configured(images):
    """MAE's fine-tuning model is timm's ViT: a trained pos_embed; global pool + fc_norm (no final norm),
    or with --cls_token the final norm and the cls token (models_vit.py)."""
    avg = tiny_model("finetuned")
    assert avg.encoder.pos_embed.requires_grad
    names = set(avg.state_dict())
    assert "encoder.fc_norm.weight" in names and "encoder.norm.weight" not in names
    cls = tiny_model("finetuned", cls_pool="cls").eval()
    names = set(cls.state_dict())
    assert "encoder.norm.weight" in names and "encoder.fc_norm.weight" not in names
    with torch.no_grad():
        f = cls.forward_features(images)
    torch.testing.assert_close(f.embedding, f.cls_token)
    torch.testing.assert_close(f.logits, cls.cls_head(f.cls_token))


def test_simmim_block_size_is_checked():
    with pytest.raises(ValueError, match="masks all 1 blocks"):
        tiny_model("simmim", mask_patch_size=32)  # one 32-px block is the whole CIFAR image
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_model("simmim", mask_patch_size=6)
    assert tiny_model("supmae", mask_patch_size=32).config.mask_patch_size == 32  # only SimMIM uses it


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_table_builds_configs(name):
    from supmae_serve.model import model_config

    cfg = model_config(name)
    assert cfg.num_patches == (cfg.img_size // cfg.patch_size) ** 2
    assert cfg.embed_dim % cfg.num_heads == 0 and cfg.decoder_embed_dim % cfg.decoder_num_heads == 0


@pytest.mark.parametrize("name", ["micro_patch4_32", "tiny_patch4_32", "small_patch4_32", "tiny_patch16_224"])
def test_small_variants_train_step(name):
    m = create_model(name, num_classes=10)
    x = torch.randn(2, 3, m.config.img_size, m.config.img_size)
    out = m(x, torch.tensor([1, 2]))
    out.loss.backward()
    assert out.loss.isfinite()


def test_paper_base_variant_shape():
    from supmae_serve.model import model_config

    c = model_config("base_patch16_224")
    assert (c.embed_dim, c.depth, c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (
        768,
        12,
        512,
        1,
        16,
    )
    assert (c.cls_hidden_dim, c.cls_loss_ratio, c.cls_temperature, c.mask_ratio) == (3072, 0.01, 10.0, 0.75)
    assert c.norm_pix_loss


def test_parameter_count_base():
    m = create_model("base_patch16_224")
    pc = count_parameters(m)
    # ViT-B/16 encoder is 85.8M parameters (timm vit_base_patch16_224 without its head)
    assert 85.0e6 < pc.encoder < 86.5e6


def test_unknown_variant_and_bad_config():
    with pytest.raises(KeyError, match="unknown variant"):
        create_model("giant_patch3_99")
    with pytest.raises(ValueError, match="framework"):
        create_model("micro_patch4_32", framework="byol")
