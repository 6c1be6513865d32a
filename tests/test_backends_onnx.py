"""The onnxruntime backend on export folders that follow the supmae-export contract (model.json, manifest.json,
encoder.onnx, reconstruct.onnx). The graphs are built here with torch's TorchScript exporter (about a second
each for the micro model), so these tests do not depend on the export package."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from supmae_serve.backends import BackendConfig, BackendError, CapabilityError, create_backend
from supmae_serve.backends.onnx_backend import CPU_EP, CUDA_EP, TRT_EP, OnnxBackend, choose_providers
from supmae_serve.backends.torch_backend import TorchBackend
from supmae_serve.model import masking, save_checkpoint

from .conftest import tiny_model

pytest.importorskip("onnxruntime")

ENC_OUT = ["embedding", "cls_token", "patch_tokens", "logits"]
REC_OUT = ["masked", "reconstruction", "pasted", "mask"]


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        f = self.model.forward_features(images)
        return f.embedding, f.cls_token, f.patch_tokens, f.logits


class _Reconstruct(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, ids_keep):
        r = self.model.reconstruct_with_keep(images, ids_keep)
        return r.masked, r.reconstruction, r.pasted, r.mask


def export_folder(
    ckpt: Path, out: Path, *, reconstruct: bool = True, static_batch: int | None = None
) -> Path:
    """An export folder by the contract: model.json, manifest.json, encoder.onnx [, reconstruct.onnx]."""
    from supmae_serve.model import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt / "model.json", out / "model.json")
    n = static_batch or 2
    x = torch.randn(n, 3, 32, 32)
    batch = {} if static_batch else {0: "batch"}
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    torch.onnx.export(
        _Encoder(model),
        (x,),
        str(out / "encoder.onnx"),
        dynamo=False,
        input_names=["images"],
        output_names=ENC_OUT,
        dynamic_axes={"images": batch} if batch else None,
    )
    arts = [{"file": "encoder.onnx", "kind": "encoder", "precision": "fp32"}]
    if reconstruct:
        g = model.config.img_size // model.config.patch_size
        ids = masking.seeded_keep_indices(model.config.num_patches, 0.75, list(range(n)))
        # the TorchScript tracer cannot take the square root of a traced length: give unpatchify the grid
        grid = lambda x, p, grid=None, channels=3: masking.unpatchify(x, p, grid=(g, g), channels=channels)  # noqa: E731
        with mock.patch("supmae_serve.model.supmae.unpatchify", grid):
            torch.onnx.export(
                _Reconstruct(model),
                (x, ids),
                str(out / "reconstruct.onnx"),
                dynamo=False,
                input_names=["images", "ids_keep"],
                output_names=REC_OUT,
                dynamic_axes={"images": {0: "batch"}, "ids_keep": {0: "batch", 1: "keep"}},
            )
        arts.append({"file": "reconstruct.onnx", "kind": "reconstruct", "precision": "fp32"})
    (out / "manifest.json").write_text(json.dumps({"artefacts": arts}))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(tiny_model(), path, variant="micro_patch4_32", class_names=[f"c{i}" for i in range(10)])
    return path


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory) -> Path:
    return export_folder(ckpt, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def torch_backend(ckpt) -> TorchBackend:
    return TorchBackend(ckpt, device="cpu")


def test_onnx_backend_matches_torch(export_dir, torch_backend, images):
    ort = OnnxBackend(export_dir, device="cpu")
    info = ort.info()
    assert info.name == "onnxruntime" and info.device == "cpu" and info.precision == "fp32"
    assert info.extra["providers"] == [CPU_EP] and info.capabilities["reconstruct"]
    for pooling in ("avg", "cls", "patch"):
        np.testing.assert_allclose(
            ort.embed(images, pooling).embedding, torch_backend.embed(images, pooling).embedding, atol=1e-4
        )
    a, b = ort.classify(images), torch_backend.classify(images)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    assert a.labels == b.labels == [f"c{i}" for i in range(10)]
    for ratio in (0.75, 0.5):  # K is dynamic
        r, ref = (
            ort.reconstruct(images, ratio, [1, 2, 3, 4]),
            torch_backend.reconstruct(images, ratio, [1, 2, 3, 4]),
        )
        np.testing.assert_array_equal(r.mask, ref.mask)
        np.testing.assert_allclose(r.pasted, ref.pasted, atol=1e-4)
    ort.warmup((1, 4))


def test_static_batch_graph_is_chunked_and_padded(ckpt, tmp_path, torch_backend, images):
    folder = export_folder(ckpt, tmp_path / "static", reconstruct=False, static_batch=3)
    ort = OnnxBackend(folder, device="cpu")
    assert ort.encoder.fixed_batch and ort.encoder.max_batch == 3
    np.testing.assert_allclose(ort.embed(images).embedding, torch_backend.embed(images).embedding, atol=1e-4)
    assert ort.info().capabilities["reconstruct"] is False
    with pytest.raises(CapabilityError, match="no reconstruction graph"):
        ort.reconstruct(images, 0.75, [0] * 4)


def test_precision_that_is_not_exported_is_a_clear_error(export_dir):
    with pytest.raises(
        BackendError, match=r"no ONNX encoder with precision int8.*encoder\.onnx \(encoder, fp32\)"
    ):
        OnnxBackend(export_dir, device="cpu", precision="int8")


def test_registry_serves_an_export_folder(export_dir, images):
    b = create_backend(BackendConfig(model=export_dir, device="cpu"))  # auto: ORT on the CPU
    assert b.info().name == "onnxruntime"
    assert b.classify(images).probs.shape == (4, 10)


@pytest.mark.parametrize(
    "available,device,expected,run_on",
    [
        ([CPU_EP], "auto", [CPU_EP], "cpu"),
        ([TRT_EP, CUDA_EP, CPU_EP], "auto", [TRT_EP, CUDA_EP, CPU_EP], "cuda:0"),
        ([TRT_EP, CUDA_EP, CPU_EP], "cpu", [CPU_EP], "cpu"),
        ([CUDA_EP, CPU_EP], "cuda:1", [CUDA_EP, CPU_EP], "cuda:1"),
    ],
)
def test_provider_choice(available, device, expected, run_on):
    providers, where = choose_providers(available, device, fp16=True, trt_cache="/tmp/x")
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == expected and where == run_on
    if TRT_EP in expected:
        assert (
            providers[0][1]["trt_fp16_enable"] is True
            and providers[0][1]["trt_engine_cache_path"] == "/tmp/x"
        )
    if run_on.startswith("cuda:1"):
        assert providers[0][1]["device_id"] == 1


def test_provider_choice_without_gpu_provider_is_a_clear_error():
    with pytest.raises(BackendError, match=r"no CUDA or TensorRT execution provider.*supmae\[gpu\]"):
        choose_providers([CPU_EP], "cuda")
    providers, _ = choose_providers([TRT_EP, CUDA_EP, CPU_EP], "cuda", use_tensorrt=False)
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == [CUDA_EP, CPU_EP]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_onnx_backend_on_gpu(export_dir, torch_backend, images):  # pragma: no cover - no GPU here
    ort = OnnxBackend(export_dir, device="cuda")
    np.testing.assert_allclose(ort.classify(images).probs, torch_backend.classify(images).probs, atol=1e-3)
