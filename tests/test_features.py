"""supmae-embed's bulk job and the feature-set format: inputs of every kind, bad inputs (each input exactly
once, in the features or in errors.jsonl), --strict, resuming, the plan check, the same numbers as /v1/embed."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from supmae_serve.api.app import create_app
from supmae_serve.common.files import DataError, sha256_file
from supmae_serve.features import cli
from supmae_serve.features.bulk import ChunkBatches, EmbedConfig, EmbedError, embed_inputs
from supmae_serve.features.featureset import FeatureSet, FeatureSetError
from supmae_serve.model import save_checkpoint
from supmae_serve.preprocess import ImageLimits, decode_image, normalize, to_tensor
from supmae_serve.settings import Settings

from .conftest import encode, synthetic_image, tiny_model

pytest.importorskip("pyarrow", reason="feature sets need pyarrow: pip install 'supmae[features]'")

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(tiny_model(), path, variant="micro_patch4_32", class_names=CLASSES)
    return path


def good_folder(root: Path, per_class: int = 5, classes=("cat", "dog")) -> Path:
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = synthetic_image((40 + i, 36), seed=100 * ci + i)
            if i % 2:
                img.save(root / c / f"{i:02d}.jpg", quality=90)
            else:
                img.save(root / c / f"{i:02d}.png")
    return root


BAD = {  # file name -> (bytes, the reason errors.jsonl must give)
    "truncated.jpg": (encode(synthetic_image((64, 64), seed=7), "JPEG")[:300], "corrupt_image"),
    "bomb.png": (encode(Image.new("1", (8000, 8000))), "too_many_pixels"),  # 64 M pixels in 8 KB
    "text.png": (b"this is not an image at all", "unsupported_format"),
    "empty.jpg": (b"", "empty_image"),
    "tiny.png": (encode(synthetic_image((4, 4), seed=3)), "image_too_small"),
}


def config(data, out, ckpt, **kw) -> EmbedConfig:
    base = dict(
        model=ckpt, backend="torch", device="cpu", batch_size=3, shard_size=4, workers=0, progress=False
    )
    return EmbedConfig(input=str(data), out=Path(out), **{**base, **kw})


def test_every_input_once_in_the_features_or_in_the_errors(tmp_path, ckpt):
    data = good_folder(tmp_path / "data")
    for name, (blob, _) in BAD.items():
        (data / "dog" / name).write_bytes(blob)
    summary = embed_inputs(config(data, tmp_path / "out", ckpt, workers=2))  # decoding in worker processes
    fs = FeatureSet.open(tmp_path / "out")
    feats, errors = fs.read(), fs.errors()
    listed = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert len(listed) == 15
    assert sorted(feats.ids + [e["id"] for e in errors]) == listed  # each exactly once
    assert not set(feats.ids) & {e["id"] for e in errors}
    assert {e["id"]: e["reason"] for e in errors} == {f"dog/{n}": r for n, (_, r) in BAD.items()}
    assert all(e["message"] and e["source"].endswith(e["id"]) for e in errors)
    assert summary["embedded"] == 10 and summary["failed"] == 5 and summary["complete"]
    m = fs.manifest
    assert (m["count"], m["failed"], m["dim"], m["dtype"], m["pooling"], m["normalized"]) == (
        10,
        5,
        64,
        "float32",
        "avg",
        True,
    )
    assert m["model"]["weights_sha256"] == sha256_file(ckpt / "model.safetensors")
    assert (m["model"]["variant"], m["model"]["framework"]) == ("micro_patch4_32", "supmae")
    assert m["backend"]["name"] == "torch" and m["input"]["kind"] == "folder" and m["input"]["count"] == 15
    assert {"supmae", "torch", "pyarrow"} <= set(m["software"]) and m["started"] <= m["finished"]
    assert feats.labels == [i.split("/")[0] for i in feats.ids]
    np.testing.assert_allclose(np.linalg.norm(feats.embeddings, axis=1), 1.0, atol=1e-5)
    assert sum(s["rows"] + s["failed"] for s in m["shards"]) == 15


def test_strict_stops_at_the_first_bad_input_and_names_it(tmp_path, ckpt, capsys):
    data = good_folder(tmp_path / "data")
    (data / "dog" / "00b.png").write_bytes(BAD["text.png"][0])
    with pytest.raises(EmbedError, match=r"dog/00b.png.*unsupported_format.*--strict"):
        embed_inputs(config(data, tmp_path / "out", ckpt, strict=True))
    assert (
        cli.main(
            [
                str(data),
                "--out",
                str(tmp_path / "out2"),
                "--model",
                str(ckpt),
                "--strict",
                "--no-progress",
                "--workers",
                "0",
            ]
        )
        == 1
    )
    assert "dog/00b.png" in capsys.readouterr().err


def test_the_same_numbers_as_v1_embed(tmp_path, ckpt):
    data = good_folder(tmp_path / "data", per_class=3)
    embed_inputs(config(data, tmp_path / "out", ckpt))
    feats = FeatureSet.open(tmp_path / "out").read()
    settings = Settings(model=ckpt, backend="torch", device="cpu", demo=False, warmup=False, max_wait_ms=1.0)
    with TestClient(create_app(settings)) as client:
        for i, vec in zip(feats.ids, feats.embeddings, strict=True):
            blob = (data / i).read_bytes()
            r = client.post("/v1/embed", files={"file": (Path(i).name, blob)})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(vec, r.json()["data"][0]["embedding"], atol=1e-6)


def test_worker_crops_normalised_on_the_batch_equal_the_servers_tensor():
    blob = encode(synthetic_image((50, 37), seed=4), "JPEG")
    from supmae_serve.features.bulk import decode_crop
    from supmae_serve.model.checkpoint import Preprocessing

    prep = Preprocessing.for_size(32)
    crop, err = decode_crop(lambda: blob, prep, ImageLimits())
    assert err is None
    import torch

    ours = normalize(torch.from_numpy(crop.copy()).permute(2, 0, 1)[None], prep)[0]
    assert torch.equal(ours, to_tensor(decode_image(blob), prep))  # bit for bit


def test_list_file_glob_and_webdataset_shards(tmp_path, ckpt):
    data = good_folder(tmp_path / "data", per_class=2)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\ndata/cat/00.png\tcat\n{data / 'dog/01.jpg'}\tdog\ndata/missing.png\n\n")
    embed_inputs(config(lst, tmp_path / "from-list", ckpt))
    fs = FeatureSet.open(tmp_path / "from-list")
    assert fs.read().ids == ["data/cat/00.png", "data/dog/01.jpg"] and fs.read().labels == ["cat", "dog"]
    assert [(e["id"], e["reason"]) for e in fs.errors()] == [("data/missing.png", "unreadable_file")]

    embed_inputs(config(f"{data}/*/*.png", tmp_path / "from-glob", ckpt))
    assert FeatureSet.open(tmp_path / "from-glob").read().ids == ["cat/00.png", "dog/00.png"]

    for k in range(2):
        with tarfile.open(tmp_path / f"shard-{k:03d}.tar", "w") as tar:
            for i in range(3):
                fields = {"png": encode(synthetic_image(seed=10 * k + i)), "cls": str(i).encode()}
                if (k, i) == (1, 2):
                    fields = {"json": b"{}"}  # a sample without an image
                for ext, blob in fields.items():
                    info = tarfile.TarInfo(f"s{k}/{i:04d}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    summary = embed_inputs(config(tmp_path / "shard-{000..001}.tar", tmp_path / "from-tar", ckpt))
    fs = FeatureSet.open(tmp_path / "from-tar")
    feats = fs.read()
    assert feats.ids == ["s0/0000", "s0/0001", "s0/0002", "s1/0000", "s1/0001"]
    assert feats.labels == ["0", "1", "2", "0", "1"] and feats.sources[0].endswith(
        "shard-000.tar#s0/0000.png"
    )
    assert [(e["id"], e["reason"]) for e in fs.errors()] == [("s1/0002", "no_image")]
    assert summary["inputs"] == 6
    # the tar member decodes to the same vector as the same image from a file
    Image.open(io.BytesIO(encode(synthetic_image(seed=11)))).save(tmp_path / "one.png")
    embed_inputs(config(tmp_path / "one.png", tmp_path / "one", ckpt))
    np.testing.assert_allclose(
        FeatureSet.open(tmp_path / "one").read().embeddings[0], feats.embeddings[4], atol=1e-6
    )


def test_compressed_shards_and_missing_inputs_are_clear_errors(tmp_path, ckpt):
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        blob = encode(synthetic_image())
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match="not an uncompressed tar.*decompressed first"):
        embed_inputs(config(tmp_path / "s.tar.gz", tmp_path / "o", ckpt))
    with pytest.raises(DataError, match="no such file or folder"):
        embed_inputs(config(tmp_path / "nope", tmp_path / "o", ckpt))
    with pytest.raises(DataError, match="no inputs found"):
        embed_inputs(config(f"{tmp_path}/*.webp", tmp_path / "o", ckpt))


def test_resume_finishes_a_partial_run_with_the_same_feature_set(tmp_path, ckpt):
    data = good_folder(tmp_path / "data", per_class=6)
    embed_inputs(config(data, tmp_path / "full", ckpt))
    full = FeatureSet.open(tmp_path / "full").read()
    part = tmp_path / "part"
    embed_inputs(config(data, part, ckpt))
    # what a killed run leaves: some shards, no manifest, a half-written temp file
    (part / "features.json").unlink()
    for k in (1, 2):
        (part / f"part-{k:06d}.parquet").unlink()
    (part / ".part-000001.parquet.x1y2.tmp").write_bytes(b"half a shard")
    with pytest.raises(FeatureSetError, match="unfinished feature set.*run the same supmae-embed command"):
        FeatureSet.open(part)
    summary = embed_inputs(config(data, part, ckpt))
    assert summary["shards_resumed"] == 1 and summary["processed_now"] == 8
    again = FeatureSet.open(part).read()
    assert again.ids == full.ids and again.labels == full.labels
    np.testing.assert_array_equal(again.embeddings, full.embeddings)
    assert not list(part.glob(".*.tmp"))
    done = embed_inputs(config(data, part, ckpt))  # a finished folder: nothing to do
    assert done["processed_now"] == 0 and done["complete"]


def test_a_folder_of_another_plan_is_refused(tmp_path, ckpt):
    data = good_folder(tmp_path / "data", per_class=2)
    embed_inputs(config(data, tmp_path / "out", ckpt))
    with pytest.raises(
        FeatureSetError,
        match=r"other settings.*model:.*\"pooling\": \"avg\".*\"pooling\": \"cls\".*new --out",
    ):
        embed_inputs(config(data, tmp_path / "out", ckpt, pooling="cls"))
    (data / "cat" / "new.png").write_bytes(encode(synthetic_image(seed=9)))
    with pytest.raises(FeatureSetError, match="input:"):
        embed_inputs(config(data, tmp_path / "out", ckpt))


def test_float16_storage_and_raw_vectors(tmp_path, ckpt):
    data = good_folder(tmp_path / "data", per_class=2)
    embed_inputs(config(data, tmp_path / "f32", ckpt, normalize=False))
    embed_inputs(config(data, tmp_path / "f16", ckpt, normalize=False, dtype="float16"))
    a, b = FeatureSet.open(tmp_path / "f32"), FeatureSet.open(tmp_path / "f16")
    assert b.manifest["dtype"] == "float16" and not b.manifest["normalized"]
    import pyarrow.parquet as pq

    t = pq.read_schema(b.shard_paths()[0]).field("embedding").type
    assert (str(t.value_type), t.list_size) == ("halffloat", 64)
    np.testing.assert_allclose(b.read().embeddings, a.read().embeddings, rtol=1e-3, atol=1e-3)
    assert not np.allclose(np.linalg.norm(a.read().embeddings, axis=1), 1.0)


def test_batches_never_cross_a_chunk_boundary():
    batches = list(ChunkBatches([0, 2], shard_size=5, total=13, batch_size=3))
    assert batches == [[0, 1, 2], [3, 4], [10, 11, 12]]
    assert len(ChunkBatches([0, 1, 2], 5, 13, 3)) == 2 + 2 + 1


def test_cli_runs_by_default_and_prints_a_json_summary(tmp_path, ckpt, capsys):
    data = good_folder(tmp_path / "data", per_class=1)
    code = cli.main(
        [str(data), "--out", str(tmp_path / "o"), "--model", str(ckpt), "--no-progress", "--workers", "0"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["embedded"] == 2 and summary["failed"] == 0
    assert "supmae-embed" in FeatureSet.open(tmp_path / "o").manifest["run"]["command"]
    assert cli.main(["run", str(tmp_path / "nope"), "--out", str(tmp_path / "p"), "--model", str(ckpt)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
