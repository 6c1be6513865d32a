"""Backends: the torch backend against the model, the shared pooling/probability rules, the fake backend,
the graph-runner logic the onnxruntime and TensorRT backends share, and the registry's `auto` rule."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from supmae_serve.backends import (
    BackendConfig,
    BackendError,
    CapabilityError,
    ModelNotFoundError,
    create_backend,
)
from supmae_serve.backends.base import Backend, pool_features, probs_from_logits
from supmae_serve.backends.fake import FakeBackend, fake_card
from supmae_serve.backends.graph import (
    Artefact,
    GraphBackend,
    precision_preference,
    read_manifest,
    run_chunked,
    select_artefact,
)
from supmae_serve.backends.registry import RuntimeProbe, choose_backend
from supmae_serve.backends.torch_backend import TorchBackend
from supmae_serve.model import create_model, save_checkpoint
from supmae_serve.model.masking import seeded_keep_indices

from .conftest import tiny_model

CLASSES = [f"class{i}" for i in range(10)]


def checkpoint(path: Path, framework: str = "supmae", **overrides) -> Path:
    model = tiny_model(framework, **overrides)
    save_checkpoint(
        model, path, variant="micro_patch4_32", class_names=CLASSES if model.config.has_head else None
    )
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def backend(ckpt) -> TorchBackend:
    return TorchBackend(ckpt, device="cpu")


def test_torch_backend_matches_the_model(backend, images):
    assert isinstance(backend, Backend)
    model = backend.model
    with torch.no_grad():
        f = model.forward_features(images)
    np.testing.assert_allclose(
        backend.embed(images, "avg").embedding, f.patch_tokens.mean(1).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(backend.embed(images, "cls").embedding, f.cls_token.numpy(), atol=1e-5)
    patch = backend.embed(images, "patch").embedding
    assert patch.shape == (4, 64, 64) and patch.dtype == np.float32
    out = backend.classify(images)
    assert out.labels == CLASSES and out.probs.shape == (4, 10)
    np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-5)
    # the head was trained with CE(logits / T, y): the probabilities are softmax(logits / T)
    expect = torch.softmax(f.logits / model.config.cls_temperature, dim=1).numpy()
    np.testing.assert_allclose(out.probs, expect, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        backend.embed(images, "max")


def test_torch_backend_reconstruction_depends_only_on_seed(backend, images):
    r = backend.reconstruct(images, 0.75, [0, 1, 2, 3])
    ref = backend.model.reconstruct(images, 0.75, seed=[0, 1, 2, 3])
    for name in ("masked", "reconstruction", "pasted", "mask"):
        np.testing.assert_allclose(getattr(r, name), getattr(ref, name).numpy(), atol=1e-5)
    assert r.mask.shape == (4, 64) and (r.mask == 0).sum(1).tolist() == [16] * 4
    # image 2 with seed 2 alone gives the same as inside the batch
    alone = backend.reconstruct(images[2:3], 0.75, [2])
    np.testing.assert_allclose(alone.pasted[0], r.pasted[2], atol=1e-5)
    assert set(np.flatnonzero(alone.mask[0] == 0)) == set(seeded_keep_indices(64, 0.75, [2])[0].tolist())
    with pytest.raises(ValueError, match="seeds"):
        backend.reconstruct(images, 0.75, [0])


def test_capabilities_come_from_the_model_card(tmp_path, images):
    mae = TorchBackend(checkpoint(tmp_path / "mae", "mae"), device="cpu")
    assert mae.info().capabilities == {"embed": True, "classify": False, "reconstruct": True}
    with pytest.raises(CapabilityError, match="cannot classify"):
        mae.classify(images)
    sup = TorchBackend(checkpoint(tmp_path / "sup", "supervised"), device="cpu")
    with pytest.raises(CapabilityError, match="cannot reconstruct"):
        sup.reconstruct(images, 0.75, [0] * 4)
    assert sup.classify(images).probs.shape == (4, 10)
    # supervised heads are trained without the temperature: plain softmax
    with torch.no_grad():
        logits = sup.model.forward_features(images).logits
    np.testing.assert_allclose(sup.classify(images).probs, torch.softmax(logits, 1).numpy(), atol=1e-5)


def test_finetuned_avg_pooling_keeps_fc_norm(tmp_path, images):
    ft = TorchBackend(checkpoint(tmp_path / "ft", "finetuned"), device="cpu")
    with torch.no_grad():
        f = ft.model.forward_features(images)
    emb = ft.embed(images, "avg").embedding
    np.testing.assert_allclose(emb, f.embedding.numpy(), atol=1e-5)
    assert not np.allclose(emb, f.patch_tokens.mean(1).numpy(), atol=1e-3)  # fc_norm changes it


def test_pool_features_reads_only_what_it_needs():
    card = fake_card()
    tokens = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    out = pool_features(card, "avg", embedding=tokens.mean(1), cls_token=None, patch_tokens=None)
    np.testing.assert_allclose(out, tokens.mean(1))
    with pytest.raises(ValueError, match="needs the encoder output 'cls_token'"):
        pool_features(card, "cls", embedding=None, cls_token=None, patch_tokens=tokens)
    p = probs_from_logits(card, np.array([[1000.0, 0.0]]))  # numerically stable
    assert np.isfinite(p).all() and p[0, 0] > p[0, 1]


@pytest.mark.parametrize(
    "framework, expected_t",
    [("supmae", 4.0), ("mae", 4.0), ("simmim", 4.0), ("supervised", 1.0), ("finetuned", 1.0)],
)
def test_serving_and_training_share_one_temperature(framework, expected_t):
    """`ModelConfig.logit_temperature` is the T of both the training loss CE(logits / T, y) and the served
    softmax(logits / T): one rule, read from the config (cls_temperature for masked frameworks, else 1)."""
    card = fake_card(framework=framework, cls_temperature=4.0)
    assert card.config.logit_temperature == expected_t
    logits = np.random.default_rng(1).standard_normal((3, 10)) * 5
    expect = torch.softmax(torch.from_numpy(logits) / expected_t, dim=1).numpy()
    np.testing.assert_allclose(probs_from_logits(card, logits), expect, rtol=1e-5, atol=1e-7)
    if framework == "mae":
        return  # no head to train
    torch.manual_seed(0)
    model = create_model(card.config)
    labels = torch.tensor([1, 5, 9])
    loss = model.classification_loss(torch.from_numpy(logits).float(), labels)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits).float() / expected_t, labels)
    torch.testing.assert_close(loss, ce)


def test_precision_rules(ckpt, images):
    with pytest.raises(BackendError, match="fp16 is not supported on the CPU"):
        TorchBackend(ckpt, device="cpu", precision="fp16")
    with pytest.raises(BackendError, match="int8"):
        TorchBackend(ckpt, device="cpu", precision="int8")
    bf16 = TorchBackend(ckpt, device="cpu", precision="bf16")
    assert bf16.info().precision == "bf16"
    fp32 = TorchBackend(ckpt, device="cpu")
    a, b = bf16.embed(images).embedding, fp32.embed(images).embedding
    assert a.dtype == np.float32 and np.abs(a - b).max() < 0.1
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            TorchBackend(ckpt, device="cuda")


def test_warmup_runs_every_batch_size(backend):
    backend.warmup((1, 3))  # no error, and reconstruct is exercised too


# ---------------------------------------------------------------------------- fake backend
def test_fake_backend_is_deterministic_and_shaped_like_the_card(images):
    fake = FakeBackend(fake_card(class_names=CLASSES))
    assert isinstance(fake, Backend)
    a, b = fake.embed(images).embedding, fake.embed(images).embedding
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 64) and not np.allclose(a[0], a[1])
    assert fake.embed(images, "patch").embedding.shape == (4, 64, 64)
    assert fake.classify(images).probs.shape == (4, 10)
    r = fake.reconstruct(images, 0.5, [0, 0, 1, 1])
    assert r.pasted.shape == (4, 3, 32, 32) and (r.mask == 0).sum(1).tolist() == [32] * 4
    np.testing.assert_array_equal(r.mask[0], r.mask[1])
    assert fake.batch_sizes == [4, 4, 4, 4, 4]


# ---------------------------------------------------------------------------- graph backends' shared logic
class ModelRunner:
    """A GraphRunner backed by the torch model (stands in for an onnxruntime session or a TensorRT engine)."""

    def __init__(self, model, graph: str, max_batch: int | None = None, fixed: bool = False):
        self.model, self.graph = model, graph
        self.max_batch, self.fixed_batch = max_batch, fixed
        self.output_names = (
            ["embedding", "cls_token", "patch_tokens", "logits"]
            if graph == "encoder"
            else ["masked", "reconstruction", "pasted", "mask"]
        )
        self.calls: list[int] = []

    @torch.no_grad()
    def run(self, outputs, feeds):
        n = feeds["images"].shape[0]
        self.calls.append(n)
        assert self.max_batch is None or n <= self.max_batch
        assert not self.fixed_batch or n == self.max_batch
        if self.graph == "encoder":
            f = self.model.forward_features(feeds["images"])._asdict()
        else:
            f = self.model.reconstruct_with_keep(feeds["images"], feeds["ids_keep"])._asdict()
        return {k: f[k].numpy() for k in outputs}


@pytest.mark.parametrize("max_batch,fixed", [(None, False), (3, False), (3, True)])
def test_graph_backend_matches_torch_with_chunking_and_padding(backend, images, max_batch, fixed):
    enc = ModelRunner(backend.model, "encoder", max_batch, fixed)
    rec = ModelRunner(backend.model, "reconstruct", max_batch, fixed)
    g = GraphBackend(backend.card, enc, rec, device="cpu", precision="fp32")
    for pooling in ("avg", "cls", "patch"):
        np.testing.assert_allclose(
            g.embed(images, pooling).embedding, backend.embed(images, pooling).embedding, atol=1e-5
        )
    np.testing.assert_allclose(g.classify(images).probs, backend.classify(images).probs, atol=1e-6)
    r, ref = g.reconstruct(images, 0.75, [5, 6, 7, 8]), backend.reconstruct(images, 0.75, [5, 6, 7, 8])
    np.testing.assert_allclose(r.pasted, ref.pasted, atol=1e-5)
    np.testing.assert_array_equal(r.mask, ref.mask)
    if max_batch:
        assert enc.calls[:2] == [3, 3 if fixed else 1]  # 4 images: 3 + 1 (padded to 3 when fixed)


def test_graph_backend_capabilities_follow_the_export(backend, images):
    enc = ModelRunner(backend.model, "encoder")
    enc.output_names = ["embedding", "cls_token", "patch_tokens"]  # exported without logits
    g = GraphBackend(backend.card, enc, None, device="cpu", precision="fp32")
    assert g.info().capabilities == {"embed": True, "classify": False, "reconstruct": False}
    with pytest.raises(CapabilityError, match="no 'logits' output"):
        g.classify(images)
    with pytest.raises(CapabilityError, match="no reconstruction graph"):
        g.reconstruct(images, 0.75, [0] * 4)


def test_run_chunked_concatenates_in_order():
    class Echo:
        output_names = ["y"]
        max_batch, fixed_batch = 2, True

        def run(self, outputs, feeds):
            assert feeds["images"].shape[0] == 2
            return {"y": feeds["images"].numpy() * 10}

    x = torch.arange(5.0).view(5, 1)
    np.testing.assert_array_equal(run_chunked(Echo(), ["y"], {"images": x})["y"], x.numpy() * 10)


def test_manifest_and_artefact_selection(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "artefacts": [
                    {"file": "encoder.onnx", "kind": "encoder", "precision": "fp32"},
                    {"file": "encoder.fp16.onnx", "kind": "encoder", "precision": "fp16"},
                    {
                        "file": "encoder.int8.onnx",
                        "kind": "encoder",
                        "precision": "int8-dynamic",
                        "calibration": None,
                    },
                    {"file": "encoder.fp16.engine", "kind": "encoder", "precision": "fp16"},
                    {"file": "reconstruct.onnx", "kind": "reconstruct", "precision": "fp32"},
                ]
            }
        )
    )
    arts = read_manifest(tmp_path)
    assert arts[2].extra == {"calibration": None}

    def pick(prec, gpu, formats=("onnx",)):
        return select_artefact(arts, "encoder", formats, precision_preference(prec, gpu)).file

    assert pick("auto", False) == "encoder.onnx"
    assert pick("auto", True) == "encoder.fp16.onnx"
    assert pick("int8", False) == "encoder.int8.onnx"
    assert pick("auto", True, ("tensorrt-plan",)) == "encoder.fp16.engine"  # format from the file name
    assert select_artefact(arts, "encoder", ("tensorrt-plan",), ["fp32"]) is None
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(BackendError, match="malformed manifest"):
        read_manifest(tmp_path)
    with pytest.raises(BackendError, match="run supmae-export"):
        read_manifest(tmp_path / "nowhere")


def test_tensorrt_backend_logic_without_tensorrt(tmp_path, ckpt):
    from supmae_serve.backends import tensorrt_backend as trtb

    # dtype mapping, against a stand-in for the tensorrt module
    DataType = types.SimpleNamespace(FLOAT=1, HALF=2, INT64=3, INT32=4, INT8=5, BOOL=6, BF16=7)
    fake_trt = types.SimpleNamespace(DataType=DataType)
    assert trtb.torch_dtype(fake_trt, 2) is torch.float16 and trtb.torch_dtype(fake_trt, 3) is torch.int64
    with pytest.raises(BackendError, match="unsupported TensorRT"):
        trtb.torch_dtype(fake_trt, 99)
    # without CUDA (or tensorrt) the error says what is missing
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text((ckpt / "model.json").read_text())
    (export / "manifest.json").write_text(
        json.dumps({"artefacts": [{"file": "encoder.engine", "kind": "encoder", "precision": "fp16"}]})
    )
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA"):
            trtb.TensorRTBackend(export)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"supmae\[gpu\]"):
            trtb.import_tensorrt()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU, tensorrt and an engine built by supmae-export"
)
def test_tensorrt_backend_on_gpu():  # pragma: no cover - no GPU on the development machines
    pytest.importorskip("tensorrt")
    pytest.skip("build an engine with supmae-export --tensorrt and run the parity check in export's tests")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_gpu_fp16(ckpt, images):  # pragma: no cover - no GPU on the development machines
    gpu = TorchBackend(ckpt, device="cuda", precision="auto")
    assert gpu.info().precision == "fp16"
    cpu = TorchBackend(ckpt, device="cpu")
    np.testing.assert_allclose(gpu.classify(images).probs, cpu.classify(images).probs, atol=2e-2)


# ---------------------------------------------------------------------------- registry and the auto rule
def _export(folder: Path, *files: tuple[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arts = [{"file": f, "kind": "encoder", "precision": p} for f, p in files]
    (folder / "manifest.json").write_text(json.dumps({"artefacts": arts}))
    return folder


CPU_ORT = ["CPUExecutionProvider"]
GPU_ORT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    "files,cuda,providers,trt,device,expected",
    [
        ([("e.engine", "fp16"), ("e.onnx", "fp32")], True, GPU_ORT, True, "auto", "tensorrt"),
        ([("e.engine", "fp16"), ("e.onnx", "fp32")], True, GPU_ORT, False, "auto", "onnxruntime"),
        ([("e.onnx", "fp32")], True, CPU_ORT, False, "auto", "torch"),  # torch on CUDA beats ORT on the CPU
        ([("e.onnx", "fp32")], False, CPU_ORT, False, "auto", "onnxruntime"),
        ([], False, CPU_ORT, False, "auto", "torch"),
        ([], True, GPU_ORT, True, "auto", "torch"),
        ([("e.engine", "fp16"), ("e.onnx", "fp32")], True, GPU_ORT, True, "cpu", "onnxruntime"),
        ([("e.onnx", "fp32")], False, [], False, "auto", "torch"),  # no onnxruntime at all
    ],
)
def test_auto_rule(tmp_path, ckpt, files, cuda, providers, trt, device, expected):
    export = _export(tmp_path / "export", *files) if files else None
    cfg = BackendConfig(model=ckpt, export_dir=export, device=device)
    name, why = choose_backend(cfg, RuntimeProbe(cuda=cuda, ort_providers=providers, tensorrt=trt))
    assert name == expected, why


def test_auto_rule_int8_and_nothing_to_run(tmp_path, ckpt):
    probe = RuntimeProbe(cuda=False, ort_providers=CPU_ORT, tensorrt=False)
    export = _export(tmp_path / "export", ("e.int8.onnx", "int8-dynamic"))
    assert (
        choose_backend(BackendConfig(model=ckpt, export_dir=export, precision="int8"), probe)[0]
        == "onnxruntime"
    )
    with pytest.raises(BackendError, match="int8"):
        choose_backend(BackendConfig(model=ckpt, precision="int8"), probe)
    only_card = tmp_path / "card_only"
    only_card.mkdir()
    (only_card / "model.json").write_text((ckpt / "model.json").read_text())
    with pytest.raises(BackendError, match="nothing this machine can run"):
        choose_backend(BackendConfig(model=only_card), probe)


def test_auto_falls_back_to_the_next_candidate(tmp_path, ckpt, caplog):
    from supmae_serve.backends.registry import backend_candidates

    export = _export(tmp_path / "export", ("encoder.onnx", "fp32"))
    (export / "model.json").write_text((ckpt / "model.json").read_text())
    (export / "encoder.onnx").write_bytes(b"not an onnx graph")
    cfg = BackendConfig(model=ckpt, export_dir=export)
    probe = RuntimeProbe(cuda=False, ort_providers=CPU_ORT, tensorrt=False)
    assert [c[:2] for c in backend_candidates(cfg, probe)] == [("onnxruntime", "cpu"), ("torch", "cpu")]
    with caplog.at_level("WARNING", logger="supmae.backends"):
        b = create_backend(cfg, probe)
    assert b.info().name == "torch" and "onnxruntime on cpu" in caplog.text and "cannot load" in caplog.text
    with pytest.raises(BackendError, match="cannot load"):  # named explicitly: no fallback
        create_backend(BackendConfig(model=ckpt, export_dir=export, backend="onnxruntime"), probe)


def test_engine_and_format_selection():
    from supmae_serve.backends.tensorrt_backend import engine_fits

    engines = [
        Artefact(
            "encoder.fp16.sm80.trt10.7.0.plan",
            "encoder",
            "fp16",
            "tensorrt-plan",
            {"tensorrt": {"arch": "sm80", "version": "10.7.0"}},
        ),
        Artefact(
            "encoder.fp16.sm90.trt10.7.0.plan",
            "encoder",
            "fp16",
            "tensorrt-plan",
            {"tensorrt": {"arch": "sm90", "version": "10.7.0"}},
        ),
        Artefact(
            "encoder.fp16.engine", "encoder", "fp16"
        ),  # nothing recorded: format from the name, fits anything
    ]

    def pick(arch, ver):
        return select_artefact(  # noqa: E731
            engines, "encoder", ("tensorrt-plan",), ["fp16"], lambda a: engine_fits(a, arch, ver)
        ).file

    assert pick("sm90", "10.7.0") == "encoder.fp16.sm90.trt10.7.0.plan"
    assert pick("sm80", "10.7.0") == "encoder.fp16.sm80.trt10.7.0.plan"
    assert pick("sm90", "10.8.0") == "encoder.fp16.engine"
    onnx = [
        Artefact("encoder.onnx", "encoder", "fp32", "onnx"),
        Artefact("encoder.opt.onnx", "encoder", "fp32", "onnx-ort"),
    ]
    assert select_artefact(onnx, "encoder", ("onnx-ort", "onnx"), ["fp32"]).file == "encoder.opt.onnx"
    assert select_artefact(onnx, "encoder", ("onnx",), ["fp32"]).file == "encoder.onnx"


def test_create_backend_errors_are_clear(tmp_path, ckpt):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        create_backend(BackendConfig(model=tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="no model.json"):
        create_backend(BackendConfig(model=tmp_path))
    with pytest.raises(BackendError, match="needs a supmae-export folder"):
        create_backend(BackendConfig(model=ckpt, backend="onnxruntime"))
    with pytest.raises(BackendError, match="no manifest.json"):
        create_backend(BackendConfig(model=ckpt, export_dir=tmp_path))
    b = create_backend(BackendConfig(model=ckpt, backend="auto", device="cpu"))
    assert b.info().name == "torch"
    assert create_backend(BackendConfig(model=ckpt, backend="fake")).info().name == "fake"


def test_default_model_missing_message(monkeypatch):
    from supmae_serve.settings import DEFAULT_MODEL

    if DEFAULT_MODEL.exists():
        pytest.skip("the bundled model is present")
    with pytest.raises(ModelNotFoundError, match="bundled default model"):
        create_backend(BackendConfig(model=DEFAULT_MODEL))
