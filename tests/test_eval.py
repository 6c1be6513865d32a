"""supmae-eval's tasks, each checked against an independent computation on a case small enough to
reason about: logits we control, features that cluster by construction, duplicated training points,
and the serving preprocessing path run by hand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from supmae_serve.model import Features, SupMAE, load_checkpoint, save_checkpoint
from supmae_serve.model.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from supmae_serve.preprocess import decode_image, normalize, resize_crop, to_tensor
from tests.conftest import TINY, tiny_model
from training import evaluate as ev
from training.corruptions import corrupt, item_rng
from training.data import DataError, holdout_split, scan_image_folder

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (30, 30, 30), (200, 200, 30), (30, 200, 200)]
RUN = ev.RunConfig(device="cpu", batch_size=16, workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread on a shared CPU


def write_colour_folder(root, per_class, classes=CLASSES, seed=0):
    """Each class a colour plus pixel noise: 32-px PNGs whose mean colour identifies the class."""
    rng = np.random.default_rng(seed)
    for name in classes:
        colour = np.array(COLOURS[CLASSES.index(name)] if name in CLASSES else (120, 120, 120), float)
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            arr = np.clip(colour + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{j:03d}.png")
    return root


def write_grey_folder(root, classes, per_class, start=10):
    """Flat grey images, each a distinct level: the level identifies the image. -> {level: label}"""
    levels = {}
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            v = start + 15 * (ci * per_class + j)
            Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(root / name / f"{j:03d}.png")
            levels[v] = ci
    return levels


@pytest.fixture(scope="module")
def data6(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("c6"), per_class=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "supmae"
    save_checkpoint(tiny_model(num_classes=6, seed=1), path, variant=TINY, class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def ckpt_mae(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "mae"
    save_checkpoint(tiny_model(framework="mae", num_classes=0), path, variant=TINY)
    return path


def grey_level(imgs: torch.Tensor) -> list[int]:
    """Recover each flat image's grey level from the normalised batch."""
    red = imgs[:, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [int(round(v)) for v in (red * 255).tolist()]


def install_logits(monkeypatch, table: dict[int, list[float]]):
    """Make every SupMAE return the logits row `table[grey level]` for each image."""

    def fake(self, imgs):
        logits = torch.tensor([table[v] for v in grey_level(imgs)], dtype=torch.float32)
        emb = imgs.mean((2, 3))
        return Features(emb, imgs.new_zeros(len(imgs), 1, 3), emb, logits)

    monkeypatch.setattr(SupMAE, "forward_features", fake)


def install_colour_features(monkeypatch):
    """Make every SupMAE embed an image as its mean normalised colour: classes cluster by design."""

    def fake(self, imgs):
        emb = imgs.mean((2, 3))  # (N, 3)
        return Features(emb, imgs.new_zeros(len(imgs), 1, 3), emb, None)

    monkeypatch.setattr(SupMAE, "forward_features", fake)


def row_with_rank(label: int, rank: int, n: int, top: int | None = None) -> list[float]:
    """Logits over n classes where `label` is the rank-th largest (and `top`, if given, the largest)."""
    others = [c for c in range(n) if c != label and c != top]
    order = ([top] if top is not None else []) + others
    order.insert(rank - 1 + (top is not None), label)
    row = [0.0] * n
    for pos, c in enumerate(order):
        row[c] = float(n - pos)
    return row


# ============================================================================ accuracy
def test_dataset_matches_serving_preprocessing(data6, ckpt):
    _, card = load_checkpoint(ckpt)
    samples, _ = scan_image_folder(data6)
    ds = ev.ImageDataset(samples[:5], card.preprocessing)
    for i, (path, label) in enumerate(samples[:5]):
        x, y = ds[i]
        served = to_tensor(decode_image(path.read_bytes()), card.preprocessing)
        assert y == label and torch.equal(normalize(x[None], card.preprocessing)[0], served)


def test_accuracy_top1_top5_match_a_hand_computation(tmp_path, ckpt, monkeypatch):
    levels = write_grey_folder(tmp_path / "grey", CLASSES, per_class=2)
    ranks = [1, 1, 2, 3, 5, 6, 1, 4, 6, 2, 1, 5]  # where each image's true class lands
    table = {v: row_with_rank(y, r, 6) for (v, y), r in zip(sorted(levels.items()), ranks, strict=True)}
    install_logits(monkeypatch, table)
    r = ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "grey"), run=RUN)
    assert r.details["top1"] == pytest.approx(100 * 4 / 12)  # ranks == 1
    assert r.details["top5"] == pytest.approx(100 * 10 / 12)  # ranks <= 5
    assert r.details["images"] == 12 and r.summary["classes"] == 6
    # per class: ant ranks (1, 1), bee (2, 3), cat (5, 6), dog (1, 4), eel (6, 2), fox (1, 5)
    assert r.details["per_class"] == {
        "ant": 100.0,
        "bee": 0.0,
        "cat": 0.0,
        "dog": 50.0,
        "eel": 0.0,
        "fox": 50.0,
    }


