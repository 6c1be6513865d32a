"""training/data.py and training/augment.py: datasets, hold-out, clear errors, tensor augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tests.builders import write_wds_shard
from tests.conftest import synthetic_image
from training import data as D
from training.augment import apply_crops, crop_boxes, random_resized_crop, step_generator


def _folder(root, classes=("a", "b"), per_class=3, size=(32, 32)):
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            synthetic_image(size, seed=ci * 100 + i).save(root / c / f"{i}.png")
    return root


# ------------------------------------------------------------------ bad data names the file
def test_missing_path_is_named(tmp_path):
    with pytest.raises(D.DataError, match="nope.*does not exist"):
        D.scan_image_folder(tmp_path / "nope")


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(D.DataError, match=f"{tmp_path}.*no class folders"):
        D.scan_image_folder(tmp_path)


def test_class_folder_without_images_is_named(tmp_path):
    _folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(D.DataError, match="empty_class"):
        D.scan_image_folder(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    _folder(tmp_path)
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    samples, names = D.scan_image_folder(tmp_path)
    with pytest.raises(D.DataError, match="broken.png"):
        D.decode_samples(samples, names, 32, threads=1)


def test_mismatched_class_folders_are_named(tmp_path):
    _folder(tmp_path / "train", classes=("cat", "dog"))
    _folder(tmp_path / "val", classes=("cat", "fox"))
    from supmae_serve.model.checkpoint import Preprocessing
    from training.distributed import DistInfo
    from training.engine import build_data
    from training.recipes import TrainConfig

    cfg = TrainConfig(data=str(tmp_path / "train"), val_data=str(tmp_path / "val"), batch_size=2)
    with pytest.raises(D.DataError, match=r"only in training \['dog'\].*only in validation \['fox'\]"):
        build_data(cfg, 32, Preprocessing.for_size(32), DistInfo())


# ------------------------------------------------------------------ decoding, hold-out, kinds
def test_decode_samples_resizes_and_keeps_labels(tmp_path):
    _folder(tmp_path, per_class=2, size=(40, 48))
    samples, names = D.scan_image_folder(tmp_path)
    ds = D.decode_samples(samples, names, 32, threads=2)
    assert ds.images.shape == (4, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.class_names == ["a", "b"]


def test_holdout_indices_are_stratified_disjoint_and_seeded():
    labels = torch.arange(100) % 10
    tr, ho = D.holdout_indices(labels, 20, seed=3)
    assert len(ho) == 20 and len(tr) == 80
    assert set(tr.tolist()).isdisjoint(ho.tolist())
    assert torch.bincount(labels[ho], minlength=10).tolist() == [2] * 10
    assert torch.equal(D.holdout_indices(labels, 20, seed=3)[1], ho)
    assert not torch.equal(D.holdout_indices(labels, 20, seed=4)[1], ho)


def test_detect_kind(tmp_path):
    assert D.detect_kind("synthetic") == "synthetic"
    assert D.detect_kind("/data/shards-{000..009}.tar") == "wds"
    assert D.detect_kind("https://host/x.tar") == "wds"
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert D.detect_kind(str(tmp_path)) == "cifar10"
    assert D.detect_kind(str(tmp_path / "cifar-10-batches-py")) == "folder"  # no data_batch_1 yet


def test_cifar10_python_format(tmp_path, monkeypatch):
    """Fake batches in the real on-disk format (pickled dicts of numpy arrays), read by torchvision."""
    from torchvision.datasets import CIFAR10

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (base / name).write_bytes(pickle.dumps(entry))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    import torchvision.datasets.cifar as tv_cifar

    # our fake files have other md5 sums than the real release; the reading code is what is tested
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = D.load_cifar10(tmp_path, train=True)
    assert ds.images.shape == (20, 3, 32, 32) and ds.class_names[0] == "c0"
    raw = pickle.loads((base / "data_batch_1").read_bytes())["data"][0].reshape(3, 32, 32)
    assert torch.equal(ds.images[0], torch.from_numpy(raw))
    assert len(D.load_cifar10(base, train=False)) == 4


def test_cifar10_missing_folder_error(tmp_path):
    with pytest.raises(D.DataError, match="cifar-10-batches-py"):
        D.load_cifar10(tmp_path)


def test_synthetic_is_deterministic_and_balanced():
    a = D.synthetic_images(40, 4, 16, seed=1)
    b = D.synthetic_images(40, 4, 16, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (40, 3, 16, 16) and torch.bincount(a.labels).tolist() == [10] * 4


def test_webdataset_pipeline_decodes_shards(tmp_path):
    pytest.importorskip("webdataset")
    shard = write_wds_shard(tmp_path / "shard-000.tar", 6, classes=3)
    to_t = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    pipe = D.webdataset_pipeline(str(shard), to_t, batch_size=3, shuffle=0)
    batches = list(pipe)
    assert len(batches) == 2 and batches[0][0].shape == (3, 3, 32, 32)
    assert sorted(int(c) for b in batches for c in b[1]) == [0, 0, 1, 1, 2, 2]


# ------------------------------------------------------------------ tensor augmentation
def test_full_box_without_flip_is_identity():
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    boxes = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]] * 2)
    out = apply_crops(img, boxes, 16)
    assert torch.allclose(out, img.float() / 255, atol=1e-6)
    flipped = apply_crops(img, torch.tensor([[1.0, 1.0, 0.0, 0.0, -1.0]] * 2), 16)
    assert torch.allclose(flipped, img.float().flip(-1) / 255, atol=1e-6)


def test_crop_box_picks_the_right_region():
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[..., 8:, 8:] = 255  # bottom-right quadrant white
    out = apply_crops(img, torch.tensor([[0.5, 0.5, 0.5, 0.5, 1.0]]), 8)
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("style", ["torchvision", "clamp"])
def test_crop_boxes_respect_scale_and_bounds_on_the_pixel_grid(style):
    g = torch.Generator().manual_seed(0)
    b = crop_boxes(2000, (0.35, 1.0), generator=g, image_size=(32, 48), style=style)
    w, h, left, top, flip = b.unbind(1)
    area = w * h
    assert area.min() >= 0.35 * 0.74 and area.max() <= 1.0 + 1e-6  # clamping can shrink a box
    assert (
        (left >= 0).all()
        and (top >= 0).all()
        and (left + w <= 1 + 1e-6).all()
        and (top + h <= 1 + 1e-6).all()
    )
    for v, side in ((w, 48), (left, 48), (h, 32), (top, 32)):  # whole pixels, as torchvision crops
        assert torch.allclose(v * side, (v * side).round(), atol=1e-4)
    assert 0.4 < (flip < 0).float().mean() < 0.6


def test_crop_boxes_are_drawn_the_way_torchvision_draws_them():
    """torchvision's RandomResizedCrop: up to 10 tries, then the centre crop. Over 20,000 draws on a
    32-px image at scale (0.2, 1) the boxes have torchvision's mean area (0.54) and mean width; MAE's
    clamped one-draw rule (the linear probe's crop, and this module's rule before) averages 0.59."""
    from torchvision.transforms import RandomResizedCrop

    n = 20000
    ours = crop_boxes(n, (0.2, 1.0), generator=torch.Generator().manual_seed(0), image_size=(32, 32))
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    tv = torch.tensor(
        [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ).float()
    tv_area, tv_w = tv[:, 2] * tv[:, 3] / 1024, tv[:, 3] / 32  # (i, j, h, w)
    area = ours[:, 0] * ours[:, 1]
    assert abs(area.mean() - tv_area.mean()) < 0.01, (area.mean(), tv_area.mean())
    assert abs(ours[:, 0].mean() - tv_w.mean()) < 0.01
    assert abs((area == 1).float().mean() - (tv_area == 1).float().mean()) < 0.01  # whole-image crops
    clamp = crop_boxes(
        n, (0.2, 1.0), generator=torch.Generator().manual_seed(0), image_size=(32, 32), style="clamp"
    )
    assert (clamp[:, 0] * clamp[:, 1]).mean() > tv_area.mean() + 0.03


def test_the_centre_crop_fallback_is_torchvisions():
    """On a 64 x 8 image no box of 90-100% of the area fits any ratio in (3/4, 4/3): every draw falls
    back to torchvision's centre crop (the full width, height width / (3/4), centred)."""
    from torchvision.transforms import RandomResizedCrop

    i, j, h, w = RandomResizedCrop.get_params(torch.zeros(3, 64, 8), [0.9, 1.0], [3 / 4, 4 / 3])
    b = crop_boxes(16, (0.9, 1.0), generator=torch.Generator().manual_seed(0), image_size=(64, 8))
    expect = torch.tensor([w / 8, h / 64, j / 8, i / 64])
    assert (i, j, h, w) == (26, 0, 11, 8) and torch.allclose(b[:, :4], expect.expand(16, -1))


