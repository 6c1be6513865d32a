"""The checkpoint contract: `model.safetensors` + `model.json` (the model card).

Every consumer (evaluation, export, every serving backend, the demo) reads a checkpoint through
`load_checkpoint`. Loading never unpickles: weights come from safetensors. Official `.pth` releases and
Hugging Face folders become checkpoints once, through `supmae-import` (`official.py`, `hf.py`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from supmae_serve.common.files import atomic_write
from supmae_serve.common.versions import software_versions

from .config import ModelConfig
from .supmae import SupMAE
from .variants import TIMM_NAMES, VARIANTS, create_model, size_of

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "model.json"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


UNTRAINED_PARTS = ("decoder", "head", "norm")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model card; the message says what."""


@dataclass
class Preprocessing:
    """How an image becomes model input; `supmae_serve.preprocess` applies it."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest
    crop_pct: float = 0.875  # resize the short side to image_size / crop_pct, then centre-crop

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise CheckpointError(f"unknown interpolation {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise CheckpointError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise CheckpointError(f"mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")

    @classmethod
    def for_size(cls, image_size: int) -> Preprocessing:
        # small images (CIFAR) are used whole; ImageNet-size ones use the usual 0.875 centre crop
        return cls(image_size=image_size, crop_pct=1.0 if image_size <= 64 else 0.875)


@dataclass
class ModelCard:
    """The JSON beside the weights. Unknown keys are kept (forward compatible) under `extra`."""

    config: ModelConfig
    variant: str | None = None
    class_names: list[str] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    training: dict[str, Any] = field(default_factory=dict)  # data, recipe, command, epochs, ...
    metrics: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    created: str = ""
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    # parts that hold fresh, never-trained weights (an import of a file without them): a model whose
    # decoder or head is untrained does not offer reconstruct or classify
    untrained: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = sorted(set(self.untrained) - set(UNTRAINED_PARTS))
        if bad:
            raise CheckpointError(f"untrained parts {bad} are not among {list(UNTRAINED_PARTS)}")

    @property
    def framework(self) -> str:
        return self.config.framework

    @property
    def capabilities(self) -> dict[str, bool]:
        return {
            "embed": True,
            "classify": self.config.has_head and "head" not in self.untrained,
            "reconstruct": self.config.has_decoder and "decoder" not in self.untrained,
        }

    def to_dict(self) -> dict:
        d = {
            "format_version": self.format_version,
            "variant": self.variant,
            "framework": self.framework,
            "model_config": self.config.to_dict(),
            "class_names": self.class_names,
            "preprocessing": asdict(self.preprocessing),
            "capabilities": self.capabilities,
            "training": self.training,
            "metrics": self.metrics,
            "software": self.software,
            "created": self.created,
            "dtype": self.dtype,
        }
        if self.untrained:
            d["untrained"] = list(self.untrained)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model card") -> ModelCard:
        d = dict(d)
        version = d.pop("format_version", None)
        if version is None or not isinstance(version, int):
            raise CheckpointError(f"{source}: missing or invalid 'format_version'")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version} is newer than this supmae understands ({FORMAT_VERSION}); upgrade supmae"
            )
        if "model_config" not in d:
            raise CheckpointError(f"{source}: missing 'model_config'")
        try:
            config = ModelConfig.from_dict(d.pop("model_config"))
            prep = Preprocessing(**d.pop("preprocessing", {}) or {})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from e
        framework = d.pop("framework", config.framework)
        if framework != config.framework:
            raise CheckpointError(
                f"{source}: framework {framework!r} disagrees with model_config {config.framework!r}"
            )
        d.pop("capabilities", None)  # derived
        class_names = d.pop("class_names", None)
        if class_names is not None and config.has_head and len(class_names) != config.num_classes:
            raise CheckpointError(
                f"{source}: {len(class_names)} class names for a head with {config.num_classes} classes"
            )
        known = {"variant", "training", "metrics", "software", "created", "dtype", "untrained"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        try:
            return cls(
                config=config,
                class_names=class_names,
                preprocessing=prep,
                format_version=version,
                extra=d,
                **kwargs,
            )
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from e


def save_checkpoint(
    model: SupMAE,
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    class_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    dtype: torch.dtype = torch.float32,
    card: ModelCard | None = None,
) -> ModelCard:
    """Write `path/model.safetensors` and `path/model.json` atomically; returns the card written.

    `dtype=torch.float16` halves the file (floating tensors only; BatchNorm counters stay integer).
    """
    out = Path(path)
    if card is None:
        card = ModelCard(
            config=model.config,
            variant=variant,
            class_names=class_names,
            preprocessing=preprocessing or Preprocessing.for_size(model.config.img_size),
            training=training or {},
            metrics=metrics or {},
        )
    card.software = software_versions()
    card.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    card.dtype = str(dtype).replace("torch.", "")
    ModelCard.from_dict(card.to_dict())  # validate before writing anything
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write(out / CARD_NAME, lambda tmp: Path(tmp).write_text(text))
    return card


def import_hint(path: str | os.PathLike) -> str | None:
    """The one-line fix for a path that is not a checkpoint but can become one: an official `.pth` or
    a Hugging Face folder converts once with `supmae-import` (README "Use the released checkpoints")."""
    p = Path(path)
    if p.is_file() and p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return (
            f"{p} is a PyTorch pickle, not a checkpoint folder: convert an official SupMAE/MAE file once with "
            f"`supmae-import {p} --out DIR` and pass DIR (for a supmae-train run, pass its final/ folder)"
        )
    if p.is_dir() and not (p / CARD_NAME).exists() and (p / "config.json").exists():
        return (
            f"{p} looks like a Hugging Face model folder, not a checkpoint folder: convert it once with "
            f"`supmae-import {p} --out DIR` and pass DIR"
        )
    return None


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: checkpoint not found (expected a folder with {WEIGHTS_NAME} and {CARD_NAME})"
        )
    hint = import_hint(p)
    if hint:
        raise CheckpointError(hint)
    if p.is_dir():
        return p / WEIGHTS_NAME, p / CARD_NAME
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json") if p.with_suffix(".json").exists() else p.with_name(CARD_NAME)
    if p.suffix == ".json":
        return p.with_name(WEIGHTS_NAME), p
    raise CheckpointError(f"{p}: expected a checkpoint folder, a .safetensors file or a model.json")


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, model card file) of a checkpoint folder, .safetensors file or model.json; raises
    CheckpointError for a path that is no checkpoint (the files themselves may still be missing)."""
    return _resolve(path)