def test_class_subset_restricts_the_logits(tmp_path, ckpt, monkeypatch):
    subset = ["bee", "dog", "fox"]  # model classes 1, 3, 5
    levels = write_grey_folder(tmp_path / "sub", subset, per_class=2)
    ranks_in_subset = [1, 2, 1, 1, 3, 1]
    table = {}
    for (v, folder), r in zip(sorted(levels.items()), ranks_in_subset, strict=True):
        # "ant" (outside the subset) always wins overall; inside the subset the true class has rank r
        sub_row = row_with_rank(folder, r, 3)
        row = [100.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        for j, c in enumerate([1, 3, 5]):
            row[c] = sub_row[j]
        table[v] = row
    install_logits(monkeypatch, table)
    r = ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "sub"), run=RUN)
    assert r.details["top1"] == pytest.approx(100 * 4 / 6)  # an unrestricted arg-max would give 0
    assert r.details["top5_k"] == 3 and r.details["top5"] == 100.0
    assert r.details["class_subset"] == subset and r.summary["classes"] == "3 of 6"


def test_class_map_renames_folders(tmp_path, ckpt, monkeypatch):
    levels = write_grey_folder(tmp_path / "renamed", ["n01", "n02"], per_class=1)
    rows = {v: row_with_rank([0, 2][y], 1, 6) for v, y in levels.items()}  # n01 -> ant, n02 -> cat
    install_logits(monkeypatch, rows)
    with pytest.raises(ev.EvalError, match="n01, n02"):
        ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "renamed"), run=RUN)
    r = ev.evaluate_accuracy(
        ckpt, ev.DataSpec(tmp_path / "renamed"), class_map={"n01": "ant", "n02": "cat"}, run=RUN
    )
    assert r.details["top1"] == 100.0


