"""The graph cache (supmae_serve/backends/graph_cache.py) and the `auto` rule over it: first start builds,
later starts reuse, a changed checkpoint or damaged entry is rebuilt, a failed build falls back to torch,
the bf16 and INT8 gates, and what /v1/info says about the choice.

Builds are real (the export pipeline on the micro model, a few seconds each): one module-scoped build is
copied wherever a test only needs an entry to exist; the tests that build once more are marked slow."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from supmae_serve.api.app import create_app
from supmae_serve.backends import BackendError
from supmae_serve.backends import graph_cache as gc
from supmae_serve.backends.registry import BackendConfig, RuntimeProbe, backend_candidates, create_backend
from supmae_serve.backends.torch_backend import TorchBackend
from supmae_serve.model import save_checkpoint
from supmae_serve.settings import Settings

from .conftest import encode, synthetic_image, tiny_model

CLASSES = [f"c{i}" for i in range(10)]
NO_AMX = frozenset({"avx2", "fma"})
AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"})
CPU_ORT = RuntimeProbe(cuda=False, ort_providers=["CPUExecutionProvider"], tensorrt=False, cpu_flags=NO_AMX)


def checkpoint(path: Path, seed: int = 0) -> Path:
    save_checkpoint(tiny_model(seed=seed), path, variant="micro_patch4_32", class_names=CLASSES)
    return path


def config(ckpt: Path, root: Path, **kw) -> BackendConfig:
    return BackendConfig(model=ckpt, graph_cache=root, threads=1, **{"cpu_flags": NO_AMX, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("gc_ckpt"))


@pytest.fixture(scope="module")
def first_starts(ckpt, tmp_path_factory) -> tuple[Path, list[gc.CacheEntry]]:
    """Two servers starting at once on an empty cache: (the cache root, their entries)."""
    root = tmp_path_factory.mktemp("gc_built") / "graphs"
    entries: list[gc.CacheEntry] = []

    def start():
        entries.append(gc.ensure_entry(gc.CacheRequest(ckpt, root, threads=1)))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return root, entries


@pytest.fixture(scope="module")
def built(first_starts) -> Path:
    """A cache root holding one built fp32 entry for `ckpt`."""
    return first_starts[0]


@pytest.fixture
def cache(built, tmp_path) -> Path:
    """A private copy of the built cache (tests may damage it)."""
    return Path(shutil.copytree(built, tmp_path / "cache"))


@pytest.fixture
def calib(tmp_path) -> Path:
    """A labelled image folder in the model's class names: 3 images per class."""
    for c, name in enumerate(CLASSES):
        (tmp_path / "calib" / name).mkdir(parents=True)
        for i in range(3):
            img = synthetic_image((36, 36), seed=100 * c + i)
            (tmp_path / "calib" / name / f"{i}.png").write_bytes(encode(img))
    return tmp_path / "calib"


def x(n: int = 5) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(n, 3, 32, 32)


# ---------------------------------------------------------------------------- build, reuse, rebuild
def test_first_start_builds_concurrent_starts_build_once_and_later_starts_reuse(ckpt, first_starts):
    root, entries = first_starts
    assert sorted(e.status for e in entries) == ["built", "reused"]  # the second waited on the lock
    assert entries[0].folder == entries[1].folder and entries[0].info["key"] == entries[1].info["key"]
    assert [p.name for p in root.iterdir() if p.is_dir()] == [entries[0].folder.name]  # no temp folder left
    info = json.loads((entries[0].folder / gc.CACHE_FILE).read_text())
    assert {"weights_sha256", "card_sha256", "versions", "builder_sha256", "build_seconds"} <= set(info)
    assert {"torch", "onnx", "onnxruntime", "supmae"} <= set(info["versions"])

    b = create_backend(config(ckpt, root), CPU_ORT)
    sel = b.selection
    assert (b.info().name, b.info().precision, b.info().extra["encoder"]) == (
        "onnxruntime",
        "fp32",
        "encoder.opt.onnx",
    )
    assert sel["graph_cache"]["status"] == "reused" and sel["graph_cache"]["path"] == str(entries[0].folder)
    assert "no AMX" in sel["why"] and sel["cpu"]["features"] == ["avx2"]
    b.warmup((1, 4))  # the reconstruction's torch model loads in the background
    b.reconstructor.preload().join(60)
    assert b.reconstructor._model is not None
    # it computes what torch computes, reconstruction (through torch) included
    ref = TorchBackend(ckpt, device="cpu")
    np.testing.assert_allclose(b.classify(x()).probs, ref.classify(x()).probs, atol=1e-5)
    np.testing.assert_allclose(b.embed(x(), "patch").embedding, ref.embed(x(), "patch").embedding, atol=1e-4)
    r, r0 = b.reconstruct(x(2), 0.5, [4, 5]), ref.reconstruct(x(2), 0.5, [4, 5])
    assert b.info().capabilities["reconstruct"] and (r.mask == r0.mask).all()
    np.testing.assert_allclose(r.pasted, r0.pasted, atol=1e-5)


