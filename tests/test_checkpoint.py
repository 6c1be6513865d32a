import json

import pytest
import timm
import torch

from supmae_serve.model import (
    CheckpointError,
    load_checkpoint,
    load_model_card,
    save_checkpoint,
    save_timm,
    timm_model_args,
)

from .conftest import tiny_model

CLASSES = [f"c{i}" for i in range(10)]


def _trained_like(framework="supmae"):
    m = tiny_model(framework)
    m.train()
    m(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))  # move BatchNorm running stats off init
    return m.eval()


def test_save_load_roundtrip_bit_exact(tmp_path, images):
    m = _trained_like()
    card = save_checkpoint(
        m,
        tmp_path / "ck",
        variant="micro_patch4_32",
        class_names=CLASSES,
        training={"recipe": "test"},
        metrics={"acc": 0.5},
    )
    assert (tmp_path / "ck" / "model.safetensors").exists() and (tmp_path / "ck" / "model.json").exists()
    m2, card2 = load_checkpoint(tmp_path / "ck")
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(m.forward_features(images).logits, m2.forward_features(images).logits)
    assert card2.class_names == CLASSES and card2.metrics == {"acc": 0.5}
    assert card2.capabilities == {"embed": True, "classify": True, "reconstruct": True}
    data = json.loads((tmp_path / "ck" / "model.json").read_text())
    for key in (
        "format_version",
        "variant",
        "model_config",
        "framework",
        "class_names",
        "preprocessing",
        "capabilities",
        "training",
        "metrics",
        "software",
        "created",
    ):
        assert key in data, key
    assert data["preprocessing"]["image_size"] == 32 and data["preprocessing"]["crop_pct"] == 1.0
    assert card.software["torch"] == torch.__version__


def test_fp16_checkpoint_is_half_size_and_close(tmp_path, images):
    m = _trained_like()
    save_checkpoint(m, tmp_path / "a")
    save_checkpoint(m, tmp_path / "b", dtype=torch.float16)
    sa, sb = (tmp_path / n / "model.safetensors" for n in "ab")
    assert sb.stat().st_size < 0.6 * sa.stat().st_size
    m2, card = load_checkpoint(tmp_path / "b")
    assert card.dtype == "float16" and next(m2.parameters()).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(
            m2.forward_features(images).embedding, m.forward_features(images).embedding, rtol=1e-2, atol=1e-2
        )


def test_capabilities_follow_framework(tmp_path):
    save_checkpoint(tiny_model("mae"), tmp_path / "mae")
    save_checkpoint(tiny_model("supervised"), tmp_path / "sup")
    assert load_model_card(tmp_path / "mae").capabilities == {
        "embed": True,
        "classify": False,
        "reconstruct": True,
    }
    assert load_model_card(tmp_path / "sup").capabilities == {
        "embed": True,
        "classify": True,
        "reconstruct": False,
    }


def test_truncated_weights_give_clear_error(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_mismatched_card_names_the_tensors(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    card = json.loads((tmp_path / "ck" / "model.json").read_text())
    card["model_config"]["embed_dim"] = 128
    card["model_config"]["decoder_depth"] = 2
    (tmp_path / "ck" / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "ck")
    msg = str(e.value)
    assert (
        "missing" in msg
        and "decoder_blocks.1" in msg
        and "shape mismatches" in msg
        and "encoder.cls_token" in msg
    )


def test_bad_cards(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    path = tmp_path / "ck" / "model.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        load_model_card(path)
    path.write_text(json.dumps({**good, "class_names": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="2 class names"):
        load_model_card(path)
    path.write_text(json.dumps({**good, "model_config": {**good["model_config"], "bogus": 1}}))
    with pytest.raises(CheckpointError, match="bogus"):
        load_model_card(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = _trained_like()
    save_checkpoint(m, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import supmae_serve.model.checkpoint as ck

    def boom(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(seed=3), tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.endswith(".tmp")] == []
    load_checkpoint(tmp_path / "ck")


def test_encoder_loads_into_timm_with_same_features(tmp_path, images):
    m = _trained_like()
    path = save_timm(m, tmp_path / "encoder.safetensors")
    name, kwargs = timm_model_args(m.config, "micro_patch4_32", file=path)
    t = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(t(images), m.forward_features(images).embedding, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t.forward_features(images)[:, 1:], m.forward_features(images).patch_tokens)


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_a_fine_tuned_head_survives_the_trip_to_timm(tmp_path, images, pool):
    """timm re-initialises a classifier whose class count is not its architecture's 1000 unless told."""
    m = tiny_model("finetuned", cls_pool=pool).eval()
    path = save_timm(m, tmp_path / "encoder.safetensors")
    name, kwargs = timm_model_args(m.config, "micro_patch4_32", file=path)
    t = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(t(images), m.forward_features(images).logits, rtol=1e-5, atol=1e-5)


def test_saved_files_are_readable_by_others(tmp_path):
    """mkstemp creates 0600 files; a checkpoint baked into an image for a non-root user must be readable."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_checkpoint(tiny_model(), tmp_path / "ck")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "model.json"):
        mode = stat.S_IMODE((tmp_path / "ck" / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))