@pytest.mark.parametrize("holdout", [None, (12, 3)])
def test_accuracy_of_the_real_model_matches_a_direct_forward(data6, ckpt, holdout):
    spec = ev.DataSpec(data6) if holdout is None else ev.DataSpec(data6, holdout=holdout[0], seed=holdout[1])
    r = ev.evaluate_accuracy(ckpt, spec, run=RUN)
    samples, _ = scan_image_folder(data6)
    if holdout is not None:
        samples = holdout_split(samples, *holdout)[1]  # exactly the trainer's hold-out
    model, card = load_checkpoint(ckpt)
    x = torch.stack([to_tensor(decode_image(p.read_bytes()), card.preprocessing) for p, _ in samples])
    y = torch.tensor([label for _, label in samples])
    with torch.no_grad():
        logits = model.forward_features(x).logits
    top5 = logits.topk(5, dim=1).indices
    assert r.details["images"] == len(samples)
    assert r.details["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert r.details["top5"] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())


def test_holdout_from_the_model_card(tmp_path, data6):
    path = tmp_path / "ck"
    training = {"data": {"holdout": 12.0, "holdout_seed": 3}, "config": {"holdout": 12.0, "holdout_seed": 3}}
    save_checkpoint(tiny_model(num_classes=6), path, variant=TINY, class_names=CLASSES, training=training)
    r = ev.evaluate_accuracy(path, ev.DataSpec(data6, holdout="card"), run=RUN)
    assert r.details["images"] == len(holdout_split(scan_image_folder(data6)[0], 12, 3)[1])
    assert r.tag.endswith("-holdout12-seed3")
    bare = tmp_path / "bare"
    save_checkpoint(tiny_model(num_classes=6), bare, variant=TINY, class_names=CLASSES)
    with pytest.raises(ev.EvalError, match="records no hold-out"):
        ev.evaluate_accuracy(bare, ev.DataSpec(data6, holdout="card"), run=RUN)
    # a run validated on val_data held nothing out, whatever its recipe's hold-out count was
    val = tmp_path / "val"
    training = {"data": {"val": "/data/val"}, "config": {"holdout": 12.0, "holdout_seed": 3}}
    save_checkpoint(tiny_model(num_classes=6), val, variant=TINY, class_names=CLASSES, training=training)
    with pytest.raises(ev.EvalError, match="records no hold-out"):
        ev.evaluate_accuracy(val, ev.DataSpec(data6, holdout="card"), run=RUN)


# ============================================================================ bad input
def test_accuracy_needs_a_classification_head(data6, ckpt_mae):
    with pytest.raises(ev.EvalError, match="classification head.*'mae'.*knn, linprobe or fewshot"):
        ev.evaluate_accuracy(ckpt_mae, ev.DataSpec(data6), run=RUN)


def test_unknown_class_folders_are_named(tmp_path, ckpt):
    write_colour_folder(tmp_path / "other", 2, classes=["yak", "zebra", "ant"])
    with pytest.raises(
        ev.EvalError, match=r"2 of the .* 3 class folders .*: yak, zebra\. The model's classes are: ant, bee"
    ):
        ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "other"), run=RUN)


def test_card_without_class_names(tmp_path, data6):
    path = tmp_path / "nameless"
    save_checkpoint(tiny_model(num_classes=6), path, variant=TINY)
    with pytest.raises(ev.EvalError, match="no class_names"):
        ev.evaluate_accuracy(path, ev.DataSpec(data6), run=RUN)


def test_empty_and_missing_splits(tmp_path, ckpt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "empty"), run=RUN)
    (tmp_path / "hollow" / "ant").mkdir(parents=True)
    with pytest.raises(DataError, match="no images.*ant"):
        ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "hollow"), run=RUN)
    with pytest.raises(DataError, match="does not exist"):
        ev.evaluate_accuracy(ckpt, ev.DataSpec(tmp_path / "nowhere"), run=RUN)
    write_colour_folder(tmp_path / "few", 1, classes=["ant"])
    with pytest.raises(ev.EvalError, match="max per class"):
        ev.load_split(ev.DataSpec(tmp_path / "few", max_per_class=0))
    with pytest.raises(DataError, match="hold-out"):
        ev.load_split(ev.DataSpec(tmp_path / "few", holdout=1))


def test_a_corrupt_image_is_named(tmp_path, ckpt):
    root = write_colour_folder(tmp_path / "bad", 2, classes=["ant"])
    (root / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ev.EvalError, match="broken.png"):
        ev.evaluate_accuracy(ckpt, ev.DataSpec(root), run=RUN)


def test_parse_holdout():
    assert ev.parse_holdout("5000") == 5000 and isinstance(ev.parse_holdout("5000"), int)
    assert (
        ev.parse_holdout("0.1") == 0.1
        and ev.parse_holdout("card") == "card"
        and ev.parse_holdout(None) is None
    )
    for bad in ("abc", "-1", "0", "12.5"):
        with pytest.raises(ev.EvalError, match="hold-out"):
            ev.parse_holdout(bad)


