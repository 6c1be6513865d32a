"""Import the `.pth` files the official code writes (enyac-group/supmae, facebookresearch/mae).

`util/misc.py save_model` writes `{"model", "optimizer", "epoch", "scaler", "args"}` with `args` an
`argparse.Namespace`; the released MAE files hold `{"model"}` only. They are read with
`torch.load(weights_only=True)` plus an allow-list of exactly the one non-plain type the official code
puts there (`argparse.Namespace`), so nothing is ever fully unpickled, and a file holding anything else
is refused with a message naming the type.

The layout is detected from the state dict's keys (official names, `module.` prefixes dropped):

| layout            | official keys                                              | becomes                |
| ----------------- | ---------------------------------------------------------- | ---------------------- |
| `supmae-pretrain` | encoder + `norm` + decoder + `cls_head.{0,1,3}` (models_supmae.py) | `supmae`       |
| `mae-pretrain`    | encoder + `norm` + decoder (models_mae.py; MAE's visualisation files) | `mae`       |
| `mae-encoder`     | encoder (+ `norm`): MAE's `mae_pretrain_vit_*.pth`          | `mae`, decoder fresh   |
| `finetuned-avg`   | encoder + `fc_norm` + `head` (models_vit.py, global pool)   | `finetuned`, avg pool  |
| `finetuned-cls`   | encoder + `norm` + `head` (models_vit.py, `--cls_token`)    | `finetuned`, cls token |

where "encoder" is `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.<i>.*` (timm's ViT names).
A pretraining layout can also become `supmae` with a fresh head (or decoder): SupMAE training started
from MAE weights. The model card records the source, its sha256, the layout, which parts were imported
and which start fresh; fresh decoders and heads are listed under `untrained`, so the checkpoint does not
offer reconstruct or classify until it is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import CheckpointError, ModelCard, Preprocessing, _short, check_state_dict
from .config import ModelConfig
from .masking import interpolate_pos_embed
from .supmae import SupMAE
from .variants import VARIANTS, create_model, decoder_heads, find_variant, size_defaults

# the only non-plain type the official `save_model` writes (`args`); tensors, dicts, lists, tuples,
# numbers, strings, None and OrderedDict are what torch's weights-only unpickler allows anyway
ALLOWED_TYPES: tuple[type, ...] = (argparse.Namespace,)
# args the official scripts record that say how the model was trained (copied into the card)
RECORDED_ARGS = (
    "model",
    "input_size",
    "nb_classes",
    "global_pool",
    "norm_pix_loss",
    "mask_ratio",
    "temperature",
    "cls_loss_ratio",
    "epochs",
    "blr",
    "batch_size",
    "accum_iter",
    "weight_decay",
    "drop_path",
    "layer_decay",
)

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
_DECODER_PREFIXES = (
    "decoder_embed.",
    "mask_token",
    "decoder_pos_embed",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred.",
)
# the part each of our parameter names belongs to (the card says which were imported, which are fresh)
PARTS = {
    "encoder": ("encoder.",),
    "norm": ("encoder.norm.", "encoder.fc_norm."),
    "decoder": _DECODER_PREFIXES,
    "head": ("cls_head.",),
}


@dataclass(frozen=True)
class Layout:
    name: str
    framework: str  # the framework the file becomes by default
    cls_pool: str
    description: str


LAYOUTS = {
    "supmae-pretrain": Layout(
        "supmae-pretrain", "supmae", "avg", "encoder + norm + decoder + cls_head (models_supmae.py)"
    ),
    "mae-pretrain": Layout("mae-pretrain", "mae", "avg", "encoder + norm + decoder, no head (models_mae.py)"),
    "mae-encoder": Layout("mae-encoder", "mae", "avg", "encoder (+ norm) only (mae_pretrain_vit_*.pth)"),
    "finetuned-avg": Layout(
        "finetuned-avg", "finetuned", "avg", "encoder + fc_norm + head (models_vit.py, global pool)"
    ),
    "finetuned-cls": Layout(
        "finetuned-cls", "finetuned", "cls", "encoder + norm + head (models_vit.py, --cls_token)"
    ),
}
_EXPECTED = (
    "the ViT encoder (cls_token, pos_embed, patch_embed.proj.weight/bias, blocks.<i>.*) with: "
    "supmae-pretrain = norm.* + decoder (decoder_embed.*, mask_token, decoder_pos_embed, decoder_blocks.<i>.*, "
    "decoder_norm.*, decoder_pred.*) + cls_head.*; mae-pretrain = norm.* + decoder; mae-encoder = nothing "
    "else (norm.* optional); finetuned-avg = fc_norm.* + head.*; finetuned-cls = norm.* + head.*"
)


# ---------------------------------------------------------------------------- reading the file
def read_pth(path: str | os.PathLike) -> Any:
    """The object in an official `.pth`, through torch's weights-only unpickler with `ALLOWED_TYPES`.

    A file holding any other type (a class, a function, a NumPy scalar) is refused before that object is
    built, with a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_TYPES)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in ALLOWED_TYPES)
            raise CheckpointError(
                f"{path}: refused: the file holds a `{found.group(1)}` object. Official SupMAE/MAE "
                f"checkpoints hold only tensors, plain values and {allowed} (`args`), so it was not "
                "unpickled (a pickle can run code when loaded). Load it only if you trust it, and save "
                "its state dict alone."
            ) from e
        raise CheckpointError(f"{path}: cannot read as a weights-only PyTorch checkpoint ({e})") from e
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _state_and_meta(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict (the `model` entry, or the file itself) and the epoch/args beside it."""
    meta: dict[str, Any] = {}
    state = obj
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state = obj["model"]
        if isinstance(obj.get("epoch"), int):
            meta["epoch"] = obj["epoch"]
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            meta["args"] = {
                k: v
                for k, v in vars(args).items()
                if k in RECORDED_ARGS and isinstance(v, (str, int, float, bool))
            }
        meta["entries"] = sorted(str(k) for k in obj)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{source}: expected a state dict of tensors (or a dict with one under 'model'), "
            f"got {type(state).__name__}"
            + (f" with entries {sorted(map(str, state))[:8]}" if isinstance(state, Mapping) else "")
        )
    return {str(k).removeprefix("module."): v for k, v in state.items()}, meta


def _key_groups(keys) -> str:
    """A short, readable summary of state-dict keys: block indices folded into <i>."""
    groups = dict.fromkeys(re.sub(r"\.\d+\.", ".<i>.", k) for k in sorted(keys))
    return _short(list(groups), 12)


def detect_layout(state: Mapping[str, torch.Tensor], source: str) -> Layout:
    """Which official layout the keys are; CheckpointError listing what was expected and found."""
    keys = set(state)
    encoder = all(k in keys for k in ENCODER_KEYS)
    decoder = any(k.startswith(_DECODER_PREFIXES) for k in keys)
    pre_head = any(k.startswith(("cls_head.", "projection_head.")) for k in keys)
    ft_head = "head.weight" in keys
    norm, fc_norm = "norm.weight" in keys, "fc_norm.weight" in keys
    name = None
    if encoder and not ft_head:
        if decoder:
            name = "supmae-pretrain" if pre_head else "mae-pretrain"
        elif not pre_head and not fc_norm:
            name = "mae-encoder"
    elif encoder and ft_head and not decoder and not pre_head:
        name = "finetuned-avg" if fc_norm and not norm else "finetuned-cls" if norm and not fc_norm else None
    if name is None:
        hf = any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys)
        raise CheckpointError(
            f"{source}: no known SupMAE/MAE layout matches its {len(keys)} tensors. Expected {_EXPECTED}. "
            f"Found: {_key_groups(keys)}"
            + (
                ". These are Hugging Face ViTMAE names: pass the model folder (config.json + model.safetensors)"
                if hf
                else ""
            )
        )
    return LAYOUTS[name]


def to_our_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> ours: encoder tensors under `encoder.`, the fine-tuned `head` as `cls_head`
    (`projection_head` is accepted as another name of the pretraining `cls_head`)."""
    out = {}
    for k, v in state.items():
        if k.startswith("projection_head."):
            k = "cls_head." + k.removeprefix("projection_head.")
        elif k.startswith("head."):
            k = "cls_head." + k.removeprefix("head.")
        elif k.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")):
            k = "encoder." + k
        out[k] = v
    return out


# ---------------------------------------------------------------------------- the model config
def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return 1 + max(idx) if idx else 0


def config_from_weights(
    state: Mapping[str, torch.Tensor], framework: str, variant: str | None, source: str, **overrides
) -> tuple[ModelConfig, str | None]:
    """The ModelConfig the tensors (in our names) imply: shapes from the weights; what weights cannot say
    (attention heads; a fresh decoder's shape) from `variant`, else from the size table of that width and
    depth. -> (config, the table variant it matches or None)."""
    pe = state["encoder.pos_embed"]
    proj = state["encoder.patch_embed.proj.weight"]  # (D, C, p, p)
    dim, patch = pe.shape[-1], proj.shape[-1]
    grid = int(round((pe.shape[1] - 1) ** 0.5))
    depth = _blocks(state, "encoder.blocks.")
    base = dict(VARIANTS[variant]) if variant else size_defaults(dim, depth)
    if variant and (base["embed_dim"], base["depth"]) != (dim, depth):
        raise CheckpointError(
            f"{source}: variant {variant} is {base['embed_dim']}-d with {base['depth']} blocks, "
            f"the weights are {dim}-d with {depth}"
        )
    cfg: dict[str, Any] = {
        **base,
        "framework": framework,
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": proj.shape[1],
        "embed_dim": dim,
        "depth": depth,
        "mlp_ratio": state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / dim,
    }
    if "decoder_embed.weight" in state:
        ddim = state["decoder_embed.weight"].shape[0]
        if base.get("decoder_embed_dim") != ddim:
            cfg["decoder_num_heads"] = decoder_heads(ddim)
        cfg["decoder_embed_dim"] = ddim
        cfg["decoder_depth"] = _blocks(state, "decoder_blocks.")
    if "cls_head.0.weight" in state and "cls_head.3.weight" in state:
        cfg["cls_hidden_dim"] = state["cls_head.0.weight"].shape[0]
        cfg["num_classes"] = state["cls_head.3.weight"].shape[0]
    elif "cls_head.weight" in state:
        cfg["cls_hidden_dim"] = 0
        cfg["num_classes"] = state["cls_head.weight"].shape[0]
    cfg.update(overrides)
    needed = ["num_heads"] + (["decoder_num_heads"] if framework in ("supmae", "mae") else [])
    unknown = [k for k in needed if cfg.get(k) is None]
    if unknown:
        raise CheckpointError(
            f"{source}: the weights do not say how many attention heads the {dim}-d, {depth}-block encoder "
            f"(or its decoder) has, and no size in the table matches: pass a variant or set {unknown[0]}=N"
        )
    try:
        config = ModelConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e
    return config, find_variant(config)


# ---------------------------------------------------------------------------- class names
def imagenet_classes() -> list[tuple[str, str]]:
    """(WordNet id, name) of the ImageNet-1k classes in class-index order, from the descriptions timm
    ships offline (`timm.data.ImageNetInfo`): ("n02099601", "golden retriever") for 207. The two
    "crane"s (a bird, a machine) get their WordNet ids appended so that every name is unique."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    pairs = [(info.index_to_label_name(i), info.index_to_description(i)) for i in range(info.num_classes())]
    names = [n for _, n in pairs]
    return [(w, f"{n} ({w})" if names.count(n) > 1 else n) for w, n in pairs]


def imagenet_class_names() -> list[str]:
    return [name for _, name in imagenet_classes()]


def class_names_for(num_classes: int, given: list[str] | None, source: str) -> tuple[list[str] | None, str]:
    """(class names, where they came from): the given list, else ImageNet-1k's for a 1000-class head."""
    if given is not None:
        if len(given) != num_classes:
            raise CheckpointError(f"{source}: {len(given)} class names for a head with {num_classes} classes")
        return list(given), "given"
    if num_classes == 1000:
        return imagenet_class_names(), "imagenet-1k (timm.data.ImageNetInfo)"
    return None, "none"


# ---------------------------------------------------------------------------- assembling the checkpoint
def part_of(name: str) -> str:
    """The part (encoder, norm, decoder, head) a tensor of our model belongs to."""
    for part in ("norm", "decoder", "head", "encoder"):  # norm before encoder: it is under encoder.
        if name.startswith(PARTS[part]):
            return part
    return "other"


def assemble(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    variant: str | None,
    source: str,
    imported: dict[str, Any],
    img_size: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[SupMAE, ModelCard]:
    """Our-named tensors + the config -> (model, card). Parts the tensors lack start fresh (seeded), and
    the card says which; tensors the model has no place for, or of the wrong shape, are errors."""
    if img_size and img_size != config.img_size:
        grid = img_size // config.patch_size
        before = config.grid
        config = dataclasses.replace(config, img_size=img_size)  # validates divisibility
        for k in ("encoder.pos_embed", "decoder_pos_embed"):
            if k in state:
                state[k] = interpolate_pos_embed(state[k], grid)
        imported["pos_embed"] = f"interpolated from {before}x{before} to {grid}x{grid} patches (bicubic)"
        variant = find_variant(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # fresh parts are the same on every import
        model = create_model(config)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    fresh = sorted({part_of(k) for k in missing})
    if unexpected or "encoder" in fresh or "other" in fresh:
        problems = []
        if unexpected:
            problems.append(f"tensors the {config.framework} model has no place for: {_short(unexpected)}")
        if "encoder" in fresh or "other" in fresh:
            problems.append(
                f"missing encoder tensors: {_short([k for k in missing if part_of(k) == 'encoder'])}"
            )
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    check_state_dict(model, {**expected, **state}, source)  # shape mismatches, named
    model.load_state_dict({**expected, **state}, strict=True)
    imported["parts"] = sorted({part_of(k) for k in state})
    imported["fresh"] = fresh
    if fresh:
        imported["fresh_init"] = "MAE's initialisation, seed 0"
    names, names_source = (
        class_names_for(config.num_classes, class_names, source) if config.has_head else (None, "none")
    )
    imported["class_names"] = names_source
    card = ModelCard(
        config=config,
        variant=variant,
        class_names=names,
        preprocessing=Preprocessing.for_size(config.img_size),
        training={"imported": imported},
        untrained=[p for p in fresh if p in ("decoder", "head", "norm")],
    )
    return model.eval(), card


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_official(
    source: str | os.PathLike | Mapping[str, Any],
    variant: str | None = None,
    *,
    framework: str | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    **overrides,
) -> tuple[SupMAE, ModelCard]:
    """An official SupMAE/MAE `.pth` (or its loaded dict / state dict) -> (model, model card).

    `variant` fixes what the weights cannot say (attention heads) when the size table does not match;
    `framework` turns a pretraining layout into `supmae` (fresh head: SupMAE training from MAE weights)
    or `mae` (head dropped); `img_size` interpolates the position tables to another resolution;
    `num_classes` sizes a fresh head; `class_names` labels the head (default: ImageNet-1k's names for a
    1000-class head). `overrides` set any other ModelConfig field. Save with
    `save_checkpoint(model, folder, card=card)` (what `supmae-import` does)."""
    name = "state dict" if isinstance(source, Mapping) else str(source)
    obj = source if isinstance(source, Mapping) else read_pth(source)
    raw, meta = _state_and_meta(obj, name)
    layout = detect_layout(raw, name)
    state = to_our_names(raw)
    framework = framework or layout.framework
    allowed = ("finetuned",) if layout.framework == "finetuned" else ("supmae", "mae")
    if framework not in allowed:
        raise CheckpointError(
            f"{name}: a {layout.name} file ({layout.description}) can become {' or '.join(allowed)}, "
            f"not {framework!r}"
        )
    if framework == "mae":
        state = {k: v for k, v in state.items() if not k.startswith("cls_head.")}
    args = meta.get("args", {})
    official = {"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio"}
    if framework == "supmae":
        official |= {"temperature": "cls_temperature", "cls_loss_ratio": "cls_loss_ratio"}
    implied = {ours: args[theirs] for theirs, ours in official.items() if theirs in args}
    if layout.name == "supmae-pretrain" and "global_pool" in args:
        implied["cls_pool"] = "avg" if args["global_pool"] else "cls"
    if layout.framework == "finetuned":
        implied["cls_pool"] = layout.cls_pool
    if num_classes is not None:
        head = state.get("cls_head.weight", state.get("cls_head.3.weight"))
        if head is not None and head.shape[0] != num_classes:
            raise CheckpointError(f"{name}: its head has {head.shape[0]} classes, not {num_classes}")
        implied["num_classes"] = num_classes
    config, matched = config_from_weights(state, framework, variant, name, **(implied | overrides))
    imported = {
        "source": os.path.basename(name) if not isinstance(source, Mapping) else name,
        "format": "official .pth (enyac-group/supmae, facebookresearch/mae)",
        "layout": layout.name,
        **meta,
    }
    if not isinstance(source, Mapping):
        imported["sha256"] = sha256_of(source)
    return assemble(
        state,
        config,
        variant=variant or matched,
        source=name,
        imported=imported,
        img_size=img_size,
        class_names=class_names,
    )
