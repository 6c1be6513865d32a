"""The Ray Data callable on a local Ray instance (2 CPUs): the same vectors as supmae-embed, a bad image
failing only its own row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from supmae_serve.features.bulk import EmbedConfig, embed_inputs
from supmae_serve.features.featureset import FeatureSet
from supmae_serve.model import save_checkpoint

from .conftest import synthetic_image, tiny_model

try:
    import ray
    import ray.data
except ImportError:  # pragma: no cover - depends on the environment
    ray = None

pytestmark = pytest.mark.skipif(ray is None, reason="ray is not installed: pip install 'supmae[cluster]'")


def test_map_batches_on_a_local_ray_gives_supmae_embeds_vectors(tmp_path):
    from supmae_serve.features.ray_data import EmbedImages, embed_with_ray

    pytest.importorskip("pyarrow")
    save_checkpoint(
        tiny_model(), tmp_path / "ckpt", variant="micro_patch4_32", class_names=[f"c{i}" for i in range(10)]
    )
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        synthetic_image((32 + i, 40), seed=i).save(data / f"{i}.png")
    (data / "bad.png").write_bytes(b"not an image")
    embed_inputs(
        EmbedConfig(
            input=str(data),
            out=tmp_path / "fs",
            model=tmp_path / "ckpt",
            backend="torch",
            device="cpu",
            workers=0,
            progress=False,
        )
    )
    want = {
        Path(s).name: e
        for s, e in zip(
            *[getattr(FeatureSet.open(tmp_path / "fs").read(), a) for a in ("sources", "embeddings")],
            strict=True,
        )
    }

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = embed_with_ray(
            str(data), tmp_path / "ckpt", batch_size=4, backend="torch", device="cpu"
        ).take_all()
        arrays = ray.data.from_items([{"image": np.asarray(synthetic_image((32, 40), seed=0))}])
        by_array = arrays.map_batches(
            EmbedImages,
            fn_constructor_kwargs={"model": str(tmp_path / "ckpt"), "device": "cpu"},
            concurrency=1,
        ).take_all()
    finally:
        ray.shutdown()
    got = {Path(r["path"]).name: r for r in rows}
    assert sorted(got) == ["0.png", "1.png", "2.png", "3.png", "4.png", "bad.png"]
    for name, vec in want.items():
        assert got[name]["error"] == ""
        np.testing.assert_allclose(got[name]["embedding"], vec, atol=1e-6)
    assert "unsupported_format" in got["bad.png"]["error"] and np.isnan(got["bad.png"]["embedding"]).all()
    assert "bytes" not in got["0.png"]
    np.testing.assert_allclose(
        by_array[0]["embedding"], want["0.png"], atol=1e-6
    )  # decoded arrays: same crop