def test_a_changed_checkpoint_or_software_is_a_new_key(ckpt, built, tmp_path, monkeypatch):
    req = gc.CacheRequest(ckpt, built)
    key, _ = gc.cache_key(req)
    other = checkpoint(tmp_path / "other", seed=1)
    assert gc.cache_key(gc.CacheRequest(other, built))[0] != key
    card = json.loads((ckpt / "model.json").read_text())
    shutil.copytree(ckpt, tmp_path / "recarded")
    card["class_names"] = [f"k{i}" for i in range(10)]
    (tmp_path / "recarded" / "model.json").write_text(json.dumps(card))
    assert gc.cache_key(gc.CacheRequest(tmp_path / "recarded", built))[0] != key
    monkeypatch.setattr(gc, "package_versions", lambda names: {n: "0.0-other" for n in names})
    assert gc.cache_key(req)[0] != key
    monkeypatch.undo()
    monkeypatch.setattr(gc, "builder_digest", lambda: "edited exporter")
    assert gc.cache_key(req)[0] != key


@pytest.mark.slow  # builds once more (seconds)
def test_a_changed_checkpoint_rebuilds(built, ckpt, tmp_path):
    other = checkpoint(tmp_path / "ck", seed=1)
    root = Path(shutil.copytree(built, tmp_path / "cache"))
    first = create_backend(config(ckpt, root), CPU_ORT).selection["graph_cache"]
    second = create_backend(config(other, root), CPU_ORT).selection["graph_cache"]
    assert first["status"] == "reused" and second["status"] == "built" and first["path"] != second["path"]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2


@pytest.mark.slow  # builds once more (seconds)
def test_a_damaged_entry_is_rebuilt(ckpt, cache, tmp_path):
    entry = next(p for p in cache.iterdir() if p.is_dir())
    key = json.loads((entry / gc.CACHE_FILE).read_text())["key"]
    graph = entry / "encoder.opt.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # truncated
    with pytest.raises(gc.GraphCacheError, match="truncated or damaged"):
        gc.check_entry(entry, key)
    (cache / f".build-{entry.name}-dead").mkdir()  # what a build killed mid-way leaves
    b = create_backend(config(ckpt, cache), CPU_ORT)
    assert b.selection["graph_cache"]["status"] == "rebuilt"
    assert "truncated or damaged" in b.selection["graph_cache"]["reason"]
    assert gc.check_entry(entry, key)["key"] == key and not list(cache.glob(".build-*"))
    np.testing.assert_allclose(b.classify(x()).probs, TorchBackend(ckpt).classify(x()).probs, atol=1e-5)
    # an entry without cache.json (a foreign or half-copied folder) is not used either
    (entry / gc.CACHE_FILE).unlink()
    with pytest.raises(gc.GraphCacheError, match="no cache.json"):
        gc.check_entry(entry, key)


# ---------------------------------------------------------------------------- falling back to torch
def test_a_failed_build_falls_back_to_torch(ckpt, tmp_path, monkeypatch, caplog):
    import export.pipeline

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(export.pipeline, "run_export", broken)
    b = create_backend(config(ckpt, tmp_path / "graphs"), CPU_ORT)
    assert b.info().name == "torch" and b.info().precision == "fp32"
    assert "exporter exploded" in b.selection["why"] and b.selection["graph_cache"]["status"] == "failed"
    assert "exporter exploded" in caplog.text and not list((tmp_path / "graphs").glob(".build-*"))


