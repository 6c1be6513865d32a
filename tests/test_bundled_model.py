"""The bundled default model (supmae_serve/assets/cifar10_vit_tiny): its card and that it serves."""

import os
import shlex
from pathlib import Path

import numpy as np
import torch

from supmae_serve.backends.registry import BackendConfig, create_backend
from supmae_serve.model import load_checkpoint, load_model_card
from supmae_serve.preprocess import batch
from supmae_serve.settings import DEFAULT_MODEL

from .conftest import synthetic_image

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_bundled_model_card():
    assert (DEFAULT_MODEL / "model.safetensors").exists(), (
        f"the bundled model is missing from {DEFAULT_MODEL}"
    )
    card = load_model_card(DEFAULT_MODEL)
    assert card.variant == "tiny_patch4_32" and card.framework == "supmae"
    assert card.class_names == CIFAR10
    assert card.capabilities == {"embed": True, "classify": True, "reconstruct": True}
    assert card.preprocessing.image_size == 32 and card.dtype == "float16"
    assert card.training["recipe"] == "cifar10_vit_tiny" and card.training["stopped"] == "completed"
    assert "supmae-train" in card.training["command"] and "cifar10" in card.training["data"]["data"]
    # no path of the machine that trained it, and the README shows the very command the card records
    words = shlex.split(card.training["command"])
    assert not [w for w in words if os.path.isabs(w.partition("=")[2] or w)], words
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"`{card.training['command']}`" in readme
    top1 = card.metrics["holdout_top1"]
    assert (
        card.metrics["holdout_images"] == 5000 and 60 < top1 <= 100
    )  # percent; chance is 10; shipped: 65.98
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 16 * 1024 * 1024


def test_bundled_model_classifies_generated_images():
    backend = create_backend(BackendConfig(model=DEFAULT_MODEL, backend="torch", device="cpu"))
    card = backend.card
    imgs = [synthetic_image((32 + 7 * i, 32 + 5 * i), seed=i) for i in range(5)]
    x = batch(imgs, card.preprocessing)
    out = backend.classify(x)
    assert out.probs.shape == (5, 10) and out.labels == CIFAR10
    np.testing.assert_allclose(out.probs.sum(1), 1.0, rtol=1e-4)
    emb = backend.embed(x).embedding
    assert emb.shape == (5, 192) and np.isfinite(emb).all()
    rec = backend.reconstruct(x, 0.75, [0] * 5)
    assert rec.pasted.shape == (5, 3, 32, 32)


def test_bundled_model_agrees_with_direct_torch():
    model, card = load_checkpoint(DEFAULT_MODEL)
    x = batch([synthetic_image((32, 32), seed=9)], card.preprocessing)
    with torch.no_grad():
        logits = model.forward_features(x).logits
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
