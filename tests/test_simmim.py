"""SimMIM as its own class: `create_model` picks the class from the config, checkpoints keep the same
contract, and `SupMAE` holds no SimMIM branch (the stage-by-stage behaviour is pinned in test_model.py)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from supmae_serve.model import (
    FRAMEWORKS,
    MODEL_CLASSES,
    SimMIM,
    SupMAE,
    create_model,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from supmae_serve.model.official import assemble

from .conftest import TINY, tiny_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "supmae_serve" / "model"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_create_model_picks_the_class_from_the_config(framework):
    expected = SimMIM if framework == "simmim" else SupMAE
    assert MODEL_CLASSES[framework] is expected
    by_name = create_model(TINY, framework=framework, num_classes=10)
    by_config = create_model(model_config(TINY, framework=framework, num_classes=10))
    assert type(by_name) is expected and type(by_config) is expected
    # overrides of a config go through the config's checks, and may change the class
    other = "supmae" if framework == "simmim" else "simmim"
    switched = create_model(by_name.config, framework=other, num_classes=3)
    assert type(switched) is MODEL_CLASSES[other] and switched.config.num_classes == 3
    assert by_name.config.framework == framework  # the given config is not modified


def test_every_framework_has_exactly_one_class():
    assert set(MODEL_CLASSES) == set(FRAMEWORKS)
    assert sorted(f for cls in (SupMAE, SimMIM) for f in cls.frameworks) == sorted(FRAMEWORKS)


def test_a_class_refuses_a_framework_it_does_not_build():
    with pytest.raises(ValueError, match=r"SupMAE builds .* not 'simmim'.*create_model\(config\)"):
        SupMAE(model_config(TINY, framework="simmim"))
    with pytest.raises(ValueError, match=r"SimMIM builds simmim models, not 'supmae'"):
        SimMIM(model_config(TINY, framework="supmae"))


def test_supmae_module_has_no_simmim_branch():
    """No comparison with (or any code literal) "simmim" left in supmae.py: SimMIM's differences live in
    its subclass. Docstrings may name it; only exact "simmim" string literals count."""
    tree = ast.parse((MODEL_DIR / "supmae.py").read_text())
    literals = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "simmim"]
    assert literals == [], f"supmae.py compares with 'simmim' on lines {literals}"
    # the stages that differ are SimMIM's own methods (forward_loss is SupMAE's, over these two)
    stages = {
        "draw_mask",
        "forward_encoder",
        "forward_decoder",
        "reconstruction_target",
        "patch_error",
        "forward_pool",
    }
    assert stages <= set(vars(SimMIM))


def test_simmim_state_dict_keys_and_checkpoint_round_trip(tmp_path, images):
    m = tiny_model("simmim").eval()
    keys = set(m.state_dict())
    assert {"mask_token", "decoder_pred.weight", "decoder_pred.bias"} <= keys
    assert not any(
        k.startswith(("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pos")) for k in keys
    )
    assert m.mask_token.shape == (1, 1, m.config.embed_dim)  # the encoder's width, not a decoder's
    save_checkpoint(m, tmp_path / "ckpt", variant=TINY)
    loaded, card = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is SimMIM and card.framework == "simmim"
    assert list(loaded.state_dict()) == list(m.state_dict())
    with torch.no_grad():
        a, b = m.reconstruct(images, seed=3), loaded.reconstruct(images, seed=3)
    torch.testing.assert_close(a.pasted, b.pasted)
    # the importer's assembly (our-named tensors + a config) picks the class the same way
    again, _ = assemble(m.state_dict(), m.config, variant=TINY, source="test", imported={})
    assert type(again) is SimMIM


def test_simmim_reconstruction_ignores_norm_pix_loss(images):
    """SimMIM predicts the input's pixels, so `norm_pix_loss` changes neither its loss nor its images."""
    a = tiny_model("simmim", norm_pix_loss=True).eval()
    b = create_model(dataclasses.replace(a.config, norm_pix_loss=False))
    b.load_state_dict(a.state_dict())
    b.eval()
    noise = torch.rand(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(images, noise=noise).loss, b(images, noise=noise).loss)
        torch.testing.assert_close(a.reconstruct(images, seed=1).pasted, b.reconstruct(images, seed=1).pasted)


def test_simmim_trains_with_ema_and_continues_from_a_supmae_checkpoint(tmp_path):
    """The trainer builds every model through create_model: a SimMIM run (with its EMA shadow and final
    model) saves a SimMIM checkpoint, and a SupMAE checkpoint continues as SimMIM pretraining."""
    from training.engine import FINAL, train

    from .builders import small  # the debug recipe, smaller

    base = small(epochs=1, max_steps=2)
    res = train(dataclasses.replace(base, framework="simmim", ema_decay=0.9), tmp_path / "simmim")
    model, card = load_checkpoint(tmp_path / "simmim" / FINAL)
    assert type(model) is SimMIM and card.framework == "simmim" and card.training["weights"] == "ema"

    train(base, tmp_path / "supmae")
    res = train(
        dataclasses.replace(base, framework="simmim", checkpoint=str(tmp_path / "supmae" / FINAL)),
        tmp_path / "continued",
    )
    model, card = load_checkpoint(res.checkpoint)
    assert type(model) is SimMIM and card.framework == "simmim"
    # the encoder came from the SupMAE checkpoint; SimMIM's mask token (encoder width) and pixel head are new
    assert "encoder" in card.training["init_parts"] and "decoder" in card.training["fresh_parts"]