@pytest.mark.slow  # builds once more (seconds)
def test_a_graph_that_does_not_match_torch_is_not_served(ckpt, tmp_path, monkeypatch):
    from export.verify import TOLERANCES, Tolerance

    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(max_rel_err=0.0, cosine_min=1.1, top1_min=1.0))
    b = create_backend(config(ckpt, tmp_path / "graphs"), CPU_ORT)
    assert b.info().name == "torch"
    assert "does not match the torch model" in b.selection["why"] and "cosine_min" in b.selection["why"]
    assert not [p for p in (tmp_path / "graphs").iterdir() if p.is_dir()]  # nothing cached


def test_candidates_and_an_unwritable_cache(ckpt, tmp_path):
    cfg = config(ckpt, tmp_path / "graphs")
    assert [c[0] for c in backend_candidates(cfg, CPU_ORT)] == ["graph-cache", "torch"]
    assert [c[0] for c in backend_candidates(config(ckpt, None), CPU_ORT)] == ["torch"]
    assert [c[0] for c in backend_candidates(config(ckpt, tmp_path, compile=True), CPU_ORT)] == ["torch"]
    assert [c[0] for c in backend_candidates(config(ckpt, tmp_path, precision="bf16"), CPU_ORT)] == ["torch"]
    no_ort = RuntimeProbe(cuda=False, ort_providers=[], tensorrt=False, cpu_flags=NO_AMX)
    assert [c[0] for c in backend_candidates(cfg, no_ort)] == ["torch"]
    (tmp_path / "file").write_text("not a folder")
    b = create_backend(config(ckpt, tmp_path / "file" / "graphs"), CPU_ORT)
    assert b.info().name == "torch" and "cannot create the graph cache folder" in b.selection["why"]


# ---------------------------------------------------------------------------- the bf16 gate
def test_bf16_is_auto_only_on_amx_and_only_when_it_agrees(ckpt, cache, monkeypatch):
    b = create_backend(config(ckpt, cache, cpu_flags=AMX), CPU_ORT)  # measured for real, then recorded
    figure = b.selection["agreement"]["bf16"]
    assert 0.0 <= figure["top1"] <= 1.0 and figure["images"] == gc.VERIFY_IMAGES_GENERATED
    entry = Path(b.selection["graph_cache"]["path"])
    assert json.loads((entry / gc.CACHE_FILE).read_text())["agreement"]["bf16"]["top1"] == figure["top1"]

    calls = []
    monkeypatch.setattr(gc, "measure_bf16", lambda *a: calls.append(a) or {"top1": 0.999, "images": 250})
    info = json.loads((entry / gc.CACHE_FILE).read_text())
    del info["agreement"]["bf16"]
    (entry / gc.CACHE_FILE).write_text(json.dumps(info))
    b = create_backend(config(ckpt, cache, cpu_flags=AMX), CPU_ORT)
    assert (b.info().name, b.info().precision) == ("torch", "bf16") and len(calls) == 1
    assert "AMX" in b.selection["why"] and "99.9%" in b.selection["why"]
    b = create_backend(config(ckpt, cache, cpu_flags=AMX), CPU_ORT)  # recorded: not measured again
    assert b.info().precision == "bf16" and len(calls) == 1
    b = create_backend(config(ckpt, cache, cpu_flags=AMX, precision="fp32"), CPU_ORT)  # asked for fp32
    assert (b.info().name, b.info().precision) == ("onnxruntime", "fp32")
    b = create_backend(config(ckpt, cache, cpu_flags=NO_AMX), CPU_ORT)  # no AMX: fp32 whatever the figure
    assert b.info().precision == "fp32" and "no AMX" in b.selection["why"]

    def broken(*a):
        raise RuntimeError("no bf16 kernels")

    monkeypatch.setattr(gc, "measure_bf16", broken)  # a failure to measure: fp32, and tried again next start
    other = Path(shutil.copytree(cache, cache.parent / "other"))
    for f in other.glob(f"*/{gc.CACHE_FILE}"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "agreement": {}}))
    b = create_backend(config(ckpt, other, cpu_flags=AMX), CPU_ORT)
    assert b.info().precision == "fp32" and "no bf16 kernels" in b.selection["why"]

    info = json.loads((entry / gc.CACHE_FILE).read_text())
    info["agreement"]["bf16"]["top1"] = 0.99  # below 99.5%
    (entry / gc.CACHE_FILE).write_text(json.dumps(info))
    b = create_backend(config(ckpt, cache, cpu_flags=AMX), CPU_ORT)
    assert (b.info().name, b.info().precision) == ("onnxruntime", "fp32") and "only 99.0%" in b.selection[
        "why"
    ]