# ============================================================================ k-NN
def test_knn_on_duplicated_training_points_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    votes = ev.knn_votes(x, y, x, 5, k=1, temperature=0.07)
    assert torch.equal(votes.argmax(1), y)
    # k > 1: each point's own vote exp(1 / T) dwarfs the others at T = 0.01
    assert torch.equal(ev.knn_votes(x, y, x, 5, k=5, temperature=0.01).argmax(1), y)


def test_knn_votes_match_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(30, 6, generator=g), torch.randn(11, 6, generator=g)
    y = torch.randint(0, 4, (30,), generator=g)
    votes = ev.knn_votes(train, y, test, 4, k=3, temperature=0.5, chunk=4)  # chunks of 4 test rows
    for i in range(len(test)):
        sims = [float(torch.dot(test[i], t) / (test[i].norm() * t.norm())) for t in train]
        expect = np.zeros(4)
        for j in np.argsort(sims)[::-1][:3]:
            expect[int(y[j])] += np.exp(sims[j] / 0.5)
        assert np.allclose(votes[i].numpy(), expect, rtol=1e-5)


def test_knn_task_on_clustered_features(data6, ckpt_mae, monkeypatch):
    install_colour_features(monkeypatch)
    r = ev.evaluate_knn(ckpt_mae, ev.DataSpec(data6, holdout=12, seed=0), k=20, run=RUN)
    assert (r.summary["train"], r.summary["test"]) == (36, 12)
    assert r.details["top1"] == 100.0


def test_feature_tasks_need_training_images_and_disjoint_splits(data6, ckpt_mae, tmp_path):
    with pytest.raises(ev.EvalError, match="needs labelled training images.*--holdout"):
        ev.evaluate_knn(ckpt_mae, ev.DataSpec(data6), run=RUN)
    with pytest.raises(ev.EvalError, match="in both the training set"):
        ev.evaluate_knn(ckpt_mae, ev.DataSpec(data6), ev.DataSpec(data6), run=RUN)
    write_colour_folder(tmp_path / "new", 2, classes=["ant", "zebra"])
    with pytest.raises(ev.EvalError, match="zebra"):
        ev.evaluate_linprobe(ckpt_mae, ev.DataSpec(tmp_path / "new"), ev.DataSpec(data6), run=RUN)


