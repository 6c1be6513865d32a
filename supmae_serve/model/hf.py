"""Hugging Face transformers ViTMAE, both ways, without importing transformers.

A ViTMAE folder is `config.json` (model_type `vit_mae`) + `model.safetensors` (or `pytorch_model.bin`).
Its tensors are named as on the Hub (transformers 4: `vit.encoder.layer.<i>.attention.attention.query`,
`decoder.decoder_layers.<i>...`); transformers 5 renames them on load (`vit.layers.<i>.attention.q_proj`)
and writes the decoder's layers back as `decoder.decoder_encoder.layer.<i>`. All three spellings are
read; exports use the Hub's, which `ViTMAEForPreTraining.from_pretrained` and
`ViTMAEModel.from_pretrained` of both major versions load.

Mapping: HF keeps query, key and value as three Linear layers where timm's Block has one `qkv`; the
rest is a rename (layernorm_before/after = norm1/norm2, intermediate/output = mlp.fc1/fc2).
`layer_norm_eps` becomes `ModelConfig.norm_eps` (the Hub's MAE configs say 1e-12, the official code
1e-6), so the imported model computes what the HF model computes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from supmae_serve.common.files import atomic_write

from .checkpoint import CheckpointError, ModelCard
from .config import ModelConfig
from .official import assemble, sha256_of
from .supmae import SupMAE
from .variants import find_variant

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")

# one HF transformer layer (Hub names) <-> one timm Block; query/key/value are fused into qkv
_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# transformers 5's in-memory names -> the Hub's
_V5 = (
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"attention\.q_proj\.", "attention.attention.query."),
    (r"attention\.k_proj\.", "attention.attention.key."),
    (r"attention\.v_proj\.", "attention.attention.value."),
    (r"attention\.o_proj\.", "attention.output.dense."),
    (r"mlp\.fc1\.", "intermediate.dense."),
    (r"mlp\.fc2\.", "output.dense."),
)


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path) / CONFIG_NAME
    try:
        return p.is_file() and json.loads(p.read_text()).get("model_type") == "vit_mae"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config.json, the tensors under Hub names without the `vit.` prefix, the weights file)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    path = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no {' or '.join(WEIGHTS_NAMES)} beside config.json")
    try:
        if path.suffix == ".safetensors":
            raw = load_file(str(path))
        else:  # the older Hub format: a plain state dict, read weights-only (nothing else is unpickled)
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - e.g. an UnpicklingError for a .bin holding objects
        raise CheckpointError(f"{path}: refused or unreadable as a weights-only file ({e})") from e
    state = {}
    for k, v in raw.items():
        k = k.removeprefix("vit.")
        for pattern, repl in _V5:
            k = re.sub(pattern, repl, k)
        state[k] = v
    return config, state, path


def _layer_to_block(state: Mapping[str, torch.Tensor], src: str, dst: str, out: dict) -> None:
    for suffix in ("weight", "bias"):
        out[f"{dst}.attn.qkv.{suffix}"] = torch.cat([state[f"{src}.{q}.{suffix}"] for q in _QKV])
        for hf, ours in _LAYER.items():
            out[f"{dst}.{ours}.{suffix}"] = state[f"{src}.{hf}.{suffix}"]


def _block_to_layer(state: Mapping[str, torch.Tensor], src: str, dst: str, out: dict) -> None:
    for suffix in ("weight", "bias"):
        for q, part in zip(_QKV, state[f"{src}.attn.qkv.{suffix}"].chunk(3), strict=True):
            out[f"{dst}.{q}.{suffix}"] = part
        for hf, ours in _LAYER.items():
            out[f"{dst}.{hf}.{suffix}"] = state[f"{src}.{ours}.{suffix}"]


def _layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return 1 + max(idx) if idx else 0


def hf_to_ours(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Hub-named ViTMAE tensors -> our names; a missing tensor is a CheckpointError naming it."""
    try:
        out = {
            "encoder.cls_token": state["embeddings.cls_token"],
            "encoder.pos_embed": state["embeddings.position_embeddings"],
            "encoder.patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
            "encoder.patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
            "encoder.norm.weight": state["layernorm.weight"],
            "encoder.norm.bias": state["layernorm.bias"],
        }
        for i in range(_layers(state, "encoder.layer.")):
            _layer_to_block(state, f"encoder.layer.{i}", f"encoder.blocks.{i}", out)
        if any(k.startswith("decoder.") for k in state):
            for k in ("decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed"):
                out[k] = state[f"decoder.{k}"]
            for k in ("decoder_norm", "decoder_pred"):
                out[f"{k}.weight"], out[f"{k}.bias"] = (
                    state[f"decoder.{k}.weight"],
                    state[f"decoder.{k}.bias"],
                )
            for i in range(_layers(state, "decoder.decoder_layers.")):
                _layer_to_block(state, f"decoder.decoder_layers.{i}", f"decoder_blocks.{i}", out)
    except KeyError as e:
        raise CheckpointError(f"{source}: not a ViTMAE state dict: no tensor {e.args[0]!r}") from e
    return out