def load_model_card(path: str | os.PathLike) -> ModelCard:
    _, card_path = _resolve(path)
    if not card_path.exists():
        raise CheckpointError(
            f"{card_path}: model card not found (a checkpoint is model.safetensors + model.json)"
        )
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{card_path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{card_path}: expected a JSON object")
    return ModelCard.from_dict(data, source=str(card_path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: cannot read weights (truncated or corrupt safetensors file: {e})"
        ) from e


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_short(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_short(shapes)}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match the model card's model: " + "; ".join(problems)
        )


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[SupMAE, ModelCard]:
    """Load a checkpoint folder (or its .safetensors / model.json) -> (model in eval mode, card).

    Weights are cast to float32 unless `dtype` is given (fp16 files are upcast for CPU serving)."""
    weights_path, _ = _resolve(path)
    card = load_model_card(path)
    state = _read_safetensors(weights_path)
    model = create_model(card.config)
    check_state_dict(model, state, str(weights_path))
    target = dtype or torch.float32
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=target).eval()
    return model, card


# ---------------------------------------------------------------------------- timm interop
def timm_model_args(
    config: ModelConfig, variant: str | None = None, file: str | os.PathLike | None = None
) -> tuple[str, dict]:
    """(timm architecture name, kwargs) that build a timm VisionTransformer shaped like our encoder;
    with `file` (a `save_timm` file) the kwargs also load it: `timm.create_model(name, **kwargs)`."""
    size = size_of(variant) if variant and variant in VARIANTS else None
    name = TIMM_NAMES.get(size or "", "vit_base_patch16_224")
    kwargs = dict(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes if config.framework == "finetuned" else 0,
        global_pool="avg" if config.cls_pool == "avg" else "token",
        fc_norm=config.framework == "finetuned" and config.cls_pool == "avg",
    )
    if file is not None:
        # timm drops a classifier whose class count differs from the named architecture's pretrained
        # config (1000): giving it the count keeps a fine-tuned head
        overlay = dict(file=str(file), num_classes=kwargs["num_classes"])
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    return name, kwargs


def timm_state_dict(model: SupMAE) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names (plus `head.*` for a fine-tuned model's linear head)."""
    state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    if model.config.framework == "finetuned":
        state.update({f"head.{k}": v.detach().clone() for k, v in model.cls_head.state_dict().items()})
    return state


def save_timm(model: SupMAE, path: str | os.PathLike) -> Path:
    """Write the encoder (and a fine-tuned head) as a timm-loadable safetensors file:
    `timm.create_model(name, **kwargs)` with `name, kwargs = timm_model_args(config, variant, file=path)`."""
    p = Path(path)
    state = {k: v.contiguous() for k, v in timm_state_dict(model).items()}
    atomic_write(p, lambda tmp: save_file(state, tmp))
    return p
