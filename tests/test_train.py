"""The training engine in-process on the CPU: loss goes down, checkpoints, NaN guard, stages, config."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from supmae_serve.model import create_model, load_checkpoint
from tests.builders import small, write_wds_shard
from training import run_state
from training.engine import FINAL, NonFiniteLossError, train
from training.observe import read_metrics
from training.optim import param_groups
from training.recipes import RECIPES, TrainConfig, apply_overrides, get_recipe
from training.schedule import WarmupCosine, scaled_lr
from training.stages import ProbeHead

torch.set_num_threads(1)  # 2 shared cores: one thread avoids OpenMP stalls under load


def train_losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ------------------------------------------------------------------ the debug recipe learns
def test_debug_recipe_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = small(epochs=5, recon_images=4, tensorboard=True, blr=3e-3)
    res = train(cfg, tmp_path, command="test")
    losses = train_losses(tmp_path)
    assert len(losses) == res.steps == 5 * 8
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)

    model, card = load_checkpoint(tmp_path / FINAL)
    assert card.variant == "micro_patch4_32" and card.framework == "supmae"
    assert card.training["recipe"] == "debug" and card.training["epochs"] == 5
    assert card.training["command"] == "test" and card.training["data"]["kind"] == "synthetic"
    assert card.metrics["holdout_images"] == 30 and 0 <= card.metrics["holdout_top1"] <= 100
    assert (tmp_path / "recon" / "epoch_0005.png").exists()
    assert any((tmp_path / "tb").iterdir())
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2, 3, 4, 5]
    assert evals[-1]["top1"] == card.metrics["holdout_top1"] or math.isclose(
        evals[-1]["top1"], card.metrics["holdout_top1"], abs_tol=1e-5
    )


def test_save_dtype_float16_and_max_steps(tmp_path):
    res = train(small(save_dtype="float16", max_steps=3), tmp_path)
    assert res.stopped == "max_steps" and res.steps == 3
    card = json.loads((tmp_path / FINAL / "model.json").read_text())
    assert card["dtype"] == "float16" and card["training"]["stopped"] == "max_steps"
    assert "holdout_top1" in card["metrics"]
    model, _ = load_checkpoint(tmp_path / FINAL)
    assert next(model.parameters()).dtype == torch.float32


def test_time_budget_stops_at_an_epoch_boundary(tmp_path):
    res = train(small(epochs=50, max_minutes=1e-4), tmp_path)
    assert res.stopped == "time_budget" and res.epochs == 1 and res.steps == 8
    card = json.loads((tmp_path / FINAL / "model.json").read_text())
    assert card["training"]["epochs"] == 1 and "holdout_top1" in card["metrics"]


# ------------------------------------------------------------------ failures stay clean
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_state(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 11 \(epoch 1\)"):
        train(small(epochs=3, inject_nan_at_step=11, log_every=4), tmp_path)
    state = run_state.load_state(tmp_path / run_state.LAST)
    assert state["epoch"] == 1 and state["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / FINAL).exists()
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["kind"] == "error"


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    run_state.atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def dies_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run_state.atomic_save({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = run_state.load_state(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_corrupt_run_state_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(run_state.RunStateError, match="cannot read run state"):
        run_state.load_state(tmp_path / "last.pt")


def write_folder(root, per_class: int):
    """An ImageFolder of generated 32-px PNGs in two classes, a and b."""
    from tests.conftest import synthetic_image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            synthetic_image(seed=i).save(root / c / f"{i}.png")
    return root


def test_cli_bad_data_names_the_file(tmp_path, capsys):
    from training.cli import main

    root = write_folder(tmp_path / "data", 4)
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff nothing")
    rc = main(
        [
            "--recipe",
            "debug",
            "--data",
            str(root),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "dataset=folder",
            "--set",
            "holdout=2",
        ]
    )
    assert rc == 2 and "bad.jpg" in capsys.readouterr().err
    rc = main(
        [
            "--recipe",
            "debug",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "r2"),
            "--set",
            "dataset=folder",
        ]
    )
    assert rc == 2 and "missing: data path does not exist" in capsys.readouterr().err


def test_cli_bad_image_read_by_a_loader_worker_is_one_clear_line(tmp_path, capsys):
    """The streaming path decodes in DataLoader workers: the DataError reaches the user as itself."""
    from training.cli import main

    root = write_folder(tmp_path / "data", 6)
    (root / "b" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    sets = [
        "dataset=folder",
        "holdout=2",
        "in_memory=false",
        "num_workers=1",
        "batch_size=10",
        "progress=none",
    ]
    argv = ["--recipe", "debug", "--data", str(root), "--out", str(tmp_path / "run")]
    assert main([*argv, *(w for s in sets for w in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supmae-train: error: ") and err.count("\n") == 1, err
    assert "5.png: unreadable image" in err and "Traceback" not in err


def test_the_card_records_paths_relative_to_where_the_run_started(tmp_path, monkeypatch):
    """No absolute path of the training machine in the card: --out (which holds the card) and data
    under the start directory are recorded relative to it; a dataset elsewhere keeps its place."""
    from training.cli import main

    work = tmp_path / "work"
    write_folder(work / "data", 4)
    val = write_folder(tmp_path / "shared" / "val", 2)
    monkeypatch.chdir(work)
    out = tmp_path / "runs" / "r1"  # absolute, outside the start directory
    argv = ["--recipe", "debug", "--data", str(work / "data"), "--out", str(out), "--set", "dataset=folder"]
    sets = [f"val_data={val}", "max_steps=1", "batch_size=4", "progress=none", "recon_images=0"]
    assert main([*argv, *(w for s in sets for w in ("--set", s))]) == 0
    tr = load_checkpoint(out / FINAL)[1].training
    flags = " ".join(f"--set {s}" for s in sets)
    assert (
        tr["command"]
        == f"supmae-train --recipe debug --data data --out ../runs/r1 --set dataset=folder {flags}"
    )
    assert tr["data"]["data"] == tr["config"]["data"] == "data"
    assert tr["data"]["val"] == tr["config"]["val_data"] == str(val)  # outside: where the data is
    assert str(work) not in json.dumps(tr)
    # val_data replaces the recipe's hold-out (debug: 64): all of data trains, the metric is named val
    assert tr["data"]["train_images"] == 8 and "holdout" not in tr["data"]
    assert load_checkpoint(out / FINAL)[1].metrics["val_images"] == 4


# ------------------------------------------------------------------ stages
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train(small(epochs=1), out)
    return out / FINAL


def test_finetune_drops_decoder_and_starts_from_the_encoder(tmp_path, pretrained):
    source, _ = load_checkpoint(pretrained)
    cfg = small(
        stage="finetune", checkpoint=str(pretrained), max_steps=2, mixup=0.8, cutmix=1.0, label_smoothing=0.1
    )
    cfg = dataclasses.replace(cfg, layer_decay=0.65, drop_path=0.1, batch_size=12)
    res = train(cfg, tmp_path)
    model, card = load_checkpoint(res.checkpoint)
    assert card.framework == "finetuned" and card.training["init_checkpoint"] == str(pretrained)
    names = set(model.state_dict())
    assert (
        not any(n.startswith(("decoder", "mask_token")) for n in names) and "encoder.norm.weight" not in names
    )
    assert model.cls_head.weight.shape == (10, 64) and "encoder.fc_norm.weight" in names
    # two small steps move the encoder only a little from the pretrained weights
    delta = (model.encoder.blocks[0].attn.qkv.weight - source.encoder.blocks[0].attn.qkv.weight).abs().max()
    assert 0 < delta < 0.05


def test_linprobe_freezes_the_encoder_and_folds_the_bn_head(tmp_path, pretrained):
    source, _ = load_checkpoint(pretrained)
    res = train(
        small(stage="linprobe", checkpoint=str(pretrained), epochs=1, blr=0.1, optimizer="sgd"), tmp_path
    )
    model, card = load_checkpoint(res.checkpoint)
    assert card.framework == "supervised" and isinstance(model.cls_head, torch.nn.Linear)
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k]), k


def test_the_official_probe_reads_the_cls_token_with_lars(tmp_path, pretrained, images):
    """FINETUNE.md: "linear probing is using the class token"; main_linprobe.py: LARS, MAE's clamped
    crop. The saved probe classifies the cls token; the patch-average SGD probe stays an option."""
    for name in ("in1k_linprobe", "cifar10_linprobe"):
        r = get_recipe(name)
        assert (r.pool, r.optimizer, r.crop, r.weight_decay, r.epochs, r.warmup_epochs) == (
            "cls",
            "lars",
            "clamp",
            0.0,
            90,
            10,
        )
    assert get_recipe("in1k_linprobe").sync_bn is False and get_recipe("in1k_linprobe").batch_size * 8 == 8192
    source, _ = load_checkpoint(pretrained)
    cfg = small(stage="linprobe", checkpoint=str(pretrained), epochs=1, blr=0.1, optimizer="lars", pool="cls")
    res = train(dataclasses.replace(cfg, crop="clamp"), tmp_path)
    model, card = load_checkpoint(res.checkpoint)
    assert card.config.cls_pool == "cls" and card.training["config"]["optimizer"] == "lars"
    with torch.no_grad():
        f = model.forward_features(images[:, :, :32, :32])
        torch.testing.assert_close(f.logits, model.cls_head(f.cls_token))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k]), k


def test_pretraining_continues_from_imported_mae_weights(tmp_path, pretrained, images):
    """SupMAE training started from MAE weights: an MAE checkpoint (here with an untrained decoder, as an
    encoder-only import has) gives the encoder; the untrained decoder and the missing head start fresh."""
    import json as _json

    from supmae_serve.model import save_checkpoint

    mae, _ = load_checkpoint(pretrained)
    mae_only = create_model("micro_patch4_32", framework="mae")
    mae_only.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith("cls_head.")})
    card = save_checkpoint(mae_only, tmp_path / "mae", variant="micro_patch4_32")
    data = _json.loads((tmp_path / "mae" / "model.json").read_text())
    (tmp_path / "mae" / "model.json").write_text(_json.dumps({**data, "untrained": ["decoder"]}))
    assert card.framework == "mae"
    res = train(
        small(checkpoint=str(tmp_path / "mae"), max_steps=1, blr=1e-9, warmup_epochs=0), tmp_path / "run"
    )
    model, card = load_checkpoint(res.checkpoint)
    assert card.framework == "supmae" and card.variant == "micro_patch4_32"
    assert card.training["init_parts"] == ["encoder", "norm"] and card.training["fresh_parts"] == [
        "decoder",
        "head",
    ]
    delta = (model.encoder.blocks[0].attn.qkv.weight - mae.encoder.blocks[0].attn.qkv.weight).abs().max()
    assert delta < 1e-5  # one step at lr 1e-9: the encoder is the MAE encoder
    assert not torch.equal(
        model.decoder_pred.weight, mae.decoder_pred.weight
    )  # the untrained decoder was not copied


def test_finetuning_at_another_size_interpolates_the_position_table(tmp_path, pretrained):
    cfg = small(stage="finetune", checkpoint=str(pretrained), max_steps=1, img_size=64, batch_size=4)
    res = train(cfg, tmp_path)
    model, card = load_checkpoint(res.checkpoint)
    # patch 4 at 64 px is no table variant
    assert (card.config.img_size, card.preprocessing.image_size, card.variant) == (64, 64, None)
    assert model.encoder.pos_embed.shape == (1, 1 + 16 * 16, 64)
    with pytest.raises(ValueError, match="img_size needs checkpoint"):
        small(img_size=64).validate()


def test_probe_head_folds_exactly():
    torch.manual_seed(0)
    head = ProbeHead(8, 3)
    head.train()
    for _ in range(5):
        head(torch.randn(32, 8) * 3 + 1)
    head.eval()
    x = torch.randn(4, 8)
    assert torch.allclose(head(x), head.folded()(x), atol=1e-5)


# ------------------------------------------------------------------ components
def test_schedule_warmup_then_cosine():
    s = WarmupCosine(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert s(0) == 0 and s(5) == 0.5 and s(10) == 1.0
    assert math.isclose(s(60), 0.55) and math.isclose(s(110), 0.1) and s(200) == pytest.approx(0.1)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def _decayed(groups) -> tuple[set, set]:
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    return decay, {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}


def test_param_groups_follow_the_official_pretraining_and_fine_tuning():
    """Pretraining (timm 0.3.2 add_weight_decay): only 1-D tensors are exempt, so the cls and mask tokens
    are decayed, and the frozen position tables are not trained. Fine-tuning (param_groups_lrd with
    timm's no_weight_decay): pos_embed and cls_token exempt too, both in layer 0, pos_embed trained."""
    model = create_model("micro_patch4_32", num_classes=10)
    decay, no_decay = _decayed(param_groups(model, 0.05))
    assert {
        "encoder.blocks.0.attn.qkv.weight",
        "cls_head.0.weight",
        "encoder.cls_token",
        "mask_token",
    } <= decay
    assert {"encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias", "cls_head.1.weight"} <= no_decay
    assert "encoder.pos_embed" not in decay | no_decay  # fixed sin-cos table: not trained
    decay, no_decay = _decayed(param_groups(model, 0.05, decay_tokens=False))
    assert {"encoder.cls_token", "mask_token"} <= no_decay and "encoder.blocks.0.attn.qkv.weight" in decay
    ft = create_model("micro_patch4_32", framework="finetuned", num_classes=10)
    groups = param_groups(ft, 0.05, layer_decay=0.5, decay_tokens=False)
    decay, no_decay = _decayed(groups)
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.fc_norm.weight"} <= no_decay
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scales["encoder.patch_embed.proj.weight"] == scales["encoder.pos_embed"] == 0.5**3
    assert (
        scales["encoder.blocks.0.mlp.fc1.weight"] == 0.5**2 and scales["encoder.blocks.1.norm1.weight"] == 0.5
    )
    assert scales["cls_head.weight"] == 1.0 and scales["encoder.fc_norm.weight"] == 1.0
    assert get_recipe("in1k_vit_base_finetune").decay_tokens is False
    assert get_recipe("in1k_vit_base_paper").decay_tokens is True


def test_lars_is_the_official_update():
    """util/lars.py: for a 2-D weight, g + wd * w rescaled by 0.001 |w| / |g + wd * w|, then momentum;
    a 1-D bias gets neither."""
    from training.optim import LARS

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3))
    opt = LARS([{"params": [w, b], "weight_decay": 0.1}], lr=0.5, momentum=0.9)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    mu_w, mu_b = torch.zeros(3, 4), torch.zeros(3)
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        d = gw + 0.1 * w0
        mu_w = 0.9 * mu_w + d * (0.001 * w0.norm() / d.norm())
        mu_b = 0.9 * mu_b + gb
        w0, b0 = w0 - 0.5 * mu_w, b0 - 0.5 * mu_b
        opt.step()
        torch.testing.assert_close(w.detach(), w0)
        torch.testing.assert_close(b.detach(), b0)


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = apply_overrides(
        TrainConfig(), ["epochs=7", "blr=2e-4", "hflip=false", "holdout=5000", "save_dtype=float16"]
    )
    assert (cfg.epochs, cfg.blr, cfg.hflip, cfg.holdout, cfg.save_dtype) == (
        7,
        2e-4,
        False,
        5000.0,
        "float16",
    )
    with pytest.raises(ValueError, match="unknown setting 'epoch'.*epochs"):
        apply_overrides(TrainConfig(), ["epoch=3"])
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        apply_overrides(TrainConfig(), ["epochs=1.5"])
    with pytest.raises(ValueError, match="amp must be one of"):
        dataclasses.replace(TrainConfig(data="x"), amp="fp8").validate()