# ============================================================================ linear probe
def clusters(n_per_class, n_classes=4, dim=32, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(n_classes, dim) * 5
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


@pytest.mark.parametrize("optimizer, wd", [("lbfgs", None), ("adam", 1e-3)])
def test_linear_probe_on_separable_features_reaches_100(optimizer, wd):
    x, y = clusters(30, dim=8)
    x[:, 5] *= 1e4  # a wildly scaled feature: standardisation makes it harmless
    cfg = ev.ProbeConfig(optimizer=optimizer, weight_decay=wd, epochs=30, lr=0.05, batch_size=32)
    probe = ev.fit_linear_probe(x, y, 4, cfg)
    xt, yt = clusters(25, dim=8, seed=1)
    xt[:, 5] *= 1e4
    assert torch.equal(probe.logits(x).argmax(1), y)
    assert torch.equal(probe.logits(xt).argmax(1), yt)
    if wd is None:  # picked on a validation split: every candidate was tried
        assert probe.weight_decay in ev.WD_GRID and len(probe.selection) == len(ev.WD_GRID)


def test_linear_probe_with_a_given_weight_decay_matches_its_optimum():
    """At the optimum of CE + wd/2 |W|^2 the gradient vanishes: check it from outside."""
    x, y = clusters(6, spread=2.0)
    probe = ev.fit_linear_probe(x, y, 4, ev.ProbeConfig(weight_decay=0.1))
    assert probe.weight_decay == 0.1 and probe.selection == {}
    w = probe.weight.clone().requires_grad_(True)
    b = probe.bias.clone().requires_grad_(True)
    z = (x - probe.mean) / probe.std
    loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 0.05 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_linprobe_task_on_clustered_features(data6, ckpt_mae, monkeypatch):
    install_colour_features(monkeypatch)
    r = ev.evaluate_linprobe(ckpt_mae, ev.DataSpec(data6, holdout=12), run=RUN)
    assert r.details["train_top1"] == 100.0 and r.details["test_top1"] == 100.0
    assert (r.summary["train"], r.summary["test"]) == (36, 12)


# ============================================================================ few-shot
def test_few_shot_sampling_picks_exactly_k_per_class():
    labels = [0] * 7 + [1] * 5 + [2] * 9
    for seed in range(4):
        idx = ev.sample_few_shot(labels, 5, seed)
        assert len(set(idx.tolist())) == 15 and list(idx) == sorted(idx)
        assert np.bincount(np.asarray(labels)[idx]).tolist() == [5, 5, 5]
        assert np.array_equal(idx, ev.sample_few_shot(labels, 5, seed))
    assert not np.array_equal(ev.sample_few_shot(labels, 5, 0), ev.sample_few_shot(labels, 5, 1))
    with pytest.raises(ev.EvalError, match="'b' has 5 training images; 6-shot"):
        ev.sample_few_shot(labels, 6, 0, class_names=["a", "b", "c"])


def test_fewshot_task_uses_k_per_class_and_never_the_test_images(data6, ckpt_mae, monkeypatch):
    install_colour_features(monkeypatch)
    fits, extracted = [], []
    real_fit, real_features = ev.fit_linear_probe, ev._features

    def spy_fit(x, y, *a, **kw):
        fits.append(np.bincount(y.numpy(), minlength=6).tolist())
        return real_fit(x, y, *a, **kw)

    def spy_features(loaded, samples, run, desc):
        extracted.append((desc, {str(p) for p, _ in samples}))
        return real_features(loaded, samples, run, desc)

    monkeypatch.setattr(ev, "fit_linear_probe", spy_fit)
    monkeypatch.setattr(ev, "_features", spy_features)
    r = ev.evaluate_fewshot(ckpt_mae, ev.DataSpec(data6, holdout=12), shots=(1, 3), seeds=(0, 1), run=RUN)
    assert fits == [[1] * 6, [1] * 6, [3] * 6, [3] * 6]
    (_, train_paths), (_, test_paths) = extracted
    assert len(test_paths) == 12 and not train_paths & test_paths
    assert len(train_paths) <= 6 * (1 + 1 + 3 + 3)  # only images some run uses
    assert r.details["shots"]["1"]["mean"] == 100.0 and r.details["shots"]["3"]["std"] == 0.0
    assert r.summary["3-shot"] == "100.00 ± 0.00"


# ============================================================================ robustness
def test_mean_corruption_error_formulas():
    errors = {"a": [10.0, 20.0], "b": [30.0, 50.0]}
    base = {"a": [20.0, 40.0], "b": [40.0, 40.0]}
    s = ev.mean_corruption_error(errors, base, clean_error=5.0, baseline_clean_error=10.0)
    assert s["mean_error"] == pytest.approx(27.5)
    assert s["ce"] == pytest.approx({"a": 50.0, "b": 100.0}) and s["mCE"] == pytest.approx(75.0)
    # relative: a = (5 + 15) / (10 + 30), b = (25 + 45) / (30 + 30)
    assert s["relative_ce"]["a"] == pytest.approx(50.0) and s["relative_mCE"] == pytest.approx(
        (50 + 700 / 6) / 2
    )
    assert "mCE" not in ev.mean_corruption_error(errors)
    with pytest.raises(ev.EvalError, match="same corruptions"):
        ev.mean_corruption_error(errors, {"a": [1.0, 1.0]})


def test_combined_score_reproduces_the_posters_arithmetic():
    # SupMAE: IN-C 48.1 (lower is better), IN-A 35.5, IN-R 51.0, IN-Sketch 36.0
    assert ev.combined_score(48.1, {"a": 35.5, "r": 51.0, "sketch": 36.0}) == pytest.approx(43.6)


def test_corrupted_dataset_items(data6, ckpt):
    _, card = load_checkpoint(ckpt)
    samples, _ = scan_image_folder(data6)
    clean = ev.ImageDataset(samples[:3], card.preprocessing)
    zero = ev.ImageDataset(samples[:3], card.preprocessing, corruption="gaussian_noise", severity=0)
    noisy = ev.ImageDataset(samples[:3], card.preprocessing, corruption="gaussian_noise", severity=4, seed=9)
    for i in range(3):
        assert torch.equal(zero[i][0], clean[i][0])
        expect = corrupt(clean.crop(i), "gaussian_noise", 4, item_rng(9, "gaussian_noise", 4, i))
        assert torch.equal(noisy[i][0], torch.from_numpy(expect).permute(2, 0, 1))


def test_robustness_errors_match_an_independent_computation(data6, ckpt):
    spec = ev.DataSpec(data6, max_per_class=2)
    corrs, sevs = ("gaussian_noise", "contrast"), (1, 5)
    r = ev.evaluate_robustness(ckpt, spec, corruptions=corrs, severities=sevs, corruption_seed=3, run=RUN)
    model, card = load_checkpoint(ckpt)
    samples = ev.load_split(spec).samples
    crops = [np.asarray(resize_crop(decode_image(p.read_bytes()), card.preprocessing)) for p, _ in samples]
    y = torch.tensor([label for _, label in samples])

    def error(images):
        x = normalize(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), card.preprocessing)
        with torch.no_grad():
            return 100 - 100 * (model.forward_features(x).logits.argmax(1) == y).float().mean().item()

    assert r.details["clean_error"] == pytest.approx(error(crops))
    for c in corrs:
        expect = [
            error([corrupt(im, c, s, item_rng(3, c, s, i)) for i, im in enumerate(crops)]) for s in sevs
        ]
        assert r.details["errors"][c] == pytest.approx(expect)
    assert r.details["mean_error"] == pytest.approx(
        np.mean([np.mean(v) for v in r.details["errors"].values()])
    )
    assert r.summary["combined"] == pytest.approx(100 - r.details["mean_error"])
    # the in-memory crops give the same numbers as reading every pass from disk
    nocache = ev.evaluate_robustness(
        ckpt,
        spec,
        corruptions=corrs,
        severities=sevs,
        corruption_seed=3,
        run=ev.RunConfig(**{**RUN.__dict__, "cache_gb": 0}),
    )
    assert nocache.details["errors"] == r.details["errors"]