def test_global_batch_rows_match_across_process_splits():
    """Rank r's crops equal rows [r*B, (r+1)*B) of the one-process crops: same (seed, step) draws."""
    imgs = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    whole = random_resized_crop(imgs, 16, (0.35, 1), True, step_generator(0, 5))
    parts = [
        random_resized_crop(imgs[r * 4 : r * 4 + 4], 16, (0.35, 1), True, step_generator(0, 5), 8, r * 4)
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_the_clamped_crop_for_the_streaming_path():
    """crop=clamp in DataLoader workers: MAE's util/crop.py rule (crop_boxes style "clamp") on PIL images."""
    from PIL import Image

    from training.augment import ClampedRandomResizedCrop

    img = synthetic_image((48, 40))
    crop = ClampedRandomResizedCrop(16, (0.08, 1.0))
    torch.manual_seed(3)
    out = crop(img)
    torch.manual_seed(3)
    w, h, left, top, _ = crop_boxes(1, (0.08, 1.0), hflip=False, image_size=(40, 48), style="clamp")[
        0
    ].tolist()
    box = (round(left * 48), round(top * 40), round((left + w) * 48), round((top + h) * 40))
    assert out.size == (16, 16)
    assert np.array_equal(
        np.asarray(out), np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC, box=box))
    )