def test_every_recipe_is_documented_and_valid():
    for name in RECIPES:
        cfg = get_recipe(name)
        doc = RECIPES[name].__doc__ or ""
        assert "Command:" in doc and "Time:" in doc and "Expected:" in doc, name
        extra = {
            "data": cfg.data or "x",
            "checkpoint": cfg.checkpoint or ("ckpt" if cfg.stage != "pretrain" else ""),
        }
        dataclasses.replace(cfg, **extra).validate()
    paper = get_recipe("in1k_vit_base_paper")
    assert (paper.variant, paper.epochs, paper.warmup_epochs, paper.blr, paper.mask_ratio) == (
        "base_patch16_224",
        400,
        20,
        1.5e-4,
        0.75,
    )
    assert (paper.cls_loss_ratio, paper.cls_temperature, paper.scale_min, paper.interpolation) == (
        0.01,
        10.0,
        0.2,
        "bicubic",
    )
    assert (paper.beta1, paper.beta2, paper.weight_decay, paper.batch_size) == (0.9, 0.95, 0.05, 256)
    # the official code: plain DDP (per-GPU BatchNorm), tokens decayed, torchvision's crop, global pool
    assert (paper.sync_bn, paper.decay_tokens, paper.crop, paper.pool) == (False, True, "torchvision", "avg")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_debug_recipe_on_gpu_bf16(tmp_path):
    res = train(small(epochs=2), tmp_path)  # amp=auto: bf16 autocast, fused AdamW, data on the GPU
    card = json.loads((tmp_path / FINAL / "model.json").read_text())
    assert res.steps == 16 and card["training"]["device"] == torch.cuda.get_device_name(0)
    assert all(math.isfinite(v) for v in train_losses(tmp_path))
    load_checkpoint(res.checkpoint)


