"""The export's stage list (which stages a request and a model enable, and so the `[i/n]` count), the
stage runner, and the manifest/table helpers of export/report.py, without exporting whole graphs (the
end-to-end export is tests/test_export.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from export.pipeline import (
    STAGES,
    ExportConfig,
    ExportContext,
    Stage,
    _preferred_first,
    enabled_stages,
    run_export,
    run_stages,
)
from export.quantize import QuantizeConfig, QuantizeReport
from export.report import ExportResult, Record, artefact_files, file_record, format_table, write_manifest
from export.verify import VerifyImages
from supmae_serve.model import load_model_card, save_checkpoint
from tests.conftest import TINY, tiny_model

SETUP = ["load checkpoint", "verification images", "torch reference outputs"]
ONNX = ["encoder.onnx", "encoder.opt.onnx", "encoder.fp16.onnx", "encoder.int8.onnx"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    save_checkpoint(tiny_model(seed=1), root / "supmae", variant=TINY)
    save_checkpoint(tiny_model("supervised", seed=1), root / "supervised", variant=TINY)  # no decoder
    return root


def _names(checkpoints, framework: str = "supmae", **request) -> list[str]:
    cfg = ExportConfig(checkpoint=checkpoints / framework, out=checkpoints / "unused", **request)
    return [s.name for s in enabled_stages(cfg, load_model_card(checkpoints / framework))]


# ---------------------------------------------------------------------------- which stages, how many
def test_default_request_enables_the_onnx_stages_in_order(checkpoints):
    assert _names(checkpoints) == SETUP + ONNX + ["reconstruct.onnx", "latency"]


def test_each_option_adds_or_removes_its_own_stage(checkpoints, tmp_path):
    base = _names(checkpoints)
    calib = _names(checkpoints, calib_data=tmp_path)
    assert calib == base[:7] + ["encoder.int8-static.onnx"] + base[7:]  # right after dynamic INT8
    assert _names(checkpoints, precisions=("fp32", "fp16"), calib_data=tmp_path) == [
        n for n in base if n != "encoder.int8.onnx"
    ]  # static INT8 needs int8 as well as images
    assert _names(checkpoints, optimize=False, latency=False) == [
        n for n in base if n not in ("encoder.opt.onnx", "latency")
    ]
    everything = _names(
        checkpoints, formats=("onnx", "timm", "hf"), tensorrt=True, triton=tmp_path, calib_data=tmp_path
    )
    assert everything == calib[:-1] + [
        "encoder.timm.safetensors",
        "hf/",
        "TensorRT engines",
        "Triton model repository",
        "latency",
    ]
    assert len(everything) == len(STAGES)  # the full request runs every stage once


def test_onnx_is_written_for_whatever_builds_on_it(checkpoints, tmp_path):
    assert _names(checkpoints, formats=("timm",), latency=False) == SETUP + ["encoder.timm.safetensors"]
    # TensorRT engines and the Triton repository are built from encoder.onnx, so it is written too
    trt = _names(checkpoints, formats=("timm",), precisions=("fp32",), tensorrt=True, latency=False)
    assert trt[3:5] == ["encoder.onnx", "encoder.opt.onnx"] and trt[-1] == "TensorRT engines"
    triton = _names(checkpoints, formats=("hf",), precisions=("fp32",), triton=tmp_path, latency=False)
    assert "encoder.onnx" in triton and triton[-1] == "Triton model repository"


def test_reconstruct_is_counted_and_says_why_it_is_skipped(checkpoints):
    # a model without a decoder, or --no-reconstruct, still shows the stage: skipped, with the reason
    stage = next(s for s in STAGES if s.name == "reconstruct.onnx")
    sup, pre = load_model_card(checkpoints / "supervised"), load_model_card(checkpoints / "supmae")
    cfg = ExportConfig(checkpoint=checkpoints / "supmae", out=checkpoints / "unused")
    no_rec = ExportConfig(checkpoint=checkpoints / "supmae", out=checkpoints / "unused", reconstruct=False)
    assert "reconstruct.onnx" in _names(checkpoints, "supervised")
    assert stage.skip(cfg, pre) is None
    assert stage.skip(cfg, sup) == "the model has no decoder"
    assert stage.skip(no_rec, pre) == "--no-reconstruct"


# ---------------------------------------------------------------------------- the runner
def test_run_stages_numbers_lines_collects_records_and_reports_a_failure(tmp_path):
    lines = []
    cfg = ExportConfig(checkpoint=tmp_path, out=tmp_path)
    rec = Record("a.onnx", "encoder", "fp32", "onnx")

    def boom(ctx):
        raise RuntimeError("no")

    stages = [
        Stage("first", lambda c, k: True, lambda ctx: [rec], about=lambda ctx: f"({ctx.cfg.seed})"),
        Stage("second", lambda c, k: True, lambda ctx: [], skip=lambda c, k: "not for this model"),
        Stage("third", lambda c, k: True, boom),
    ]
    ctx = ExportContext(cfg, lines.append)
    with pytest.raises(RuntimeError, match="no"):
        run_stages(stages, ctx)
    assert ctx.records == [rec]
    assert [re.sub(r"\d+\.\d s", "T s", line) for line in lines] == [
        "[1/3] first (0) ...",
        "[1/3] first (0) done (T s)",
        "[2/3] second skipped: not for this model",
        "[3/3] third ...",
        "[3/3] third failed after T s",
    ]


def test_progress_lines_match_the_enabled_stages(checkpoints, tmp_path):
    # a real (fast: no ONNX) export: one numbered line pair per enabled stage, the count is the list's
    lines = []
    cfg = ExportConfig(
        checkpoint=checkpoints / "supmae", out=tmp_path, formats=("timm",), verify_images=2, latency=False
    )
    result = run_export(cfg, log=lines.append)
    started = [m.groups() for m in map(re.compile(r"^\[(\d+)/(\d+)\] (.*) \.\.\.$").match, lines) if m]
    names = [s.name for s in enabled_stages(cfg, load_model_card(checkpoints / "supmae"))]
    assert [(int(i), int(n)) for i, n, _ in started] == [(i, len(names)) for i in range(1, len(names) + 1)]
    assert all(line.startswith(name) for (_, _, line), name in zip(started, names, strict=True))
    assert [r.file for r in result.records] == ["encoder.timm.safetensors"] and not result.failed
    manifest = json.loads(result.manifest.read_text())
    assert [a["file"] for a in manifest["artefacts"]] == ["encoder.timm.safetensors"]
    assert (tmp_path / "model.json").exists()


def test_fused_encoder_is_listed_first_and_the_rest_keep_their_order():
    fp32 = Record("encoder.onnx", "encoder", "fp32", "onnx")
    opt = Record(
        "encoder.opt.onnx", "encoder", "fp32", "onnx-ort", details={"optimized_from": "encoder.onnx"}
    )
    q8 = Record("encoder.int8.onnx", "encoder", "int8-dynamic", "onnx-ort", details={"quantized_from": "x"})
    rec = Record("reconstruct.onnx", "reconstruct", "fp32", "onnx")
    assert _preferred_first([fp32, opt, q8, rec]) == [opt, fp32, q8, rec]


# ---------------------------------------------------------------------------- records, manifest, table
def test_file_record_counts_external_data(tmp_path):
    (tmp_path / "big.onnx").write_bytes(b"x" * 10)
    assert artefact_files(tmp_path / "big.onnx") == [tmp_path / "big.onnx"]
    (tmp_path / "big.onnx.data").write_bytes(b"y" * 5)
    rec = file_record(tmp_path, tmp_path / "big.onnx", "encoder", "fp32", "onnx", opset=18)
    assert rec.bytes == 15 and rec.details["opset"] == 18
    assert rec.details["external_data"]["file"] == "big.onnx.data"
    assert rec.to_dict()["opset"] == 18 and rec.to_dict()["sha256"] == rec.sha256


def _verify(passed: bool, **extra) -> dict:
    return {"passed": passed, "max_rel_err": 1e-3, "cosine_min": 0.99999, "top1_agreement": 1.0, **extra}


def test_manifest_lists_failed_files_apart_and_the_table_shows_each_state(checkpoints, tmp_path):
    card = load_model_card(checkpoints / "supmae")
    good = Record(
        "a.onnx", "encoder", "fp32", "onnx", bytes=2048, verify=_verify(True), latency_ms={"1": 2.0}
    )
    bad = Record("b.onnx", "encoder", "int8-dynamic", "onnx", bytes=10, verify=_verify(False))
    unchecked = Record("c.onnx", "encoder", "fp16", "onnx", verify={"skipped": True, "passed": None})
    plan = Record("e.plan", "encoder", "fp16", "tensorrt-plan")
    rec = Record("r.onnx", "reconstruct", "fp32", "onnx", verify=_verify(True, exact={"mask": True}))
    result = ExportResult(
        tmp_path, [good, bad, unchecked, plan, rec], [{"artefact": "tensorrt", "reason": "no GPU"}],
        tmp_path / "manifest.json", {"1": 3.0},
    )  # fmt: skip
    images = VerifyImages(torch.zeros(4, 3, 32, 32), None, "4 generated images (seed 0)")
    write_manifest(result, card, checkpoints / "supmae", images, verified=True)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [a["file"] for a in m["artefacts"]] == ["a.onnx", "c.onnx", "e.plan", "r.onnx"]
    assert [a["file"] for a in m["failed"]] == ["b.onnx"] and m["skipped"] == result.skipped
    assert m["source"]["weights_sha256"] and m["verification"]["images"] == 4
    assert m["reference_latency_ms"] == {"torch-eager-fp32": {"1": 3.0}}
    rows = {line.split()[0]: line for line in format_table(result, (1,)).splitlines()[2:]}
    assert "2.0 KB" in rows["a.onnx"] and "PASS" in rows["a.onnx"] and rows["a.onnx"].rstrip().endswith("2.0")
    assert "FAIL" in rows["b.onnx"]
    assert "not verified (--no-verify)" in rows["c.onnx"]
    assert "hash checked" in rows["e.plan"]
    assert "(mask exact)" in rows["r.onnx"]
    assert rows["torch"].rstrip().endswith("3.0")


def test_quantization_details_say_how_each_file_was_made():
    dynamic = QuantizeReport("dynamic", {"MatMulInteger": 4}, ["head"]).describe(QuantizeConfig())
    assert dynamic["format"] == "QOperator (dynamic)" and dynamic["reduce_range"] is True
    assert dynamic["quantized_nodes"] == {"MatMulInteger": 4} and dynamic["excluded_nodes"] == ["head"]
    static = QuantizeReport("static", calibration_images=12).describe(QuantizeConfig(reduce_range=False))
    assert static["format"] == "QDQ" and static["calibration_images"] == 12
    assert static["reduce_range"] is True  # static INT8 always uses 7-bit weights (quantize.py)
