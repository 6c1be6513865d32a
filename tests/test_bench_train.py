"""benchmarks/train_throughput.py: runs at micro size, sane numbers, FLOPs agree with model_flops and HF.

Speed itself is never asserted here (that is what the benchmark's table is for); GPU-only paths
(CUDA-graph capture, the host-sync check) have their own tests that skip without CUDA.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


tt = _load("train_throughput")
model_flops = _load("model_flops")

MICRO = "micro_patch4_32"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread on a shared CPU


def _cfg(rows, **kw) -> tt.BenchConfig:
    base = dict(variant=MICRO, batch=4, steps=2, warmup=1, repeats=1, device="cpu", rows=rows)
    return tt.BenchConfig(**{**base, **kw})


def test_runs_and_reports_sane_numbers(tmp_path):
    rows = [
        tt.RowSpec("hf", tt.Levers(fused_adamw=True)),
        tt.RowSpec("ours", tt.Levers(fused_adamw=True)),
        tt.RowSpec("ours", tt.Levers(), framework="mae"),
    ]
    out = tmp_path / "report.json"
    report = tt.run(_cfg(rows), json_path=str(out))
    hf, ours, mae = report["rows"]
    for r in report["rows"]:
        assert r["error"] is None, r
        assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["ms_per_step"] > 0
        assert math.isclose(r["images_per_s"], 4 * 2 / r["window_s"][0])
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0
        assert r["mem_kind"] == "cpu rss growth (sampled)"
        assert r["sync_free"] is None  # only checked on CUDA
    assert hf["model"] == tt.HF_NAME and ours["model"] == "SupMAE (ours)"

    # our FLOPs are model_flops' count; HF's agree with ours (same shapes, no classification branch)
    micro = model_flops.step_flops(MICRO, batch=2, framework="supmae", num_classes=10)
    assert ours["gflop_per_img"] == pytest.approx(micro["train_step_GFLOP_per_img"], rel=1e-9)
    micro_mae = model_flops.step_flops(MICRO, batch=2, framework="mae", num_classes=10)
    assert mae["gflop_per_img"] == pytest.approx(micro_mae["train_step_GFLOP_per_img"], rel=1e-9)
    # same shapes, same matmuls: HF's count equals our MAE model's (ViT-B/16: 30.244 GFLOP/img both)
    assert hf["gflop_per_img"] == pytest.approx(mae["gflop_per_img"], rel=1e-6)
    assert 1.0 < ours["gflop_per_img"] / hf["gflop_per_img"] < 1.3  # + BN-MLP head and its loss

    # the JSON on disk is the report; the table has a row per model and the ratio column
    assert tt.json.loads(out.read_text())["rows"] == report["rows"]
    table = tt.format_table(report)
    assert table.count("\n| ") == 5  # header, separator, 3 rows
    assert "1.00x" in table and "SupMAE (ours)" in table


def test_hf_config_matches_ours_parameter_for_parameter():
    """Same shapes: HF's ViTMAEForPreTraining has exactly our MAE model's parameter count."""
    from supmae_serve.model import SupMAE, model_config

    for variant in (MICRO, "tiny_patch4_32"):
        c = model_config(variant, framework="mae")
        ours = sum(p.numel() for p in SupMAE(c).parameters())
        hf = sum(p.numel() for p in tt.build_hf(c).parameters())
        assert ours == hf, variant
    hc = tt.hf_config(model_config("base_patch16_224"))
    assert (hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (hc.decoder_hidden_size, hc.decoder_num_hidden_layers, hc.decoder_num_attention_heads) == (
        512,
        1,
        16,
    )
    assert hc.norm_pix_loss and hc.mask_ratio == 0.75 and hc.layer_norm_eps == 1e-6


class _HostRead(AssertionError):
    pass


def test_our_step_never_reads_back_to_the_host(monkeypatch):
    """The step must not call .item()/.tolist()/float()/bool() on a tensor (each a host sync on a GPU).
    Checked on the CPU with the fused optimizer, whose step counter stays a tensor."""
    c = tt.model_config(MICRO, num_classes=10)
    device = torch.device("cpu")
    contender = tt.make_contender(tt.RowSpec("ours", tt.Levers(fused_adamw=True)), c, device, "fp32")
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    step, _ = tt.make_step(contender, tt.Levers(fused_adamw=True), device, batch)

    def forbidden(name):
        def f(self, *a, **k):
            raise _HostRead(f"Tensor.{name} called inside the training step")

        return f

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    losses = [step(*batch) for _ in range(2)]
    monkeypatch.undo()
    assert all(math.isfinite(float(x)) for x in losses)


def test_compiled_step_has_no_graph_breaks_in_the_model():
    """torch.compile path, with dynamo's eager backend (no code generation, seconds on a CPU)."""
    row = tt.RowSpec("ours", tt.Levers(fused_adamw=True, compile=True))
    report = tt.run(_cfg([row], compile_backend="eager"))
    (r,) = report["rows"]
    assert r["error"] is None, r
    assert r["graph_breaks"] == 0
    assert r["levers"] == "compile + fused-adamw" and r["images_per_s"] > 0


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_groups_and_graph_capturability(fused):
    """Decay only on matrices; a step to be captured in a CUDA graph must be capturable (torch refuses
    the capture otherwise, fused or not). Checked on the CPU, where both settings construct."""
    c = tt.model_config(MICRO, num_classes=10)
    contender = tt.make_contender(tt.RowSpec("ours"), c, torch.device("cpu"), "fp32")
    opt = tt.build_optimizer(contender, torch.tensor(1e-3), fused=fused, capturable=True)
    decay, no_decay = opt.param_groups
    assert all(g["capturable"] for g in opt.param_groups) and bool(decay["fused"]) == fused
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in contender.model.named_parameters()}
    assert {"encoder.cls_token", "mask_token"} <= {names[id(p)] for p in no_decay["params"]}
    n_trainable = sum(p.requires_grad for p in contender.model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_bad_arguments_get_clear_errors():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        tt.main(["--device", "cpu", "--cuda-graphs"])
    with pytest.raises(SystemExit, match="unknown variant"):
        tt.main(["--variant", "nope", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--batch must be >= 1"):
        tt.main(["--batch", "0", "--device", "cpu"])
    with pytest.raises(ValueError, match="choose one"):
        tt.Levers(compile=True, compile_mode="reduce-overhead", cuda_graphs=True)


def test_sweep_and_target_verdict_logic():
    cpu_rows = tt.sweep_rows(torch.device("cpu"))
    assert not any(r.levers.cuda_graphs for r in cpu_rows) and cpu_rows[0].impl == "hf"
    cuda_rows = tt.sweep_rows(torch.device("cuda"))
    assert any(r.levers.cuda_graphs and r.levers.compile for r in cuda_rows)

    def row(model, levers, ips, mem):
        return {
            "model": model,
            "levers": levers,
            "batch": 256,
            "images_per_s": ips,
            "peak_mem_mib": mem,
            "error": None,
        }

    def report(ours_ips, ours_mem):
        return {
            "env": {"device": "NVIDIA H100 80GB HBM3"},
            "config": {"variant": "base_patch16_224", "batch": 256},
            "rows": [
                row(tt.HF_NAME, tt.BASELINE_LEVERS, 5766.0, 30000.0),
                row("SupMAE (ours)", "compile + fused-adamw", ours_ips, ours_mem),
            ],
        }

    assert "-> MET" in tt.target_verdict(report(9100.0, 20000.0))
    assert "<= HF's" in tt.target_verdict(report(9100.0, 20000.0))
    assert "NOT MET" in tt.target_verdict(report(8800.0, 20000.0))  # 1.53x but under 9,000 img/s
    assert "> HF's" in tt.target_verdict(report(9100.0, 40000.0))
    cpu = report(9100.0, 1.0)
    cpu["env"]["device"] = "cpu"
    assert tt.target_verdict(cpu) is None  # the targets are GPU targets


def test_summarize_merges_reports(tmp_path, capsys):
    rep = tt.run(_cfg([tt.RowSpec("ours", tt.Levers())]), json_path=str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(tt.json.dumps(rep))
    merged = tt.main(["--summarize", str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "c")])
    assert len(merged) == 1 and len(merged[0]["rows"]) == 2
    assert "skipping" in capsys.readouterr().out


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_step_trains_without_host_syncs(compiled):
    device = torch.device("cuda")
    c = tt.model_config(MICRO, num_classes=10)
    levers = tt.Levers(fused_adamw=True, cuda_graphs=True, compile=compiled)
    torch._dynamo.reset()
    contender = tt.make_contender(tt.RowSpec("ours", levers), c, device, "bf16")
    batch = (torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device))
    step, _ = tt.make_step(contender, levers, device, batch)
    w0 = contender.model.encoder.patch_embed.proj.weight.detach().clone()
    losses = [float(step(*batch)) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses)
    assert len(set(losses)) > 1  # the captured step is replayed, not frozen
    assert not torch.equal(w0, contender.model.encoder.patch_embed.proj.weight)  # the optimizer ran
    assert tt.host_sync_free(step, batch, device) is True
    torch._dynamo.reset()


@pytest.mark.gpu
@gpu
def test_gpu_rows_report_cuda_memory_and_no_host_syncs():
    rows = [tt.RowSpec("hf", tt.Levers(fused_adamw=True)), tt.RowSpec("ours", tt.Levers(fused_adamw=True))]
    report = tt.run(_cfg(rows, device="cuda", dtype="bf16"))
    for r in report["rows"]:
        assert r["error"] is None, r
        assert r["mem_kind"] == "cuda max_memory_allocated" and r["peak_mem_mib"] > 0
    assert report["rows"][1]["sync_free"] is True


@pytest.mark.gpu
@gpu
def test_masking_is_random_across_graph_replays():
    """The captured step relies on torch's graph-safe RNG: each replay draws a new mask."""
    from supmae_serve.model.masking import random_masking

    device = torch.device("cuda")
    random_masking(8, 64, 0.75, device)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids_keep, mask, _ = random_masking(8, 64, 0.75, device)
    seen = []
    for _ in range(3):
        graph.replay()
        seen.append(ids_keep.clone())
    torch.cuda.synchronize()
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert mask.sum().item() == 8 * (64 - 16)
