"""Importing the `.pth` files the official code writes: every released layout, safely, exactly.

The files are built at a tiny size with the official key names, shapes, dtypes and top-level structure
(tests/official_layout.py) and written with torch.save, as `util/misc.py save_model` does. Each import
is checked against the official forward re-implemented on the original tensors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from supmae_serve.backends.registry import ModelNotFoundError, check_model_path
from supmae_serve.import_cli import main as import_main
from supmae_serve.model import CheckpointError, import_official, load_checkpoint, load_model_card
from supmae_serve.model.official import imagenet_class_names

from .official_layout import (
    OfficialPretrain,
    finetune_args,
    finetuned_state,
    official_finetuned_forward,
    official_pretrain_forward,
    pretrain_args,
    save_official,
)

ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    sup = OfficialPretrain(head=True, seed=1)
    mae = OfficialPretrain(head=False, seed=2)
    mae_args = pretrain_args(model="mae_vit_base_patch16_dec512d8b")
    for k in ("temperature", "cls_loss_ratio", "mlp_depth", "nb_classes", "global_pool"):
        delattr(mae_args, k)
    out = {
        "sup": save_official(d / "supmae_pretrain.pth", sup.state_dict()),
        "mae": save_official(d / "mae_visualize.pth", mae.state_dict(), mae_args),
        "ft_avg": save_official(
            d / "supmae_ft.pth", finetuned_state(True, seed=3), finetune_args(), epoch=99
        ),
        "ft_cls": save_official(
            d / "mae_ft_cls.pth", finetuned_state(False, seed=4), finetune_args(global_pool=False), epoch=99
        ),
    }
    # MAE's released encoder-only files hold {"model": the encoder's tensors} and nothing else
    enc = {k: v for k, v in mae.state_dict().items() if k.startswith(ENCODER)}
    torch.save({"model": enc}, d / "mae_pretrain_vit.pth")
    out["enc"] = d / "mae_pretrain_vit.pth"
    return out, sup, mae


def test_supmae_pretraining_file_imports_exactly(files, images, labels):
    paths, sup, _ = files
    raw = torch.load(paths["sup"], weights_only=False)  # the test's own file: inspect its structure
    assert (
        set(raw) == {"model", "optimizer", "epoch", "scaler", "args"}
        and type(raw["args"]).__name__ == "Namespace"
    )
    assert raw["model"]["cls_head.1.num_batches_tracked"].dtype == torch.int64
    model, card = import_official(paths["sup"])
    imp = card.training["imported"]
    assert (
        imp["layout"] == "supmae-pretrain"
        and card.framework == "supmae"
        and card.variant == "micro_patch4_32"
    )
    assert (
        imp["epoch"] == 399
        and imp["args"]["model"] == "mae_vit_base_patch16_d1b"
        and len(imp["sha256"]) == 64
    )
    assert (
        imp["parts"] == ["decoder", "encoder", "head", "norm"] and imp["fresh"] == [] and card.untrained == []
    )
    assert card.capabilities == {"embed": True, "classify": True, "reconstruct": True}
    c = card.config
    assert (c.num_classes, c.cls_hidden_dim, c.cls_temperature, c.cls_loss_ratio, c.decoder_depth) == (
        10,
        256,
        10.0,
        0.01,
        1,
    )
    noise = torch.rand(4, 64)
    loss, pred, mask, logits = official_pretrain_forward(sup, images, noise)
    with torch.no_grad():
        out = model(images, labels, noise=noise)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.loss_rec, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)  # eval-mode BatchNorm statistics
    torch.testing.assert_close(out.loss_cls, F.cross_entropy(logits / 10, labels), rtol=1e-5, atol=1e-6)


def test_mae_visualisation_file_imports_without_head(files, images):
    paths, _, mae = files
    model, card = import_official(paths["mae"])
    assert card.training["imported"]["layout"] == "mae-pretrain" and card.framework == "mae"
    assert card.capabilities == {"embed": True, "classify": False, "reconstruct": True}
    noise = torch.rand(4, 64)
    loss, pred, mask, _ = official_pretrain_forward(mae, images, noise)
    with torch.no_grad():
        out = model(images, noise=noise)
    assert torch.equal(out.mask, mask) and out.logits is None
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def test_mae_encoder_only_file_starts_the_decoder_fresh_and_says_so(files, images):
    paths, _, mae = files
    model, card = import_official(paths["enc"])
    imp = card.training["imported"]
    assert (
        imp["layout"] == "mae-encoder" and imp["parts"] == ["encoder", "norm"] and imp["fresh"] == ["decoder"]
    )
    assert card.untrained == ["decoder"] and card.capabilities == {
        "embed": True,
        "classify": False,
        "reconstruct": False,
    }
    with torch.no_grad():
        x = mae.patch_embed(images) + mae.pos_embed[:, 1:]
        x = torch.cat([(mae.cls_token + mae.pos_embed[:, :1]).expand(4, -1, -1), x], 1)
        for blk in mae.blocks:
            x = blk(x)
        ref = mae.norm(x)
        f = model.forward_features(images)
    torch.testing.assert_close(f.patch_tokens, ref[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.cls_token, ref[:, 0], rtol=1e-5, atol=1e-5)
    # SupMAE training from MAE weights: a fresh head (and decoder), both listed as untrained
    model, card = import_official(paths["enc"], framework="supmae", num_classes=10)
    assert card.framework == "supmae" and card.untrained == ["decoder", "head"]
    assert card.training["imported"]["fresh"] == ["decoder", "head"] and card.class_names is None
    assert card.capabilities == {"embed": True, "classify": False, "reconstruct": False}
    again, _ = import_official(paths["enc"], framework="supmae", num_classes=10)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # fresh parts are seeded: the same on every import


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_finetuned_files_give_the_official_logits(files, images, pool):
    paths, _, _ = files
    path = paths["ft_avg" if pool == "avg" else "ft_cls"]
    model, card = import_official(path)
    assert card.framework == "finetuned" and card.config.cls_pool == pool
    assert (
        card.training["imported"]["layout"] == f"finetuned-{pool}"
        and card.training["imported"]["epoch"] == 99
    )
    assert card.capabilities == {"embed": True, "classify": True, "reconstruct": False}
    state = finetuned_state(pool == "avg", seed=3 if pool == "avg" else 4)
    ref = official_finetuned_forward(state, images, global_pool=pool == "avg")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images).logits, ref, rtol=1e-5, atol=1e-5)
    names = set(model.state_dict())
    assert ("encoder.fc_norm.weight" in names) == (pool == "avg") and ("encoder.norm.weight" in names) == (
        pool == "cls"
    )


def test_position_tables_are_interpolated_to_another_size(files, images):
    """A 32-px fine-tuned file served at 64 px: MAE's interpolate_pos_embed (bicubic on the patch rows,
    the cls row kept), here re-written from util/pos_embed.py, then the official forward at 64 px."""
    paths, _, _ = files
    model, card = import_official(paths["ft_avg"], img_size=64)
    assert card.config.img_size == 64 and card.preprocessing.image_size == 64
    assert card.training["imported"]["pos_embed"] == "interpolated from 8x8 to 16x16 patches (bicubic)"
    state = finetuned_state(True, seed=3)
    pe = state["pos_embed"]
    tokens = pe[:, 1:].reshape(-1, 8, 8, pe.shape[-1]).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(16, 16), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([pe[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    x = F.interpolate(images, size=(64, 64))
    ref = official_finetuned_forward(state, x, global_pool=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_an_imagenet_head_gets_imagenet_names_and_evaluates_on_synset_folders(tmp_path, capsys):
    """1000 classes: ImageNet-1k's names in the card (so /v1/classify says "golden retriever"), and a
    WordNet-id map beside it so that supmae-eval reads ImageNet's n01440764/... folders."""
    from PIL import Image

    from training.eval_cli import main as eval_main

    path = save_official(tmp_path / "in1k.pth", finetuned_state(True, num_classes=1000), finetune_args())
    _, card = import_official(path)
    assert card.class_names[207] == "golden retriever" and card.class_names[0] == "tench, Tinca tinca"
    assert len(set(card.class_names)) == 1000 and "crane (n02012849)" in card.class_names
    assert card.training["imported"]["class_names"] == "imagenet-1k (timm.data.ImageNetInfo)"
    assert imagenet_class_names()[207] == "golden retriever"
    assert import_main([str(path), "--out", str(tmp_path / "ck")]) == 0
    class_map = tmp_path / "ck" / "imagenet_class_map.json"
    assert f"--class-map {class_map}" in capsys.readouterr().out
    for synset in ("n01440764", "n02099601"):
        (tmp_path / "val" / synset).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(
                tmp_path / "val" / synset / f"{i}.png"
            )
    argv = ["accuracy", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "val"), "--no-save"]
    assert eval_main([*argv, "--class-map", str(class_map), "--workers", "0", "--no-progress"]) == 0
    assert "2 of 1000" in capsys.readouterr().out


