"""TensorRT export logic without a GPU (a fake tensorrt module records the builder calls), and a real
engine build where tensorrt imports and a CUDA GPU is present."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from export import tensorrt as trt_export
from export.onnx import ExportError
from export.tensorrt import (
    BuildConfig,
    Profile,
    TensorRTUnavailable,
    build_engine,
    build_engines,
    engine_filename,
    engine_matches,
    keep_norms_fp32,
    parse_engine_filename,
    plan_precisions,
    timing_cache_filename,
)


# ---------------------------------------------------------------------------- a fake tensorrt
class _Enum:
    def __init__(self, *names):
        for n in names:
            setattr(self, n, f"{type(self).__name__}.{n}")
        self._names = names

    def __iter__(self):
        return iter(self._names)


class FakeLayer:
    def __init__(self, name, type_, num_outputs=1, compute_precision=False):
        self.name, self.type, self.num_outputs = name, type_, num_outputs
        self.precision = None
        self.output_types = {}
        if compute_precision:
            self.compute_precision = None

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self, trt, flags):
        self.flags = flags
        t = trt.LayerType
        self.layers = [
            FakeLayer("conv", t.CONVOLUTION),
            FakeLayer("ln0", t.NORMALIZATION, compute_precision=True),
            FakeLayer("matmul", t.MATRIX_MULTIPLY),
            FakeLayer("softmax", t.SOFTMAX),
            FakeLayer("reduce_mean", t.REDUCE),
        ]

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class FakeParser:
    fail_with: list[str] = []

    def __init__(self, network, logger):
        self.network = network
        self.parsed = None

    def parse_from_file(self, path):
        self.parsed = path
        return not self.fail_with

    @property
    def num_errors(self):
        return len(self.fail_with)

    def get_error(self, i):
        return types.SimpleNamespace(desc=lambda: self.fail_with[i])


class FakeCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return b"CACHE:" + self.data


class FakeConfig:
    def __init__(self):
        self.flags, self.profiles, self.pool = set(), [], {}
        self.timing_cache = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, p):
        self.profiles.append(p)

    def create_timing_cache(self, data):
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.timing_cache = cache

    def get_timing_cache(self):
        return self.timing_cache


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeBuilder:
    last: FakeBuilder | None = None
    build_returns_none = False

    def __init__(self, logger):
        FakeBuilder.last = self
        self.network = self.config = None

    def create_network(self, flags):
        self.network = FakeNetwork(self.trt, flags)
        return self.network

    def create_builder_config(self):
        self.config = FakeConfig()
        return self.config

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        return None if self.build_returns_none else b"ENGINE-BYTES"


def make_fake_trt(version="10.7.0", weak=True, bf16=True):
    trt = types.SimpleNamespace(__version__=version)
    flag_names = ["OBEY_PRECISION_CONSTRAINTS", "FP16", *(["BF16"] if bf16 else [])] if weak else ["TF32"]
    trt.BuilderFlag = type("BuilderFlag", (_Enum,), {})(*flag_names)
    trt.LayerType = type("LayerType", (_Enum,), {})(
        "CONVOLUTION", "NORMALIZATION", "MATRIX_MULTIPLY", "SOFTMAX", "REDUCE"
    )
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.float32, trt.float16 = "float32", "float16"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    builder = type("Builder", (FakeBuilder,), {"trt": trt, "build_returns_none": False})
    trt.Builder = builder
    trt.OnnxParser = type("OnnxParser", (FakeParser,), {"fail_with": []})
    return trt


# ---------------------------------------------------------------------------- naming
def test_engine_names_carry_arch_and_version():
    name = engine_filename("encoder", "fp16", (9, 0), "10.7.0")
    assert name == "encoder.fp16.sm90.trt10.7.0.plan"
    parsed = parse_engine_filename(name)
    assert (parsed.kind, parsed.precision, parsed.arch, parsed.trt_version) == (
        "encoder",
        "fp16",
        "sm90",
        "10.7.0",
    )
    assert engine_matches(name, (9, 0), "10.7.0")
    assert not engine_matches(name, (8, 6), "10.7.0")  # another GPU architecture
    assert not engine_matches(name, (9, 0), "10.8.0")  # another TensorRT
    assert not engine_matches("model.plan", (9, 0), "10.7.0")  # unnamed engines are never trusted
    assert timing_cache_filename((8, 9), "10.7.0") == "timing-cache.sm89.trt10.7.0.bin"
    with pytest.raises(ValueError):
        engine_filename("encoder", "int4", (9, 0), "10.7.0")


def test_profile_validation_and_shapes():
    assert Profile(1, 8, 32).shapes(224) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    for bad in ((0, 1, 2), (1, 9, 8), (4, 2, 8)):
        with pytest.raises(ValueError, match="min <= opt <= max"):
            Profile(*bad)


# ---------------------------------------------------------------------------- precision decisions
def test_precision_plan_by_gpu_and_tensorrt():
    weak = make_fake_trt()
    plans = {p.precision: p for p in plan_precisions(["fp16", "bf16"], (9, 0), weak)}
    assert plans["fp16"].build and plans["fp16"].mode == "weak" and plans["fp16"].onnx == "encoder.onnx"
    assert plans["bf16"].build and plans["bf16"].mode == "weak"
    turing = {p.precision: p for p in plan_precisions(["fp16", "bf16"], (7, 5), weak)}
    assert turing["fp16"].build
    assert not turing["bf16"].build and "8.0" in turing["bf16"].reason and "sm75" in turing["bf16"].reason
    old = plan_precisions(["bf16"], (9, 0), make_fake_trt(version="8.6.1", bf16=False))[0]
    assert not old.build and "no bf16 builder flag" in old.reason
    # TensorRT 11: no precision flags -> strongly typed from the fp16 graph; bf16 refused with a reason
    strong = {
        p.precision: p
        for p in plan_precisions(["fp16", "bf16", "fp32"], (9, 0), make_fake_trt("11.0.0", weak=False))
    }
    assert (
        strong["fp16"].build
        and strong["fp16"].mode == "strong"
        and strong["fp16"].onnx == "encoder.fp16.onnx"
    )
    assert not strong["bf16"].build and "strongly typed" in strong["bf16"].reason
    assert strong["fp32"].build and strong["fp32"].onnx == "encoder.onnx"
    no_fp16_file = plan_precisions(["fp16"], (9, 0), make_fake_trt("11.0.0", weak=False), fp16_onnx=None)[0]
    assert not no_fp16_file.build
    with pytest.raises(ValueError):
        plan_precisions(["int8"], (9, 0), weak)


def test_norm_layers_are_pinned_to_fp32_and_others_left_alone():
    trt = make_fake_trt()
    net = FakeNetwork(trt, 0)
    pinned = keep_norms_fp32(trt, net)
    assert pinned == ["ln0", "reduce_mean"]
    by_name = {layer.name: layer for layer in net.layers}
    assert by_name["ln0"].precision == "float32" and by_name["ln0"].output_types == {0: "float32"}
    assert by_name["ln0"].compute_precision == "float32"
    assert by_name["matmul"].precision is None and by_name["softmax"].output_types == {}


# ---------------------------------------------------------------------------- the build sequence
def test_build_engine_fp16_weak(tmp_path):
    trt = make_fake_trt()
    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"OLD")
    rep = build_engine(
        trt,
        tmp_path / "encoder.onnx",
        tmp_path / "e.plan",
        32,
        BuildConfig("fp16", Profile(1, 4, 16), 1 << 30, cache),
        "weak",
    )
    b = trt.Builder.last
    assert b.network.flags == 0  # weakly typed
    assert b.config.flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    assert b.config.pool == {"WORKSPACE": 1 << 30}
    (profile,) = b.config.profiles
    assert profile.shapes == {"images": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))}
    assert rep.fp32_layers == ["ln0", "reduce_mean"]
    assert (tmp_path / "e.plan").read_bytes() == b"ENGINE-BYTES"
    assert rep.timing_cache_hit and cache.read_bytes() == b"CACHE:OLD"  # loaded, then saved


def test_build_engine_bf16_and_strong_and_fresh_cache(tmp_path):
    trt = make_fake_trt()
    rep = build_engine(
        trt, "m.onnx", tmp_path / "b.plan", 32, BuildConfig("bf16", timing_cache=tmp_path / "new.bin"), "weak"
    )
    assert trt.BuilderFlag.BF16 in trt.Builder.last.config.flags and not rep.timing_cache_hit
    assert (tmp_path / "new.bin").read_bytes() == b"CACHE:"
    strong = make_fake_trt("11.0.0", weak=False)
    rep = build_engine(strong, "m.onnx", tmp_path / "s.plan", 32, BuildConfig("fp16"), "strong")
    assert strong.Builder.last.network.flags == 1 << 5  # STRONGLY_TYPED
    assert strong.Builder.last.config.flags == set() and rep.fp32_layers == []  # types come from the graph


def test_build_engine_errors_are_clear(tmp_path):
    trt = make_fake_trt()
    trt.OnnxParser.fail_with = ["Unsupported operator Foo", "node 12"]
    with pytest.raises(ExportError, match="cannot parse.*Unsupported operator Foo; node 12"):
        build_engine(trt, "bad.onnx", tmp_path / "x.plan", 32, BuildConfig(), "weak")
    trt = make_fake_trt()
    trt.Builder.build_returns_none = True
    with pytest.raises(ExportError, match="failed to build a fp16 engine"):
        build_engine(trt, "m.onnx", tmp_path / "x.plan", 32, BuildConfig(), "weak")
    assert not (tmp_path / "x.plan").exists()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A fake tensorrt 10.7 on a fake sm75 GPU (fp16 but no bf16), as `build_engines` finds them."""
    trt = make_fake_trt()
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_export, "cuda_capability", lambda: (7, 5))
    return trt


