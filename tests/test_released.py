"""The released checkpoints through every entry point, via `supmae-import` (README "Use the released
checkpoints"): each official layout (tests/official_layout.py) is imported once, then served,
evaluated, exported and trained from; a `.pth` given to an entry point directly is refused with the
import command. The round trip serves an official fine-tuned file through the REST API with the torch and
ONNX Runtime backends and checks the answers against the official forward on the original tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from export.cli import main as export_main
from supmae_serve.api.app import create_app
from supmae_serve.cli import main as serve_main
from supmae_serve.import_cli import main as import_main
from supmae_serve.model import load_checkpoint
from supmae_serve.preprocess import decode_image, to_tensor
from training.cli import main as train_main
from training.eval_cli import main as eval_main

from .conftest import encode, synthetic_image
from .official_layout import (
    OfficialPretrain,
    finetune_args,
    finetuned_state,
    official_finetuned,
    pretrain_args,
    save_official,
)
from .test_api import settings
from .test_eval import CLASSES, write_colour_folder

NAMES = CLASSES + ["gnu", "hen", "ibis", "jay"]  # the 10 classes of the official heads here
LAYOUTS = ("supmae-pretrain", "mae-pretrain", "mae-encoder", "finetuned-avg", "finetuned-cls")
CAN = {  # what each imported layout offers
    "supmae-pretrain": {"embed": True, "classify": True, "reconstruct": True},
    "mae-pretrain": {"embed": True, "classify": False, "reconstruct": True},
    "mae-encoder": {"embed": True, "classify": False, "reconstruct": False},
    "finetuned-avg": {"embed": True, "classify": True, "reconstruct": False},
    "finetuned-cls": {"embed": True, "classify": True, "reconstruct": False},
}
QUIET = ["--set", "progress=none", "--set", "tensorboard=false", "--set", "recon_images=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """{layout: (the .pth, its imported checkpoint folder)}, imported with `supmae-import`."""
    d = tmp_path_factory.mktemp("released")
    names = d / "names.txt"
    names.write_text("\n".join(NAMES))
    mae = OfficialPretrain(head=False, seed=2).state_dict()
    files = {
        "supmae-pretrain": save_official(d / "supmae_pretrain.pth", OfficialPretrain(seed=1).state_dict()),
        "mae-pretrain": save_official(d / "mae_visualize.pth", mae, pretrain_args()),
        "finetuned-avg": save_official(d / "supmae_ft.pth", finetuned_state(True, seed=3), finetune_args()),
        "finetuned-cls": save_official(d / "mae_ft_cls.pth", finetuned_state(False, seed=4), finetune_args()),
    }
    torch.save(
        {"model": {k: v for k, v in mae.items() if not k.startswith("decoder") and "mask_token" not in k}},
        d / "enc.pth",
    )
    files["mae-encoder"] = d / "enc.pth"
    out = {}
    for layout, path in files.items():
        extra = ["--class-names", str(names)] if CAN[layout]["classify"] else []
        assert import_main([str(path), "--out", str(d / layout), *extra]) == 0
        out[layout] = (path, d / layout)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("data") / "colours", per_class=4)


# ---------------------------------------------------------------------------- serve
@pytest.mark.parametrize("layout", LAYOUTS)
def test_supmae_serve_serves_each_imported_layout(released, layout):
    _, ck = released[layout]
    png = encode(synthetic_image((32, 32), seed=5))
    with TestClient(create_app(settings(ck, backend="torch"))) as client:
        info = client.get("/v1/info").json()
        assert info["capabilities"] == CAN[layout]
        assert info["model"]["training"]["imported"]["layout"] == layout
        for task in ("embed", "classify", "reconstruct"):
            r = client.post(f"/v1/{task}", content=png, headers={"content-type": "image/png"})
            assert r.status_code == (200 if CAN[layout][task] else 422), (task, r.text)
        if CAN[layout]["classify"]:
            labels = {
                p["label"]
                for p in client.post(
                    "/v1/classify?top_k=10", content=png, headers={"content-type": "image/png"}
                ).json()["data"][0]["predictions"]
            }
            assert labels == set(NAMES)


def test_supmae_serve_given_the_pth_says_how_to_import_it(released, capsys):
    path, _ = released["finetuned-avg"]
    assert serve_main(["--model", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "PyTorch pickle, not a checkpoint folder" in err and f"supmae-import {path} --out DIR" in err


# ---------------------------------------------------------------------------- eval
@pytest.mark.parametrize("layout", LAYOUTS)
def test_supmae_eval_evaluates_each_imported_layout(released, data, layout, capsys):
    _, ck = released[layout]
    task = "accuracy" if CAN[layout]["classify"] else "knn"
    argv = [task, "--checkpoint", str(ck), "--data", str(data), "--holdout", "12", "--no-save"]
    assert eval_main([*argv, "--workers", "0", "--device", "cpu", "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    assert f"| {ck}" in capsys.readouterr().out


def test_supmae_eval_given_the_pth_says_how_to_import_it(released, data, capsys):
    path, _ = released["supmae-pretrain"]
    assert eval_main(["accuracy", "--checkpoint", str(path), "--data", str(data), "--workers", "0"]) == 2
    assert "supmae-import" in capsys.readouterr().err


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize("layout", LAYOUTS)
def test_supmae_export_writes_verified_timm_weights_for_each_imported_layout(
    released, layout, tmp_path, capsys
):
    _, ck = released[layout]
    argv = [
        "--checkpoint",
        str(ck),
        "--out",
        str(tmp_path),
        "--format",
        "timm",
        "--no-latency",
        "--verify-images",
        "4",
    ]
    assert export_main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [a["file"] for a in manifest["artefacts"]] == ["encoder.timm.safetensors"]
    assert manifest["artefacts"][0]["verify"]["passed"] is True


def test_supmae_export_onnx_and_hf_of_an_imported_pretraining_file(released, tmp_path, capsys):
    _, ck = released["supmae-pretrain"]
    argv = ["--checkpoint", str(ck), "--out", str(tmp_path), "--format", "onnx", "hf", "--precision", "fp32"]
    argv += ["--no-optimize", "--no-reconstruct", "--no-latency", "--verify-images", "4"]
    assert export_main(argv) == 0, capsys.readouterr().err
    files = {a["file"]: a for a in json.loads((tmp_path / "manifest.json").read_text())["artefacts"]}
    assert set(files) == {"encoder.onnx", "hf/model.safetensors"} and all(
        a["verify"]["passed"] for a in files.values()
    )
    assert files["hf/model.safetensors"]["architecture"] == "ViTMAEForPreTraining"
    assert (
        export_main(
            ["--checkpoint", str(ck), "--out", str(tmp_path), "--verify-only", "--verify-images", "4"]
        )
        == 0
    )


def test_supmae_export_given_the_pth_says_how_to_import_it(released, tmp_path, capsys):
    path, _ = released["finetuned-cls"]
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "supmae-import" in capsys.readouterr().err


# ---------------------------------------------------------------------------- train
@pytest.mark.parametrize(
    "layout,stage",
    [
        ("supmae-pretrain", "finetune"),
        ("finetuned-avg", "finetune"),
        ("mae-pretrain", "linprobe"),
        ("mae-encoder", "pretrain"),
        ("mae-pretrain", "pretrain"),
    ],
)
def test_supmae_train_starts_from_an_imported_file(released, layout, stage, tmp_path, capsys):
    _, ck = released[layout]
    argv = ["--recipe", "debug", "--stage", stage, "--checkpoint", str(ck), "--out", str(tmp_path)]
    argv += [
        "--set",
        "max_steps=1",
        "--set",
        "synthetic_images=48",
        "--set",
        "holdout=16",
        "--set",
        "batch_size=8",
    ]
    assert train_main(argv + QUIET) == 0, capsys.readouterr().err
    model, card = load_checkpoint(tmp_path / "final")
    assert card.training["init_checkpoint"] == str(ck)
    assert card.framework == {"finetune": "finetuned", "linprobe": "supervised", "pretrain": "supmae"}[stage]
    if stage == "pretrain":  # SupMAE from MAE weights: what the MAE file had is kept, the rest is fresh
        fresh = ["decoder", "head"] if layout == "mae-encoder" else ["head"]
        assert card.training["fresh_parts"] == fresh and card.untrained == []


def test_supmae_train_given_the_pth_says_how_to_import_it(released, tmp_path, capsys):
    path, _ = released["supmae-pretrain"]
    argv = ["--recipe", "debug", "--stage", "finetune", "--checkpoint", str(path), "--out", str(tmp_path)]
    assert train_main(argv) == 2
    assert "supmae-import" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the round trip
def official_features(state, x):
    """models_vit.py forward_features (global pool + fc_norm) and the head, on the original tensors."""
    vit = official_finetuned(True, num_classes=state["head.weight"].shape[0])
    vit.load_state_dict(state, strict=True)
    vit.eval()
    with torch.no_grad():
        t = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), vit.patch_embed(x)], 1) + vit.pos_embed
        for blk in vit.blocks:
            t = blk(t)
        feat = vit.fc_norm(t[:, 1:].mean(1))
        return feat, vit.head(feat)


def test_an_official_finetuned_file_round_trips_through_the_rest_api(released, tmp_path, capsys):
    """Official fine-tuned .pth -> supmae-import -> supmae-serve (torch) and supmae-export -> supmae-serve
    (onnxruntime): the classification scores and embeddings the API returns are the official forward's."""
    _, ck = released["finetuned-avg"]
    argv = [
        "--checkpoint",
        str(ck),
        "--out",
        str(tmp_path / "export"),
        "--format",
        "onnx",
        "--precision",
        "fp32",
    ]
    assert export_main([*argv, "--no-optimize", "--no-latency", "--verify-images", "4"]) == 0, (
        capsys.readouterr().err
    )
    pngs = [encode(synthetic_image((32, 32), seed=s)) for s in range(3)]
    _, card = load_checkpoint(ck)
    x = torch.stack([to_tensor(decode_image(p), card.preprocessing) for p in pngs])  # what the server feeds
    feat, logits = official_features(finetuned_state(True, seed=3), x)
    probs = torch.softmax(logits, 1).numpy()
    body = {"images": [f"data:image/png;base64,{__import__('base64').b64encode(p).decode()}" for p in pngs]}
    for model, backend in ((ck, "torch"), (tmp_path / "export", "onnxruntime")):
        with TestClient(create_app(settings(model, backend=backend))) as client:
            assert client.get("/v1/info").json()["backend"]["name"] == backend
            r = client.post("/v1/classify", json={**body, "top_k": 10})
            assert r.status_code == 200, r.text
            for i, item in enumerate(r.json()["data"]):
                got = np.zeros(10)
                for p in item["predictions"]:
                    got[p["class_index"]] = p["score"]
                    assert p["label"] == NAMES[p["class_index"]]
                np.testing.assert_allclose(got, probs[i], rtol=1e-4, atol=1e-5)
                assert item["predictions"][0]["class_index"] == int(logits[i].argmax())
            r = client.post("/v1/embed", json={**body, "normalize": False})
            emb = np.array([d["embedding"] for d in r.json()["data"]])
            np.testing.assert_allclose(emb, feat.numpy(), rtol=1e-4, atol=1e-4)
