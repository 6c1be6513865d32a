"""The SupMAE model and the checkpoint contract. Imports only torch, timm, numpy and safetensors."""

from .checkpoint import (
    CheckpointError,
    ModelCard,
    Preprocessing,
    checkpoint_paths,
    load_checkpoint,
    load_model_card,
    save_checkpoint,
    save_timm,
    timm_model_args,
    timm_state_dict,
)
from .config import FRAMEWORKS, ModelConfig
from .official import imagenet_class_names, import_official
from .simmim import SimMIM
from .supmae import Features, Reconstruction, SupMAE, SupMAEOutput, count_parameters
from .variants import MODEL_CLASSES, VARIANTS, create_model, model_config

__all__ = [
    "FRAMEWORKS",
    "MODEL_CLASSES",
    "VARIANTS",
    "CheckpointError",
    "Features",
    "ModelCard",
    "ModelConfig",
    "Preprocessing",
    "Reconstruction",
    "SimMIM",
    "SupMAE",
    "SupMAEOutput",
    "checkpoint_paths",
    "count_parameters",
    "create_model",
    "imagenet_class_names",
    "import_official",
    "load_checkpoint",
    "load_model_card",
    "model_config",
    "save_checkpoint",
    "save_timm",
    "timm_model_args",
    "timm_state_dict",
]