def test_build_engines_builds_each_buildable_precision_as_it_goes(tmp_path, fake_gpu):
    log = []
    engines = build_engines(
        tmp_path,
        "encoder.onnx",
        None,
        32,
        ["bf16", "fp16", "fp32"],
        BuildConfig(profile=Profile(1, 4, 16)),
        log.append,
    )
    first = next(engines)  # one build per step: the caller checks an engine before the next is built
    assert first.precision == "fp16" and first.path.name == "encoder.fp16.sm75.trt10.7.0.plan"
    assert log == ["      bf16: not built (bf16 needs compute capability >= 8.0, this GPU is sm75)"]
    assert sorted(p.name for p in tmp_path.glob("*.plan")) == [first.path.name]
    rest = list(engines)
    assert [e.precision for e in rest] == ["fp32"]
    cache = (
        tmp_path / "timing-cache.sm75.trt10.7.0.bin"
    )  # the default: in the folder, named by GPU and version
    assert cache.read_bytes().startswith(b"CACHE:")
    assert first.details == {
        "version": "10.7.0",
        "arch": "sm75",
        "mode": "weak",
        "built_from": "encoder.onnx",
        "profile": {"min": 1, "opt": 4, "max": 16},
        "fp32_layers": 2,
        "timing_cache": str(cache),
        "timing_cache_reused": False,
    }
    assert rest[0].details["timing_cache_reused"] is True  # the second build reads the first one's cache