def test_robustness_baseline_variants_and_combined(tmp_path, ckpt, monkeypatch):
    # flat grey images and logits we control: two of the six main images wrong (clean error 1/3)
    levels = write_grey_folder(tmp_path / "grey", CLASSES, per_class=1)  # levels 10, 25, ..., 85
    table = {v: row_with_rank(y, 2 if v in (10, 25) else 1, 6) for v, y in levels.items()}
    variant = write_grey_folder(tmp_path / "variant", ["bee", "dog"], per_class=1, start=130)
    # the variant is scored over its own classes (bee, dog): bee right, dog behind bee
    table.update({130: row_with_rank(1, 1, 6), 145: row_with_rank(3, 2, 6, top=1)})
    install_logits(monkeypatch, table)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"contrast": [40.0, 60.0]}))
    r = ev.evaluate_robustness(
        ckpt,
        ev.DataSpec(tmp_path / "grey"),
        corruptions=["contrast"],
        severities=[1, 5],
        baseline=base,
        variants={"subset": ev.DataSpec(tmp_path / "variant")},
        run=RUN,
    )
    assert sorted(variant) == [130, 145]
    # contrast leaves a flat image exactly as it is, so each corrupted error is the clean error
    assert r.details["clean_error"] == pytest.approx(100 / 3)
    assert r.details["errors"]["contrast"] == pytest.approx([100 / 3, 100 / 3])
    assert r.details["mCE"] == pytest.approx(100 * (200 / 3) / 100)  # sum(E) / sum(E_base)
    assert r.details["variants_top1"] == {"subset": 50.0}
    assert r.summary["combined"] == pytest.approx((100 - 200 / 3 + 50.0) / 2)
    with pytest.raises(ev.EvalError, match="needs 5 errors"):
        ev.evaluate_robustness(
            ckpt, ev.DataSpec(tmp_path / "grey"), corruptions=["contrast"], baseline=base, run=RUN
        )


