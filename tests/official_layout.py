"""Files laid out exactly as the official code writes them, at tiny sizes (tests never download).

The modules below are built the way enyac-group/supmae `models_supmae.py` / facebookresearch/mae
`models_mae.py` (pretraining) and `models_vit.py` (fine-tuning) build theirs, from timm's PatchEmbed,
Block and VisionTransformer, so their `state_dict()` has the official key names, shapes and dtypes
(float32, BatchNorm's int64 counter). `official_file` wraps a state dict the way `util/misc.py
save_model` does: {"model", "optimizer", "epoch", "scaler", "args"} with `args` an argparse.Namespace.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer
from torch import nn

IMG, PATCH, DIM, DEPTH, HEADS = 32, 4, 64, 2, 2  # the micro_patch4_32 shape
DEC_DIM, DEC_DEPTH, DEC_HEADS = 32, 1, 2
HIDDEN = 256


class OfficialPretrain(nn.Module):
    """models_supmae.py SupervisedMaskedAutoencoderViT (head=True) / models_mae.py MaskedAutoencoderViT:
    the attribute names and order of the official class; weights random but the position tables the
    official sin-cos ones are not needed for layout tests."""

    def __init__(self, head: bool = True, num_classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(IMG, PATCH, 3, DIM)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, DIM) * 0.1, requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(DIM, HEADS, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(DEPTH)
        )
        self.norm = norm(DIM)
        self.decoder_embed = nn.Linear(DIM, DEC_DIM, bias=True)
        self.mask_token = nn.Parameter(torch.randn(1, 1, DEC_DIM) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, n + 1, DEC_DIM) * 0.1, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(DEC_DIM, DEC_HEADS, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(DEC_DEPTH)
        )
        self.decoder_norm = norm(DEC_DIM)
        self.decoder_pred = nn.Linear(DEC_DIM, PATCH**2 * 3, bias=True)
        if head:
            self.cls_head = nn.Sequential(
                nn.Linear(DIM, HIDDEN),
                nn.BatchNorm1d(HIDDEN),
                nn.ReLU(inplace=True),
                nn.Linear(HIDDEN, num_classes),
            )
            with torch.no_grad():  # trained-looking BatchNorm statistics
                self.cls_head[1].running_mean.normal_()
                self.cls_head[1].running_var.uniform_(0.5, 2.0)
                self.cls_head[1].num_batches_tracked.fill_(1234)
        for p in self.parameters():  # trained-looking weights: no init-time ones and zeros
            if p.requires_grad:
                with torch.no_grad():
                    p.add_(torch.randn_like(p) * 0.02)


def official_finetuned(
    global_pool: bool = True, num_classes: int = 10, seed: int = 0, img_size: int = IMG
) -> VisionTransformer:
    """models_vit.py VisionTransformer: timm's ViT; with global_pool an `fc_norm` and no `norm`."""
    torch.manual_seed(seed)
    norm = partial(nn.LayerNorm, eps=1e-6)
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=norm,
        num_classes=num_classes,
        global_pool="avg",  # timm 1.x; the official model replaces the pooling below
        fc_norm=False,
    )
    if global_pool:
        vit.fc_norm = norm(DIM)
        del vit.norm
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit


def official_finetuned_forward(
    state: dict[str, torch.Tensor], x: torch.Tensor, global_pool: bool
) -> torch.Tensor:
    """The official fine-tuned model's forward (models_vit.py forward_features + timm's head), re-written
    on the raw state dict: patch embedding, cls token, + pos_embed, blocks, then global pool + fc_norm or
    norm + cls token, then the linear head."""
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    vit = official_finetuned(global_pool, num_classes=state["head.weight"].shape[0], img_size=grid * PATCH)
    vit.load_state_dict(state, strict=True)
    vit.eval()
    with torch.no_grad():
        b = x.shape[0]
        t = vit.patch_embed(x)
        t = torch.cat([vit.cls_token.expand(b, -1, -1), t], dim=1) + vit.pos_embed
        for blk in vit.blocks:
            t = blk(t)
        feat = vit.fc_norm(t[:, 1:].mean(1)) if global_pool else vit.norm(t)[:, 0]
        return vit.head(feat)


def finetuned_state(
    global_pool: bool = True, num_classes: int = 10, seed: int = 0
) -> dict[str, torch.Tensor]:
    sd = official_finetuned(global_pool, num_classes, seed).state_dict()
    if not global_pool:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}  # timm 1.x keeps an Identity
    return sd


