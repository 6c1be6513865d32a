"""Hugging Face transformers ViTMAE, both ways: a ViTMAEForPreTraining / ViTMAEModel folder imports into
our model, and our export loads with `from_pretrained`; with the same `noise` the losses, masks,
predictions and hidden states agree (small config, random weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from supmae_serve.import_cli import main as import_main
from supmae_serve.model import CheckpointError, load_checkpoint
from supmae_serve.model.hf import import_hf, save_hf

from .conftest import tiny_model

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

transformers.logging.set_verbosity_error()


def hf_model(seed: int = 0, **kw) -> ViTMAEForPreTraining:
    """A small random ViTMAEForPreTraining; layer_norm_eps stays the Hub's 1e-12."""
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=32,
        patch_size=4,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
        norm_pix_loss=True,
    )
    torch.manual_seed(seed)
    m = ViTMAEForPreTraining(ViTMAEConfig(**{**cfg, **kw}))
    with torch.no_grad():  # move every tensor off its init value (LayerNorm ones, zero biases, tables)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def our_hidden_states(model, images, ids_keep):
    """Our encoder layer by layer on the kept patches: (embedding output, each block's output), final."""
    enc = model.encoder
    x = model._embed(images)
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
    states = [x]
    for blk in enc.blocks:
        states.append(blk(states[-1]))
    return states, enc.norm(states[-1])


def check_parity(hf: ViTMAEForPreTraining, ours, images, noise):
    with torch.no_grad():
        h = hf(images, noise=noise, output_hidden_states=True)
        o = ours(images, noise=noise)
        base = hf.vit(images, noise=noise)
        ids_keep = torch.argsort(noise, 1)[:, : int(noise.shape[1] * (1 - ours.config.mask_ratio))]
        states, last = our_hidden_states(ours, images, ids_keep)
    assert torch.equal(h.mask, o.mask)
    torch.testing.assert_close(o.loss_rec, h.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o.pred, h.logits, rtol=1e-5, atol=1e-5)
    assert len(h.hidden_states) == len(states)
    for a, b in zip(h.hidden_states, states, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, base.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_a_vitmae_pretraining_folder_imports_with_the_same_outputs(tmp_path, images):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    model, card = import_hf(tmp_path / "hf")
    assert card.framework == "mae" and card.config.norm_eps == 1e-12 and card.config.decoder_depth == 2
    assert card.training["imported"]["layout"] == "ViTMAEForPreTraining" and card.untrained == []
    check_parity(hf, model, images, torch.rand(4, 64))


def test_every_spelling_of_the_tensor_names_reads_the_same(tmp_path, images):
    """The Hub's (transformers 4) names, transformers 5's saved names and its in-memory names."""
    hf = hf_model(seed=1)
    hf.save_pretrained(tmp_path / "v5saved")
    saved = load_file(str(tmp_path / "v5saved" / "model.safetensors"))
    assert any(k.startswith("decoder.decoder_encoder.layer.") for k in saved)
    hub = {
        k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in saved.items()
    }
    live = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(".attention.q_proj." in k for k in live)
    ref, _ = import_hf(tmp_path / "v5saved")
    for name, state in (("hub", hub), ("live", live)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "v5saved" / "config.json").read_text())
        save_file(state, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        model, _ = import_hf(tmp_path / name)
        for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, k)


def test_a_vitmae_model_folder_imports_the_encoder_only(tmp_path, images):
    hf = hf_model(seed=2)
    hf.vit.save_pretrained(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    model, card = import_hf(tmp_path / "enc")
    assert card.untrained == ["decoder"] and card.capabilities["reconstruct"] is False
    noise = torch.rand(4, 64)
    with torch.no_grad():
        ids_keep = torch.argsort(noise, 1)[:, :16]
        _, last = our_hidden_states(model, images, ids_keep)
        torch.testing.assert_close(last, hf.vit(images, noise=noise).last_hidden_state, rtol=1e-5, atol=1e-5)
    # SupMAE training from the HF MAE weights: the same encoder, a fresh head
    model, card = import_hf(tmp_path / "enc", framework="supmae", num_classes=10)
    assert card.framework == "supmae" and card.untrained == ["decoder", "head"]


@pytest.mark.parametrize("framework", ["supmae", "mae"])
def test_our_export_loads_in_transformers_with_the_same_outputs(tmp_path, images, framework):
    ours = tiny_model(framework, seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.eval()
    save_hf(ours, tmp_path / "hf")
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    check_parity(hf.eval(), ours, images, torch.rand(4, 64))
    enc = ViTMAEModel.from_pretrained(tmp_path / "hf").eval()  # the same folder as a plain encoder
    noise = torch.rand(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            enc(images, noise=noise).last_hidden_state, hf.vit(images, noise=noise).last_hidden_state
        )
    back, _ = import_hf(tmp_path / "hf")  # and back again, bit for bit
    for k, v in back.state_dict().items():
        if not k.startswith("cls_head."):
            assert torch.equal(v, ours.state_dict()[k]), k


def test_models_without_an_mae_decoder_export_as_vitmae_model(tmp_path, images):
    sup = tiny_model("supervised").eval()
    save_hf(sup, tmp_path / "sup")
    enc, info = ViTMAEModel.from_pretrained(tmp_path / "sup", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # ViTMAEModel always masks by config.mask_ratio; noise = arange keeps every patch in order at ratio 0
    enc = ViTMAEModel.from_pretrained(tmp_path / "sup", mask_ratio=0.0).eval()
    with torch.no_grad():
        tokens = enc(images, noise=torch.arange(64.0).expand(4, -1)).last_hidden_state
        f = sup.forward_features(images)
    torch.testing.assert_close(tokens[:, 1:], f.patch_tokens, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="fc_norm, which ViTMAE does not have"):
        save_hf(tiny_model("finetuned"), tmp_path / "ft")


def test_import_command_reads_a_hf_folder(tmp_path, capsys):
    hf_model(seed=4).save_pretrained(tmp_path / "hf")
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert "ViTMAEForPreTraining -> mae" in capsys.readouterr().out
    model, card = load_checkpoint(tmp_path / "ck")
    assert card.training["imported"]["format"] == "Hugging Face transformers ViTMAE folder"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "vit"}')
    assert import_main([str(tmp_path / "other"), "--out", str(tmp_path / "x")]) == 2
    assert "must be a Hugging Face ViTMAE model" in capsys.readouterr().err
