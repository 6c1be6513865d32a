"""The trainer's units on their own: batch sources (the BatchSource protocol), RunState and last.pt,
train_step, the grouped TrainConfig and its dotted --set, the resize of validation images."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from supmae_serve.model import create_model
from supmae_serve.model.checkpoint import Preprocessing
from supmae_serve.preprocess import normalize_image, resize_uint8, uint8_to_input
from training import cli, run_state
from training import data as D
from training.batches import (
    BatchSource,
    GlobalBatchSampler,
    LoaderBatches,
    PILTensorDataset,
    StreamBatches,
    TensorBatches,
    build_data,
    epoch_permutation,
)
from training.distributed import DistInfo
from training.engine import FINAL, config_from_state, train
from training.observe import read_metrics
from training.optim import EMA
from training.recipes import GROUPS, TrainConfig, apply_overrides, field_group, get_recipe
from training.run_state import Checkpointer, RunState
from training.step import StepParts, mask_noise, train_step

torch.set_num_threads(1)
PREP = Preprocessing.for_size(32)


def _images(n: int = 40, classes: int = 4) -> D.TensorImages:
    return D.synthetic_images(n, classes, 32, seed=1)


def _tensor_batches(data: D.TensorImages, rank: int = 0, world: int = 1, batch: int = 4) -> TensorBatches:
    return TensorBatches(
        data,
        batch_size=batch,
        dist=DistInfo(rank=rank, world_size=world),
        seed=3,
        image_size=32,
        scale=(0.5, 1.0),
        hflip=True,
        mode="bilinear",
        prep=PREP,
    )


# ------------------------------------------------------------------ batch sources
def test_every_batch_source_declares_the_protocol():
    data = _images()
    dist = DistInfo()
    sources = [
        _tensor_batches(data),
        LoaderBatches(PILTensorDataset(data, lambda im: normalize_image(im, PREP)), batch_size=4, dist=dist, seed=0, num_workers=0),
        StreamBatches([(torch.zeros(4, 3, 32, 32), [0] * 4)], samples=8, batch_size=4, dist=dist, num_workers=0),
    ]  # fmt: skip
    for src in sources:
        assert isinstance(src, BatchSource), type(src).__name__
        assert src.global_batch == 4 and src.steps_per_epoch in (10, 2)
    assert not isinstance(object(), BatchSource)
    cfg = dataclasses.replace(get_recipe("debug"), synthetic_images=64, holdout=16, batch_size=8)
    built = build_data(cfg, 32, PREP, dist)
    # 10 classes: the hold-out of 16 rounds to 2 per class, 20 images; 44 / 8 = 5 steps
    assert isinstance(built.train, BatchSource) and built.train.steps_per_epoch == 44 // 8
    assert isinstance(built.val, D.TensorImages) and len(built.val) == 20


def test_an_epoch_started_mid_way_is_the_tail_of_the_whole_epoch():
    """What a resume relies on: epoch(e, k) yields exactly the batches k.. of epoch(e, 0)."""
    src = _tensor_batches(_images())
    whole = list(src.epoch(2))
    tail = list(src.epoch(2, start_step=6))
    assert len(whole) == src.steps_per_epoch == 10 and len(tail) == 4
    for (xa, ya), (xb, yb) in zip(whole[6:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(whole[0][1], list(src.epoch(3))[0][1])  # another epoch, another order
    x, y = whole[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)


def test_two_processes_see_the_rows_of_one_global_batch():
    data = _images()
    one = list(_tensor_batches(data, batch=8).epoch(0))
    ranks = [list(_tensor_batches(data, rank=r, world=2, batch=4).epoch(0)) for r in (0, 1)]
    for s in range(len(one)):
        torch.testing.assert_close(torch.cat([ranks[0][s][0], ranks[1][s][0]]), one[s][0])
        assert torch.equal(torch.cat([ranks[0][s][1], ranks[1][s][1]]), one[s][1])


def test_the_loader_sampler_follows_the_same_order():
    sampler = GlobalBatchSampler(40, 4, DistInfo(), seed=3)
    sampler.set_epoch(1, start_step=2)
    perm = epoch_permutation(40, 3, 1)
    assert list(sampler) == [perm[s * 4 : s * 4 + 4].tolist() for s in range(2, 10)] and len(sampler) == 8


def test_validation_images_are_resized_by_preprocess():
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert resize_uint8(x, 16) is x
    y = resize_uint8(x, 32, chunk=2)
    assert y.shape == (3, 3, 32, 32) and y.dtype == torch.uint8
    # the same resize rule as the server's GPU path (uint8_to_input) for a square image at crop_pct 1
    prep = Preprocessing(image_size=32, crop_pct=1.0, interpolation="bicubic")
    torch.testing.assert_close(
        uint8_to_input(x[0], prep), normalize_image_tensor(y[0], prep), atol=0.02, rtol=0
    )


def normalize_image_tensor(img: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    from PIL import Image

    return normalize_image(Image.fromarray(img.permute(1, 2, 0).numpy()), prep)


# ------------------------------------------------------------------ run state
def test_run_state_round_trip_and_bookkeeping():
    s = RunState(epoch=2, step_in_epoch=3, step=19, history=[{"kind": "eval", "step": 16, "top1": 0.4}])
    s.elapsed_before = 100.0
    s.history.append({"kind": "eval", "step": 19, "top1": 0.3})
    d = s.state_dict()
    assert set(d) == set(run_state.RUN_KEYS) and d["elapsed_s"] >= 100.0
    t = RunState()
    t.load_state_dict(d)
    assert (t.epoch, t.step_in_epoch, t.step, t.history) == (2, 3, 19, s.history)
    assert t.elapsed() >= d["elapsed_s"] and t.history is not s.history
    assert t.last_eval["step"] == 19 and t.best["top1"] == 0.4
    t.advance()
    t.end_epoch(steps_per_epoch=8)
    assert (t.epoch, t.step_in_epoch, t.step) == (2, 4, 20)  # mid-epoch: stays
    for _ in range(4):
        t.advance()
    t.end_epoch(steps_per_epoch=8)
    assert (t.epoch, t.step_in_epoch, t.step) == (3, 0, 24)
    assert RunState().best is None and RunState().last_eval is None


def test_checkpointer_saves_and_resumes_model_optimiser_rng_and_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path, {"model": model, "optimizer": opt, "ema": None}, {"config": {"lr": 0.1}})
    state = RunState(epoch=1, step=5, step_in_epoch=1, history=[{"kind": "eval", "step": 4}])
    ckpt.save(state)
    want = torch.rand(3)  # the RNG stream after the save
    saved = run_state.load_state(tmp_path / run_state.LAST)
    assert saved["config"] == {"lr": 0.1} and saved["ema"] is None and saved["step"] == 5

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    opt.state.clear()
    resumed = RunState()
    Checkpointer(tmp_path, {"model": model, "optimizer": opt, "ema": None}, {}).resume(resumed)
    assert torch.equal(model.weight, weights["weight"]) and len(opt.state) == 2
    assert (resumed.epoch, resumed.step, resumed.step_in_epoch, resumed.history) == (1, 5, 1, state.history)
    assert torch.equal(torch.rand(3), want)  # this process's RNG as it was at the save
    assert ckpt.keep_epoch(1).name == "epoch_0001.pt"


# ------------------------------------------------------------------ the step
def _parts(model, **kw) -> StepParts:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return StepParts(
        forward=lambda x, y, noise: model(x, y, noise=noise),
        optimizer=opt,
        terms=("loss", "loss_rec", "loss_cls"),
        **kw,
    )


def test_train_step_lowers_the_loss_of_a_tiny_model_and_returns_its_terms():
    torch.manual_seed(0)
    model = create_model("micro_patch4_32", num_classes=4, cls_loss_ratio=1.0).train()
    parts = _parts(model, clip_grad=1.0, clip_params=list(model.parameters()))
    data = _images(16)
    x, y = torch.stack([normalize_image_tensor(i, PREP) for i in data.images]), data.labels
    noise = mask_noise(1, 0, 16, model.config.num_patches, 0, 16, torch.device("cpu"))
    losses = [train_step(parts, x, y, noise) for _ in range(15)]
    assert losses[0].shape == (3,) and not losses[0].requires_grad
    total, rec, cls_ = losses[0].tolist()
    assert math.isclose(total, rec + 1.0 * cls_, rel_tol=1e-5)  # loss = rec + cls_loss_ratio x cls
    assert losses[-1][0] < losses[0][0] - 0.1, (losses[0], losses[-1])


def test_train_step_injects_nan_updates_the_ema_and_uses_the_given_optimizer_step():
    torch.manual_seed(0)
    model = create_model("micro_patch4_32", num_classes=4).train()
    ema = EMA(model, 0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    calls = []
    parts = _parts(model, ema=ema, ema_model=model)
    plain_step = parts.optimizer.step
    parts.optimizer_step = lambda: calls.append(1) or plain_step()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(train_step(parts, x, y)).all() and calls == [1]
    changed = [
        k for k, v in ema.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert changed  # the EMA followed the update
    assert not torch.isfinite(train_step(parts, x, y, nan_loss=True)[0])


def test_masking_noise_is_the_global_batchs_rows():
    whole = mask_noise(5, 7, 8, 16, 0, 8, torch.device("cpu"))
    part = mask_noise(5, 7, 8, 16, 4, 4, torch.device("cpu"))
    assert torch.equal(whole[4:], part) and not torch.equal(
        whole, mask_noise(5, 8, 8, 16, 0, 8, torch.device("cpu"))
    )


# ------------------------------------------------------------------ the config: groups, dotted --set
def test_every_field_is_in_exactly_one_group_and_group_views_hold_their_values():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    grouped = [n for cls in GROUPS.values() for n in cls.__dataclass_fields__]
    assert sorted(names) == sorted(grouped) and len(set(grouped)) == len(grouped)
    assert names == grouped  # the flat order is the groups' order
    cfg = get_recipe("in1k_vit_base_paper")
    optim = cfg.group("optim")
    assert type(optim).__name__ == "OptimSettings" and (optim.epochs, optim.beta2) == (400, 0.95)
    assert not hasattr(optim, "data") and cfg.group("data").batch_size == 256
    assert (field_group("lr"), field_group("data"), field_group("save_every")) == (
        "optim",
        "data",
        "checkpointing",
    )
    with pytest.raises(ValueError, match="unknown settings group 'optimiser'"):
        cfg.group("optimiser")


def test_set_takes_dotted_names_as_well_as_flat_ones():
    cfg = apply_overrides(
        TrainConfig(), ["optim.lr=1e-3", "data.batch_size=64", "data.data=synthetic", "epochs=3"]
    )
    assert (cfg.lr, cfg.batch_size, cfg.data, cfg.epochs) == (1e-3, 64, "synthetic", 3)
    assert apply_overrides(TrainConfig(), ["logging.tensorboard=false"]).tensorboard is False
    with pytest.raises(ValueError, match=r"group 'data' has no setting 'lr'; 'lr' is optim.lr"):
        apply_overrides(TrainConfig(), ["data.lr=1e-3"])
    with pytest.raises(ValueError, match="unknown settings group 'optimizer' in 'optimizer.lr'"):
        apply_overrides(TrainConfig(), ["optimizer.lr=1e-3"])
    with pytest.raises(ValueError, match="optim.epochs=1.5: epochs: expected an integer"):
        apply_overrides(TrainConfig(), ["optim.epochs=1.5"])
    # the recorded command makes a dotted path setting relative, as a flat one
    args = cli.build_parser().parse_args(
        ["--out", "/w/run", "--set", "data.val_data=/w/val", "--set", "val_data=/w/v"]
    )
    assert "--set data.val_data=val --set val_data=v" in cli.recorded_command(args, start="/w")


def test_from_dict_reads_flat_and_grouped_configs():
    cfg = dataclasses.replace(get_recipe("debug"), lr=0.5, data="synthetic")
    flat = cfg.to_dict()
    assert TrainConfig.from_dict(flat) == cfg
    grouped = {g: dataclasses.asdict(cfg.group(g)) for g in GROUPS}
    assert TrainConfig.from_dict(grouped) == cfg
    assert TrainConfig.from_dict({**flat, "a_removed_field": 1}) == cfg


def test_a_run_saved_with_the_old_flat_config_resumes(tmp_path):
    """last.pt and config.json as every earlier version wrote them: one flat dict of fields (here with
    a field this version no longer has). --resume reads it and continues to the new epoch count."""
    cfg = dataclasses.replace(
        get_recipe("debug"), synthetic_images=64, holdout=16, batch_size=12, epochs=1,
        progress="none", tensorboard=False, recon_images=0,
    )  # fmt: skip
    train(cfg, tmp_path, command="test")
    state = run_state.load_state(tmp_path / run_state.LAST)
    old = {**dataclasses.asdict(cfg), "retired_option": True}  # the flat format, not TrainConfig.to_dict
    run_state.atomic_save({**state, "config": old}, tmp_path / run_state.LAST)
    assert config_from_state(tmp_path) == cfg
    assert cli.main(["--out", str(tmp_path), "--resume", "--set", "optim.epochs=2"]) == 0
    card = json.loads((tmp_path / FINAL / "model.json").read_text())
    assert card["training"]["epochs"] == 2 and card["training"]["config"]["epochs"] == 2
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    # 44 training images (20 held out, 2 per class) / 12 = 3 steps per epoch, each logged once in all
    assert steps == list(range(1, 7)) and card["training"]["steps"] == 6