def test_robustness_against_itself_as_baseline_is_100(data6, ckpt):
    spec = ev.DataSpec(data6, max_per_class=1)
    r = ev.evaluate_robustness(
        ckpt, spec, corruptions=["impulse_noise"], severities=[2, 5], baseline=ckpt, run=RUN
    )
    assert all(e > 0 for e in r.details["errors"]["impulse_noise"])  # a random 6-class model errs
    assert r.details["mCE"] == pytest.approx(100.0) and r.summary["mCE"] == pytest.approx(100.0)
    # a baseline evaluated once (the CLI's side-by-side mode) gives the same numbers
    again = ev.evaluate_robustness(
        ckpt, spec, corruptions=["impulse_noise"], severities=[2, 5], baseline=r, run=RUN
    )
    assert (
        again.details["mCE"] == pytest.approx(100.0)
        and again.details["baseline"]["errors"] == r.details["errors"]
    )
    with pytest.raises(ev.EvalError, match="other corruptions"):
        ev.evaluate_robustness(ckpt, spec, corruptions=["impulse_noise"], severities=[2], baseline=r, run=RUN)


def test_robustness_bad_input(data6, ckpt, ckpt_mae):
    spec = ev.DataSpec(data6, max_per_class=1)
    with pytest.raises(ev.EvalError, match="classification head"):
        ev.evaluate_robustness(ckpt_mae, spec, corruptions=["contrast"], run=RUN)
    with pytest.raises(ev.EvalError, match="classification head"):  # a headless baseline fails first
        ev.evaluate_robustness(ckpt, spec, corruptions=["contrast"], baseline=ckpt_mae, run=RUN)
    with pytest.raises(ValueError, match="available"):
        ev.evaluate_robustness(ckpt, spec, corruptions=["snow"], run=RUN)
    with pytest.raises(ev.EvalError, match="1-5"):
        ev.evaluate_robustness(ckpt, spec, severities=[0, 6], run=RUN)


# ============================================================================ results on disk
def test_save_result_and_update_card_leave_the_weights_alone(tmp_path, data6, ckpt):
    path = tmp_path / "copy"
    shutil.copytree(ckpt, path)
    weights = path / "model.safetensors"
    before, mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    card_before = json.loads((path / "model.json").read_text())
    r = ev.evaluate_accuracy(path, ev.DataSpec(data6, holdout=12), run=RUN)
    out = ev.save_result(r)
    assert out == path / "eval" / f"accuracy-{r.tag}.json"
    saved = json.loads(out.read_text())
    assert saved["task"] == "accuracy" and saved["details"]["top1"] == r.details["top1"]
    ev.update_card_metrics(r)
    card = json.loads((path / "model.json").read_text())
    entry = card["metrics"]["eval"][f"accuracy/{r.tag}"]
    assert entry["top-1"] == r.summary["top-1"] and "hold-out 12" in entry["data"]["eval"]
    assert {k: v for k, v in card.items() if k != "metrics"} == {
        k: v for k, v in card_before.items() if k != "metrics"
    }
    assert weights.read_bytes() == before and weights.stat().st_mtime_ns == mtime
    assert not list(path.glob(".*.tmp"))
    load_checkpoint(path)  # still a valid checkpoint


def test_compare_puts_checkpoints_side_by_side():
    a = ev.EvalResult("knn", "a", "mae", {"top-1": 50.0, "top-5": 90.0})
    b = ev.EvalResult("knn", "b", "supmae", {"top-1": 61.25, "extra": "x"})
    lines = ev.compare([a, b]).splitlines()
    assert lines[0].split("|")[1:-1] == [" checkpoint ", " top-1 ", " top-5 ", " extra "]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["mae", "50.00", "90.00", "-"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["supmae", "61.25", "-", "x"]
