"""Serving backends (torch, onnxruntime, tensorrt, and a fake for tests) behind one protocol.

Heavy runtimes (onnxruntime, tensorrt) are imported only when their backend is created.
"""

from .base import (
    POOLINGS,
    Backend,
    BackendError,
    BackendInfo,
    CapabilityError,
    ClassifyOutput,
    EmbedOutput,
    ReconstructOutput,
    top_k,
)
from .registry import BackendConfig, ModelNotFoundError, choose_backend, create_backend, register_backend

__all__ = [
    "POOLINGS",
    "Backend",
    "BackendConfig",
    "BackendError",
    "BackendInfo",
    "CapabilityError",
    "ClassifyOutput",
    "EmbedOutput",
    "ModelNotFoundError",
    "ReconstructOutput",
    "choose_backend",
    "create_backend",
    "register_backend",
    "top_k",
]