def test_webdataset_shards_train_for_several_epochs(tmp_path):
    pytest.importorskip("webdataset")
    from tests.conftest import synthetic_image

    shard = write_wds_shard(tmp_path / "shard-000.tar", 40, classes=2)
    val = tmp_path / "val"
    for c in ("0", "1"):
        (val / c).mkdir(parents=True)
        synthetic_image(seed=99).save(val / c / "x.png")
    cfg = small(
        data=str(shard), dataset="wds", wds_samples=40, val_data=str(val), holdout=0, epochs=3, num_workers=0
    )
    res = train(cfg, tmp_path / "run")  # 3 steps per epoch of 12; the 40-image shard is re-read
    assert res.steps == 9 and res.metrics["val_images"] == 2


def test_ema_weights_and_periodic_snapshots(tmp_path):
    res = train(small(ema_decay=0.9, save_every=1), tmp_path)
    card = json.loads((tmp_path / FINAL / "model.json").read_text())
    assert card["training"]["weights"] == "ema" and res.epochs == 2
    assert run_state.load_state(tmp_path / "epoch_0001.pt")["epoch"] == 1
    ema = run_state.load_state(tmp_path / "last.pt")["ema"]
    model, _ = load_checkpoint(tmp_path / FINAL)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k].to(v.dtype)), k
