"""supmae-embed as separate processes: killed with SIGKILL and started again, and two torchrun processes,
each ending with the feature set one uninterrupted process makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from supmae_serve.features.bulk import EmbedConfig, embed_inputs
from supmae_serve.features.featureset import FeatureSet
from supmae_serve.model import save_checkpoint

from .conftest import synthetic_image, tiny_model

pytest.importorskip("pyarrow", reason="feature sets need pyarrow: pip install 'supmae[features]'")

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_checkpoint(
        tiny_model(), root / "ckpt", variant="micro_patch4_32", class_names=[f"c{i}" for i in range(10)]
    )
    for c in ("a", "b", "c"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(16):
            synthetic_image((36, 32 + i % 5), seed=hash((c, i)) % 10_000).save(
                root / "data" / c / f"{i:02d}.png"
            )
    (root / "data" / "b" / "broken.png").write_bytes(b"not an image")
    return root


def _reference(setup: Path, out: Path, **kw) -> FeatureSet:
    """One uninterrupted process, in this one (one thread, as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = EmbedConfig(
            input=str(setup / "data"),
            out=out,
            model=setup / "ckpt",
            backend="torch",
            device="cpu",
            workers=0,
            progress=False,
            **kw,
        )
        embed_inputs(cfg)
    finally:
        torch.set_num_threads(threads)
    return FeatureSet.open(out)


def _same(a: FeatureSet, b: FeatureSet, atol: float = 0.0) -> None:
    fa, fb = a.read(), b.read()
    assert fa.ids == fb.ids and fa.labels == fb.labels and fa.sources == fb.sources
    if atol:
        np.testing.assert_allclose(fa.embeddings, fb.embeddings, atol=atol, rtol=0)
    else:
        np.testing.assert_array_equal(fa.embeddings, fb.embeddings)
    assert a.errors() == b.errors() and len(a.errors()) == 1
    keys = ("count", "failed", "dim", "dtype", "pooling", "normalized", "model")
    assert {k: a.manifest[k] for k in keys} == {k: b.manifest[k] for k in keys}


# A child that embeds slowly (each batch sleeps 50 ms in a backend registered under another name that
# reports itself as torch), so the parent can kill it part-way through.
SLOW_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from supmae_serve.backends import register_backend
    from supmae_serve.backends.torch_backend import TorchBackend
    from supmae_serve.features.bulk import EmbedConfig, embed_inputs

    class Slow(TorchBackend):
        def embed(self, images, pooling="avg"):
            time.sleep(0.05)
            return super().embed(images, pooling)

    register_backend("slow", lambda cfg: Slow(cfg.model, device="cpu"))
    data, out, ckpt = sys.argv[1:4]
    embed_inputs(EmbedConfig(input=data, out=Path(out), model=Path(ckpt), backend="slow", device="cpu",
                             batch_size=3, shard_size=4, workers=1, progress=False))
    """
)


def test_sigkill_then_resume_gives_the_uninterrupted_feature_set(setup, tmp_path):
    ref = _reference(setup, tmp_path / "ref", batch_size=3, shard_size=4)
    script = tmp_path / "slow_child.py"
    script.write_text(SLOW_CHILD)
    out = tmp_path / "out"
    args = [sys.executable, str(script), str(setup / "data"), str(out), str(setup / "ckpt")]
    child = subprocess.Popen(args, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 3:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child wrote no shards"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    shards_at_kill = len(list(out.glob("part-*.parquet")))
    assert not (out / "features.json").exists() and 3 <= shards_at_kill < 13, "not killed part-way"
    r = subprocess.run(args, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = FeatureSet.open(out)
    assert len(resumed.manifest["shards"]) == 13
    _same(resumed, ref)  # bit for bit: the same batches, in one thread


def test_two_torchrun_processes_give_one_process_result(setup, tmp_path):
    ref = _reference(setup, tmp_path / "ref", batch_size=3, shard_size=4)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "supmae_serve.features.cli", "run", str(setup / "data"), "--out", str(out),
        "--model", str(setup / "ckpt"), "--backend", "torch", "--device", "cpu",
        "--batch-size", "3", "--shard-size", "4", "--workers", "0", "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = FeatureSet.open(out)
    _same(two, ref, atol=1e-6)
    assert two.manifest["run"]["processes"] == 2
    import pyarrow.parquet as pq

    ranks = {json.loads(pq.read_schema(p).metadata[b"supmae"])["rank"] for p in two.shard_paths()}
    assert ranks == {0, 1}  # each process wrote its own shards