def _pair(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise CheckpointError(f"only square images and patches are supported, got {list(v)}")
        return int(v[0])
    return int(v)


def config_from_hf(hf: Mapping[str, Any], framework: str, source: str, **overrides) -> ModelConfig:
    """ViTMAEConfig fields -> ModelConfig (missing fields take ViTMAEConfig's defaults)."""
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise CheckpointError(
            f"{source}: hidden_act {hf.get('hidden_act')!r} / qkv_bias {hf.get('qkv_bias')}: only the MAE "
            "ViT (exact GELU, biased qkv) maps onto timm's ViT"
        )
    dim = int(hf.get("hidden_size", 768))
    ddim = int(hf.get("decoder_hidden_size", 512))
    cfg = dict(
        framework=framework,
        img_size=_pair(hf.get("image_size", 224)),
        patch_size=_pair(hf.get("patch_size", 16)),
        in_chans=int(hf.get("num_channels", 3)),
        embed_dim=dim,
        depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_ratio=int(hf.get("intermediate_size", 3072)) / dim,
        decoder_embed_dim=ddim,
        decoder_depth=int(hf.get("decoder_num_hidden_layers", 8)),
        decoder_num_heads=int(hf.get("decoder_num_attention_heads", 16)),
        mask_ratio=float(hf.get("mask_ratio", 0.75)),
        norm_pix_loss=bool(hf.get("norm_pix_loss", False)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
    )
    if int(hf.get("decoder_intermediate_size", 2048)) != cfg["mlp_ratio"] * ddim:
        raise CheckpointError(
            f"{source}: decoder_intermediate_size {hf.get('decoder_intermediate_size')} is not "
            f"{cfg['mlp_ratio']:g} x decoder_hidden_size {ddim}: the decoder must share the encoder's MLP ratio"
        )
    cfg.update(overrides)
    try:
        return ModelConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def import_hf(
    folder: str | os.PathLike,
    variant: str | None = None,
    *,
    framework: str | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    **overrides,
) -> tuple[SupMAE, ModelCard]:
    """A ViTMAEForPreTraining (encoder + decoder) or ViTMAEModel (encoder) folder -> (model, card), as
    `mae` by default, or `supmae` with a fresh head to start SupMAE training from MAE weights. `variant`
    is only recorded (the config says every size); the other arguments are `import_official`'s."""
    if not is_hf_folder(folder):
        raise CheckpointError(
            f"{folder}: no config.json with model_type 'vit_mae' (a Hugging Face ViTMAE folder)"
        )
    hf, raw, path = read_hf_folder(folder)
    state = hf_to_ours(raw, str(path))
    has_decoder = "decoder_embed.weight" in state
    framework = framework or "mae"
    if framework not in ("supmae", "mae"):
        raise CheckpointError(f"{folder}: a ViTMAE model can become supmae or mae, not {framework!r}")
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    config = config_from_hf(hf, framework, str(folder), **extra, **overrides)
    imported = {
        "source": str(folder),
        "format": "Hugging Face transformers ViTMAE folder",
        "layout": "ViTMAEForPreTraining" if has_decoder else "ViTMAEModel",
        "architectures": hf.get("architectures"),
        "weights": path.name,
        "sha256": sha256_of(path),
    }
    return assemble(
        state,
        config,
        variant=variant or find_variant(config),
        source=str(folder),
        imported=imported,
        img_size=img_size,
        class_names=class_names,
    )


# ---------------------------------------------------------------------------- export
def hf_config(config: ModelConfig, with_decoder: bool) -> dict[str, Any]:
    return {
        "architectures": ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": int(config.mlp_ratio * config.embed_dim),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": True,
        "decoder_num_attention_heads": config.decoder_num_heads,
        "decoder_hidden_size": config.decoder_embed_dim,
        "decoder_num_hidden_layers": config.decoder_depth,
        "decoder_intermediate_size": int(config.mlp_ratio * config.decoder_embed_dim),
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
    }


def check_hf_exportable(config: ModelConfig) -> None:
    if config.framework == "finetuned" and config.cls_pool == "avg":
        raise CheckpointError(
            "a fine-tuned model with global pooling has no final norm but an fc_norm, which ViTMAE does not "
            "have; export it to timm (--format timm) instead"
        )


def hf_state_dict(model: SupMAE) -> tuple[dict[str, torch.Tensor], bool]:
    """Our model's encoder (and MAE decoder) under Hub names -> (tensors, with decoder). The
    classification head has no place in ViTMAE and is left out."""
    c = model.config
    check_hf_exportable(c)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with_decoder = c.framework in ("supmae", "mae")
    enc = "vit." if with_decoder else ""
    out = {
        f"{enc}embeddings.cls_token": state["encoder.cls_token"],
        f"{enc}embeddings.position_embeddings": state["encoder.pos_embed"],
        f"{enc}embeddings.patch_embeddings.projection.weight": state["encoder.patch_embed.proj.weight"],
        f"{enc}embeddings.patch_embeddings.projection.bias": state["encoder.patch_embed.proj.bias"],
        f"{enc}layernorm.weight": state["encoder.norm.weight"],
        f"{enc}layernorm.bias": state["encoder.norm.bias"],
    }
    for i in range(c.depth):
        _block_to_layer(state, f"encoder.blocks.{i}", f"{enc}encoder.layer.{i}", out)
    if with_decoder:
        for k in ("decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed"):
            out[f"decoder.{k}"] = state[k]
        for k in ("decoder_norm", "decoder_pred"):
            out[f"decoder.{k}.weight"], out[f"decoder.{k}.bias"] = state[f"{k}.weight"], state[f"{k}.bias"]
        for i in range(c.decoder_depth):
            _block_to_layer(state, f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}", out)
    return {k: v.contiguous() for k, v in out.items()}, with_decoder


def save_hf(model: SupMAE, folder: str | os.PathLike) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` for `ViTMAEForPreTraining.from_pretrained`
    (encoder + decoder of a supmae / mae model) or `ViTMAEModel.from_pretrained` (the encoder of any
    other model). The folder also loads with `ViTMAEModel.from_pretrained` in the first case."""
    folder = Path(folder)
    state, with_decoder = hf_state_dict(model)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config(model.config, with_decoder), indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder
