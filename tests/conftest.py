"""Shared fixtures: tiny models and synthetic images (tests never read ../shared)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from supmae_serve.model import create_model

TINY = "micro_patch4_32"  # 64-d, 2 blocks, 64 patches: milliseconds on a CPU


def tiny_model(framework: str = "supmae", num_classes: int = 10, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model(TINY, framework=framework, num_classes=num_classes, **overrides)


def synthetic_image(size=(32, 32), seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 3, 7, 9])


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscribing the shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def graph_cache_dir(tmp_path_factory):
    """One graph cache for the whole run (never the user's ~/.cache): servers started with the default
    settings, in this process or as subprocesses, build a checkpoint's graph once and reuse it after."""
    import os

    path = tmp_path_factory.mktemp("graph_cache")
    old = os.environ.get("SUPMAE_GRAPH_CACHE")
    os.environ["SUPMAE_GRAPH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SUPMAE_GRAPH_CACHE", None)
    else:
        os.environ["SUPMAE_GRAPH_CACHE"] = old