# ---------------------------------------------------------------------------- the INT8 gate
def test_int8_needs_calibration_images(ckpt, tmp_path):
    with pytest.raises(BackendError, match="pass --calib-data DIR"):
        create_backend(config(ckpt, tmp_path, precision="int8"), CPU_ORT)
    with pytest.raises(BackendError, match="not --no-graph-cache"):
        create_backend(config(ckpt, None, precision="int8"), CPU_ORT)


@pytest.mark.slow  # builds once more (seconds)
def test_int8_is_served_only_above_its_agreement_gate(ckpt, calib, tmp_path, monkeypatch):
    cfg = config(ckpt, tmp_path / "graphs", precision="int8", calib_data=calib)
    monkeypatch.setattr(gc, "INT8_MIN_AGREEMENT", 0.0)
    b = create_backend(cfg, CPU_ORT)
    figure = b.selection["agreement"]["int8"]
    assert (b.info().name, b.info().precision) == ("onnxruntime", "int8-static")
    assert b.info().extra["encoder"] == "encoder.int8-static.onnx" and figure["images"] > 0
    assert "held-out calibration images" in b.selection["why"] and b.classify(x()).probs.shape == (5, 10)
    monkeypatch.setattr(gc, "INT8_MIN_AGREEMENT", 1.01)  # the recorded figure, gated again: refused
    with pytest.raises(BackendError, match=r"--precision int8 refused: .* agrees with fp32 on [\d.]+% of"):
        create_backend(cfg, CPU_ORT)
    # a model without a head has no top-1 to gate on
    with pytest.raises(gc.GraphCacheError, match="no classification head"):
        gc._int8_gate({"top1": None})


# ---------------------------------------------------------------------------- settings and /v1/info
def test_settings_and_flags_for_the_cache(monkeypatch, tmp_path):
    from supmae_serve.cli import parse_settings

    monkeypatch.delenv("SUPMAE_GRAPH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    s, _ = parse_settings([])
    assert s.graph_cache is None and s.backend_config().graph_cache == tmp_path / "supmae" / "graphs"
    assert parse_settings(["--no-graph-cache"])[0].backend_config().graph_cache is None
    s, _ = parse_settings(["--graph-cache", str(tmp_path / "g"), "--calib-data", str(tmp_path)])
    assert s.backend_config().graph_cache == tmp_path / "g" and s.backend_config().calib_data == tmp_path
    monkeypatch.setenv("SUPMAE_GRAPH_CACHE", "off")
    assert (
        Settings().backend_config().graph_cache is None and Settings(graph_cache=False).graph_cache == "off"
    )


def test_info_says_what_was_picked_and_why(ckpt, cache, monkeypatch):
    from supmae_serve.common import system

    monkeypatch.setattr(system, "cpu_flags", lambda: NO_AMX)  # fp32 on any machine (AMX: bf16 is measured)
    s = Settings(model=ckpt, graph_cache=str(cache), demo=False, threads=1, max_batch_size=4)
    with TestClient(create_app(s)) as c:
        info = c.get("/v1/info").json()
        png = encode(synthetic_image((40, 40), seed=1))
        r = c.post("/v1/reconstruct", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
    sel = info["selection"]
    assert info["backend"]["name"] == sel["backend"] == "onnxruntime" and sel["precision"] == "fp32"
    assert sel["why"].startswith("ONNX Runtime's fused fp32 graph") and sel["cpu"]["name"]
    assert sel["cpu"]["features"] == ["avx2"] and "no AMX" in sel["why"]
    cache_info = sel["graph_cache"]
    assert cache_info["status"] == "reused" and cache_info["path"].startswith(str(cache))
    assert cache_info["seconds"] >= 0 and cache_info["build_seconds"] > 0