# ---------------------------------------------------------------------------- safety
class _Evil:
    """A class of the test's own: not among the types an official checkpoint holds."""


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.pth"
    torch.save({"model": finetuned_state(True), "args": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused: the file holds a `(posix|os|nt)\.system` object"):
        import_official(path)
    assert not marker.exists()  # the reduce was never called
    assert import_main([str(path), "--out", str(tmp_path / "ck")]) == 2
    assert not marker.exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    "value,named",
    [(_Evil(), "tests.test_import._Evil"), (np.float64(0.1), "numpy"), (torch.nn.Linear(2, 2), "torch.nn")],
)
def test_any_type_beyond_the_official_ones_is_refused_by_name(tmp_path, value, named):
    args = finetune_args(lr=value)  # inside the Namespace, where the official code puts plain values
    path = save_official(tmp_path / "x.pth", finetuned_state(True), args)
    with pytest.raises(CheckpointError) as e:
        import_official(path)
    assert named in str(e.value) and "argparse.Namespace" in str(e.value)


def test_the_allow_list_is_exactly_namespace():
    import argparse

    from supmae_serve.model.official import ALLOWED_TYPES

    assert ALLOWED_TYPES == (argparse.Namespace,)
    with pytest.raises(pickle.UnpicklingError):  # the allow-list is scoped to the import, not global
        import io

        buf = io.BytesIO()
        torch.save({"args": argparse.Namespace(a=1)}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)


def test_unknown_layouts_list_what_was_expected_and_found(tmp_path):
    state = finetuned_state(True)
    no_blocks = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    with pytest.raises(CheckpointError) as e:
        import_official({"model": no_blocks})
    msg = str(e.value)
    assert "no known SupMAE/MAE layout" in msg and "Expected the ViT encoder" in msg
    assert "finetuned-avg = fc_norm.* + head.*" in msg and "Found: cls_token, fc_norm.bias" in msg
    hf_named = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, 4),
        "vit.encoder.layer.0.output.dense.weight": torch.zeros(4, 4),
    }
    with pytest.raises(CheckpointError, match="Hugging Face ViTMAE names: pass the model folder"):
        import_official(hf_named)
    with pytest.raises(CheckpointError, match="can become finetuned, not 'supmae'"):
        import_official({"model": state}, framework="supmae")
    with pytest.raises(CheckpointError, match="its head has 10 classes, not 5"):
        import_official({"model": state}, num_classes=5)
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        import_official({"model": {"a": 1}})