def pretrain_args(**kw) -> argparse.Namespace:
    """main_pretrain_supmae.py's parsed arguments as PRETRAIN.md runs them (plus init_distributed_mode's)."""
    return argparse.Namespace(
        **{
            "batch_size": 256,
            "epochs": 400,
            "accum_iter": 1,
            "model": "mae_vit_base_patch16_d1b",
            "input_size": IMG,
            "mask_ratio": 0.75,
            "norm_pix_loss": True,
            "temperature": 10.0,
            "cls_loss_ratio": 0.01,
            "mlp_depth": 2,
            "nb_classes": 1000,
            "global_pool": True,
            "weight_decay": 0.05,
            "lr": 0.0024,
            "blr": 0.00015,
            "min_lr": 0.0,
            "warmup_epochs": 20,
            "data_path": "/datasets01/imagenet_full_size/061417/",
            "output_dir": "./output_dir",
            "log_dir": "./output_dir",
            "device": "cuda",
            "seed": 0,
            "resume": "",
            "start_epoch": 0,
            "num_workers": 10,
            "pin_mem": True,
            "world_size": 8,
            "local_rank": -1,
            "dist_on_itp": False,
            "dist_url": "env://",
            "rank": 0,
            "gpu": 0,
            "distributed": True,
            "dist_backend": "nccl",
            **kw,
        }
    )


def finetune_args(**kw) -> argparse.Namespace:
    """main_finetune.py's parsed arguments as FINETUNE.md runs them (lists and None included)."""
    base = vars(pretrain_args(model="vit_base_patch16", epochs=100, blr=1e-3, lr=0.004, warmup_epochs=5))
    for k in ("mask_ratio", "norm_pix_loss", "temperature", "cls_loss_ratio", "mlp_depth"):
        base.pop(k)
    return argparse.Namespace(
        **{
            **base,
            "drop_path": 0.1,
            "clip_grad": None,
            "layer_decay": 0.65,
            "color_jitter": None,
            "aa": "rand-m9-mstd0.5-inc1",
            "smoothing": 0.1,
            "reprob": 0.25,
            "remode": "pixel",
            "recount": 1,
            "resplit": False,
            "mixup": 0.8,
            "cutmix": 1.0,
            "cutmix_minmax": None,
            "mixup_prob": 1.0,
            "mixup_switch_prob": 0.5,
            "mixup_mode": "batch",
            "finetune": "supmae_pretrain.pth",
            "eval": False,
            "dist_eval": True,
            "batch_size": 32,
            "accum_iter": 4,
            "scale_list": [0.08, 1.0],  # a list value, as nargs="+" arguments give
            **kw,
        }
    )


def official_file(state: dict[str, torch.Tensor], args: argparse.Namespace, epoch: int = 399) -> dict:
    """util/misc.py save_model's dict: the model, an AdamW state after a step (param groups the way
    timm 0.3.2's add_weight_decay makes them: [no decay, decay]), the epoch, the loss scaler, the args."""
    params = [nn.Parameter(v.clone().float()) for v in state.values() if v.is_floating_point()]
    groups = [
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 17,
    }
    return {"model": state, "optimizer": opt.state_dict(), "epoch": epoch, "scaler": scaler, "args": args}


def save_official(path, state, args=None, epoch: int = 399):
    """torch.save as the official save_on_master does (the zip format of torch >= 1.6)."""
    torch.save(official_file(state, args if args is not None else pretrain_args(), epoch), path)
    return path


def official_pretrain_forward(
    off: OfficialPretrain, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio=0.75
):
    """models_supmae.py forward (= models_mae.py plus forward_classification), on the official module:
    random_masking by argsort of `noise`, encoder on the kept patches, decoder with mask tokens appended
    and unshuffled by ids_restore, norm-pix MSE on removed patches, global-pool head.
    -> (loss, pred, mask, logits or None)."""
    off.eval()
    with torch.no_grad():
        n, length = noise.shape
        x = off.patch_embed(imgs) + off.pos_embed[:, 1:, :]
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, x.shape[2]))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(off.cls_token + off.pos_embed[:, :1, :]).expand(n, -1, -1), x], dim=1)
        for blk in off.blocks:
            x = blk(x)
        latent = off.norm(x)
        y = off.decoder_embed(latent)
        tokens = off.mask_token.repeat(n, ids_restore.shape[1] + 1 - y.shape[1], 1)
        y_ = torch.cat([y[:, 1:, :], tokens], dim=1)
        y_ = torch.gather(y_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, y.shape[2]))
        y = torch.cat([y[:, :1, :], y_], dim=1) + off.decoder_pos_embed
        for blk in off.decoder_blocks:
            y = blk(y)
        pred = off.decoder_pred(off.decoder_norm(y))[:, 1:, :]
        p = PATCH
        h = imgs.shape[2] // p
        target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, 3, h, p, h, p)).reshape(n, h * h, p * p * 3)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        logits = off.cls_head(latent[:, 1:, :].mean(1)) if hasattr(off, "cls_head") else None
        return loss, pred, mask, logits