def test_export_tensorrt_stage_records_engines_and_hands_one_to_triton(tmp_path, fake_gpu):
    # the whole pipeline with the fake GPU: engines are built (unverified: no real GPU to run them on),
    # recorded in the manifest with what they were built for, and the Triton repository serves one
    from export.pipeline import ExportConfig, run_export
    from supmae_serve.model import save_checkpoint
    from tests.conftest import tiny_model

    save_checkpoint(tiny_model(), tmp_path / "ck", variant="micro_patch4_32")
    cfg = ExportConfig(
        checkpoint=tmp_path / "ck",
        out=tmp_path / "out",
        precisions=("fp32",),
        optimize=False,
        reconstruct=False,
        verify=False,
        latency=False,
        tensorrt=True,
        trt_precisions=("fp16",),
        profile=Profile(1, 4, 16),
        triton=tmp_path / "triton",
    )
    log = []
    result = run_export(cfg, log=log.append)
    assert result.skipped == [] and not result.failed
    engine = next(r for r in result.records if r.format == "tensorrt-plan")
    assert engine.file == "encoder.fp16.sm75.trt10.7.0.plan" and engine.precision == "fp16"
    assert engine.details["tensorrt"]["built_from"] == "encoder.onnx" and engine.verify["skipped"]
    assert (tmp_path / "triton" / "supmae_encoder_trt" / "1" / "model.plan").read_bytes() == b"ENGINE-BYTES"
    assert "[5/7] reconstruct.onnx skipped: --no-reconstruct" in log
    assert any(line.startswith("[6/7] TensorRT engines done") for line in log)


def test_missing_tensorrt_names_the_install_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'supmae\[gpu\]'"):
        trt_export.import_tensorrt()


# ---------------------------------------------------------------------------- a real engine
def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


_NO_TRT = (
    "tensorrt is not installed (pip install 'supmae[gpu]')"
    if _tensorrt() is None
    else ("needs a CUDA GPU" if not torch.cuda.is_available() else "")
)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_NO_TRT), reason=_NO_TRT or "runs")
def test_real_engine_matches_torch(tmp_path):
    from export.onnx import convert_fp16, export_encoder
    from export.tensorrt import EngineRunner, cuda_capability
    from export.verify import compare, torch_encoder_outputs
    from supmae_serve.model import load_checkpoint, save_checkpoint
    from tests.conftest import tiny_model

    trt = _tensorrt()
    save_checkpoint(tiny_model(), tmp_path / "ck", variant="micro_patch4_32")
    model, card = load_checkpoint(tmp_path / "ck")
    export_encoder(model, card, tmp_path / "encoder.onnx")
    convert_fp16(tmp_path / "encoder.onnx", tmp_path / "encoder.fp16.onnx")
    cc = cuda_capability()
    x = torch.randn(5, 3, 32, 32)
    ref = torch_encoder_outputs(model, x)
    for plan in plan_precisions(["fp16", "bf16"], cc, trt):
        if not plan.build:
            continue
        engine = tmp_path / engine_filename("encoder", plan.precision, cc, trt.__version__)
        cfg = BuildConfig(plan.precision, Profile(1, 4, 8), 1 << 30, tmp_path / "cache.bin")
        build_engine(trt, tmp_path / plan.onnx, engine, 32, cfg, plan.mode)
        assert engine_matches(engine.name, cc, trt.__version__)
        got = EngineRunner(trt, engine)({"images": x.numpy()})
        res = compare(ref, {k: np.asarray(v) for k, v in got.items()}, plan.precision)
        assert res.passed, res.failures
    assert Path(tmp_path / "cache.bin").stat().st_size > 0