def test_shapes_the_table_cannot_name_need_a_variant_or_heads():
    state = OfficialPretrain(head=False).state_dict()
    state = {k: v for k, v in state.items() if k.startswith(ENCODER)}
    for k in list(state):  # a 3-block encoder: no table size
        if k.startswith("blocks.1."):
            state[k.replace("blocks.1.", "blocks.2.")] = state[k]
    with pytest.raises(CheckpointError, match="attention heads .* set num_heads=N"):
        import_official(state)
    with pytest.raises(CheckpointError, match="variant tiny_patch4_32 is 192-d with 12 blocks"):
        import_official(state, variant="tiny_patch4_32")
    _, card = import_official(state, num_heads=4, decoder_embed_dim=32, decoder_num_heads=2)
    assert (card.config.depth, card.config.num_heads, card.variant) == (3, 4, None)


def test_projection_head_is_another_name_of_cls_head(files, images):
    paths, _, _ = files
    raw = torch.load(paths["sup"], weights_only=False)["model"]
    renamed = {k.replace("cls_head.", "projection_head."): v for k, v in raw.items()}
    a, _ = import_official(paths["sup"])
    b, _ = import_official(renamed)
    with torch.no_grad():
        assert torch.equal(a.forward_features(images).logits, b.forward_features(images).logits)


# ---------------------------------------------------------------------------- supmae-import and the entry points
def test_import_command_writes_a_checkpoint_every_tool_reads(files, tmp_path, capsys, images):
    paths, _, _ = files
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"kind {i}" for i in range(10)) + "\n")
    out = tmp_path / "ck"
    assert import_main([str(paths["ft_avg"]), "--out", str(out), "--class-names", str(names)]) == 0
    text = capsys.readouterr().out
    assert (
        "finetuned-avg -> finetuned" in text
        and "fresh: nothing" in text
        and f"supmae-serve --model {out}" in text
    )
    model, card = load_checkpoint(out)
    assert (
        card.class_names == [f"kind {i}" for i in range(10)]
        and card.training["imported"]["class_names"] == "given"
    )
    direct, _ = import_official(paths["ft_avg"])
    with torch.no_grad():
        assert torch.equal(model.forward_features(images).logits, direct.forward_features(images).logits)
    assert (
        import_main([str(paths["mae"]), "--out", str(tmp_path / "vis"), "--set", "norm_pix_loss=false"]) == 0
    )
    assert load_model_card(tmp_path / "vis").config.norm_pix_loss is False
    assert import_main([str(paths["mae"]), "--out", str(tmp_path / "v2"), "--set", "norm_pix=0"]) == 2
    assert "expected key=value with key a ModelConfig field" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('["a", "b"]')
    assert (
        import_main(
            [str(paths["ft_avg"]), "--out", str(tmp_path / "x"), "--class-names", str(tmp_path / "bad.json")]
        )
        == 2
    )
    assert "2 class names for a head with 10 classes" in capsys.readouterr().err


def test_a_pth_given_to_an_entry_point_says_how_to_import_it(files):
    paths, _, _ = files
    for load in (load_checkpoint, load_model_card):
        with pytest.raises(CheckpointError, match=r"PyTorch pickle, not a checkpoint folder.*supmae-import"):
            load(paths["ft_avg"])
    with pytest.raises(ModelNotFoundError, match=r"supmae-import .*supmae_ft.pth --out DIR"):
        check_model_path(paths["ft_avg"])
