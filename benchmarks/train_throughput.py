"""Pretraining-step throughput: SupMAE vs Hugging Face ViTMAEForPreTraining, side by side in one process.

One step = forward, backward and AdamW step on a batch of random images that already sit on the
device (the data pipeline is not measured), run by the trainer's own `training.step.train_step` (the
levers below wrap it; the HF model runs through it too). For each row the table gives images/s, ms per step,
training FLOPs per image (fwd + bwd, counted once per model with torch's `FlopCounterMode`, the same
count as `benchmarks/model_flops.py`), achieved TFLOP/s and peak memory.

    # the two GPU targets of issue 7 (each prints a table; --sweep runs every lever combination;
    # benchmarks/gpu_suite.sh runs both in one go)
    python benchmarks/train_throughput.py --variant base_patch16_224 --batch 256 --dtype bf16 --sweep
    python benchmarks/train_throughput.py --variant tiny_patch4_32 --batch 1024 --dtype bf16 --sweep
    # one configuration
    python benchmarks/train_throughput.py --variant base_patch16_224 --batch 256 --compile --fused-adamw
    # toy size on a CPU
    nice -n 10 python benchmarks/train_throughput.py --variant micro_patch4_32 --batch 16 --steps 5

Levers (ours only, unless --baseline-compile):
  --fused-adamw   torch's fused AdamW kernel (else the foreach implementation).
  --compile       torch.compile of the forward + loss; AOTAutograd compiles its backward with it. The
                  optimizer step is compiled too unless it is the fused kernel (one launch already).
  --cuda-graphs   the whole step (forward, backward, optimizer) captured once as a CUDA graph and
                  replayed: one launch per step, for launch-bound small models. Works with or without
                  --compile; `--compile-mode reduce-overhead` is torch's own (cudagraph trees) variant.
Our step never reads a value back to the host (no `.item()`); the timer synchronises only at the
edges of each timed window. On CUDA a row's "sync-free" column checks that with
`torch.cuda.set_sync_debug_mode("error")` on one step.

Peak memory: `torch.cuda.max_memory_allocated` above what was allocated before the row (model,
gradients, optimizer state, activations, inputs). On the CPU there is no allocator counter: the
column is the growth of the process's resident set size over the row, sampled every 2 ms after
`malloc_trim`, so treat it as approximate.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # model_flops beside this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # training.step, when run from anywhere
from model_flops import step_flops  # noqa: E402

from supmae_serve.common.args import config_from_args
from supmae_serve.common.system import cpu_name
from supmae_serve.model import ModelConfig, SupMAE, model_config  # noqa: E402
from training.step import StepParts, train_step  # noqa: E402

DTYPES = ("bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
HF_NAME = "HF ViTMAEForPreTraining"


# ---------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Levers:
    """Speed options of one row. The baseline (HF) row takes `compile` only (--baseline-compile)."""

    fused_adamw: bool = False
    compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile_mode!r} is not one of {COMPILE_MODES}")
        if self.cuda_graphs and self.compile and self.compile_mode == "reduce-overhead":
            raise ValueError(
                "--cuda-graphs captures the step by hand; compile mode 'reduce-overhead' makes torch "
                "capture its own CUDA graphs: choose one"
            )

    @property
    def name(self) -> str:
        parts = [] if self.compile or self.cuda_graphs else ["eager"]
        if self.compile:
            parts.append("compile" if self.compile_mode == "default" else f"compile[{self.compile_mode}]")
        if self.cuda_graphs:
            parts.append("cuda-graph")
        parts.append("fused-adamw" if self.fused_adamw else "foreach-adamw")
        return " + ".join(parts)


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: whose model, which framework (ours only) and which levers."""

    impl: str  # "ours" | "hf"
    levers: Levers = Levers()
    framework: str = "supmae"  # ours: supmae (the paper) or mae (no classification branch)

    @property
    def label(self) -> str:
        if self.impl == "hf":
            return HF_NAME
        return "SupMAE (ours)" if self.framework == "supmae" else "MAE (ours, no cls branch)"


@dataclass
class BenchConfig:
    variant: str = "micro_patch4_32"
    batch: int = 8
    steps: int = 10  # timed steps per window
    warmup: int = 3  # untimed steps first (compilation and graph capture happen here)
    repeats: int = 3  # timed windows; the table reports the median
    device: str = "auto"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on the CPU
    num_classes: int | None = None  # None: 10 for 32 px variants (CIFAR), else 1000
    compile_backend: str = "inductor"  # tests use "aot_eager" (no code generation)
    seed: int = 0
    rows: list[RowSpec] = field(default_factory=list)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        return dev

    def resolved_dtype(self, device: torch.device) -> str:
        dtype = self.dtype or ("bf16" if device.type == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        return dtype

    def resolved_classes(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return 10 if model_config(self.variant).img_size <= 32 else 1000

    def validate(self) -> None:
        model_config(self.variant)  # unknown variant -> KeyError listing the known ones
        for name in ("batch", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        device = self.resolved_device()
        self.resolved_dtype(device)
        for spec in self.rows:
            if spec.levers.cuda_graphs and device.type != "cuda":
                raise ValueError("--cuda-graphs needs a CUDA device")
            if spec.impl == "ours" and spec.framework not in ("supmae", "mae"):
                raise ValueError(f"framework must be supmae or mae, got {spec.framework!r}")
            if spec.impl == "hf" and spec.levers.cuda_graphs:
                raise ValueError("the HF baseline is measured without hand-captured CUDA graphs")


SWEEPS = ("main", "extra", "all")


def sweep_rows(device: torch.device, which: str = "all") -> list[RowSpec]:
    """Lever combinations to compare, most important first so that a run stopped by a time limit
    still has the main rows. "main": the HF reference, eager, fused AdamW, compile, CUDA graphs;
    "extra": torch's reduce-overhead mode, a compiled foreach optimizer inside a CUDA graph and the
    HF model compiled (a stronger baseline than the targets use). CUDA-graph rows only on CUDA."""
    if which not in SWEEPS:
        raise ValueError(f"sweep must be one of {SWEEPS}, got {which!r}")
    cuda = device.type == "cuda"
    main = [
        RowSpec("hf", Levers(fused_adamw=True)),  # the reference: eager, SDPA, bf16 autocast, fused AdamW
        RowSpec("ours", Levers(fused_adamw=True)),
        RowSpec("ours", Levers()),
        RowSpec("ours", Levers(fused_adamw=True), framework="mae"),  # no classification branch: HF's work
        RowSpec("ours", Levers(fused_adamw=True, compile=True)),
    ]
    extra = [RowSpec("hf", Levers(fused_adamw=True, compile=True))]
    if cuda:
        main += [
            RowSpec("ours", Levers(fused_adamw=True, compile=True, cuda_graphs=True)),
            RowSpec("ours", Levers(fused_adamw=True, cuda_graphs=True)),
        ]
        extra = [
            RowSpec("ours", Levers(fused_adamw=True, compile=True, compile_mode="reduce-overhead")),
            RowSpec("ours", Levers(compile=True, cuda_graphs=True)),  # compiled foreach AdamW in the graph
            *extra,
        ]
    return {"main": main, "extra": extra, "all": main + extra}[which]


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Contender:
    """A model plus how to get its training loss from (images, labels); `train_step` runs `loss` under
    autocast to `amp_dtype`."""

    name: str
    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    no_decay: set[str]
    amp_dtype: torch.dtype | None = None


def hf_config(c: ModelConfig):
    """ViTMAEConfig with the same shapes, mask ratio and loss as our ModelConfig (random init)."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        hidden_size=c.embed_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,  # timm's / MAE's; HF's default is 1e-12
        image_size=c.img_size,
        patch_size=c.patch_size,
        num_channels=c.in_chans,
        qkv_bias=True,
        decoder_hidden_size=c.decoder_embed_dim,
        decoder_num_hidden_layers=c.decoder_depth,
        decoder_num_attention_heads=c.decoder_num_heads,
        decoder_intermediate_size=int(c.decoder_embed_dim * c.mlp_ratio),
        mask_ratio=c.mask_ratio,
        norm_pix_loss=c.norm_pix_loss,
    )


def build_hf(c: ModelConfig) -> nn.Module:
    try:
        from transformers import ViTMAEForPreTraining
    except ImportError as e:
        raise RuntimeError("the Hugging Face baseline needs transformers: pip install 'supmae[train]'") from e
    # SDPA, like timm's Block in our model (flash attention on GPUs in bf16)
    return ViTMAEForPreTraining._from_config(hf_config(c), attn_implementation="sdpa")


def make_contender(spec: RowSpec, c: ModelConfig, device: torch.device, dtype: str) -> Contender:
    """Build the row's model at config `c` (ours: with the row's framework) on `device`."""
    amp = torch.bfloat16 if dtype == "bf16" else None
    if spec.impl == "ours":
        model = SupMAE(dataclasses.replace(c, framework=spec.framework)).to(device).train()

        def loss(imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(imgs, labels).loss

        return Contender(spec.label, model, loss, model.no_weight_decay(), amp)
    if spec.impl == "hf":
        model = build_hf(c).to(device).train()

        def loss(imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=imgs).loss

        no_decay = {n for n, _ in model.named_parameters() if n.endswith(("cls_token", "mask_token"))}
        return Contender(HF_NAME, model, loss, no_decay, amp)
    raise ValueError(f"unknown implementation {spec.impl!r}; expected 'ours' or 'hf'")


# ---------------------------------------------------------------------------------------------- steps
def build_optimizer(contender: Contender, lr: float | torch.Tensor, fused: bool, capturable: bool):
    """AdamW as in the SupMAE recipe: betas (0.9, 0.95), weight decay 0.05 except on norms, biases,
    tokens and position tables."""
    decay, no_decay = [], []
    for name, p in contender.model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in contender.no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    # capturable: the optimizer refuses a CUDA-graph capture of its step without it, fused or not
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), capturable=capturable, **impl)


StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Loss(NamedTuple):
    loss: torch.Tensor


def make_step(
    contender: Contender,
    levers: Levers,
    device: torch.device,
    example: tuple[torch.Tensor, torch.Tensor],
    compile_backend: str = "inductor",
) -> tuple[StepFn, torch.optim.Optimizer]:
    """A callable (images, labels) -> loss (a device tensor, never read back) doing one full step: the
    trainer's `train_step`, with the row's levers around it."""
    lr = 1.5e-4 * example[0].shape[0] / 256  # the recipe's scaling rule; the value does not matter here
    graphs = levers.cuda_graphs
    if graphs:
        # a tensor lr lets a schedule update it in place between replays
        lr = torch.tensor(lr, device=device)
    opt = build_optimizer(contender, lr, fused=levers.fused_adamw, capturable=graphs)

    loss_fn = contender.loss
    opt_step = opt.step
    if levers.compile:
        mode = None if levers.compile_mode == "default" else levers.compile_mode
        loss_fn = torch.compile(loss_fn, backend=compile_backend, mode=mode)
        if not levers.fused_adamw:  # the fused kernel is already a single launch per group
            opt_step = torch.compile(opt.step, backend=compile_backend, mode=mode)
    mark_step = levers.compile and levers.compile_mode == "reduce-overhead"
    parts = StepParts(
        forward=lambda imgs, labels, noise: _Loss(loss_fn(imgs, labels)),
        optimizer=opt,
        device_type=device.type,
        amp_dtype=contender.amp_dtype,
        # the autocast weight cache must be off while a CUDA graph is captured (its casts must be replayed)
        autocast_cache=not graphs,
        optimizer_step=opt_step,
    )

    def step(imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if mark_step:  # cudagraph trees: a new iteration starts, earlier outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return train_step(parts, imgs, labels)[0]

    if not graphs:
        return step, opt
    return capture_step(parts, example), opt


def capture_step(parts: StepParts, example, warmup: int = 3) -> StepFn:
    """Capture `train_step` (forward + backward + optimizer step) as one CUDA graph (PyTorch's
    whole-network capture recipe: warm up on a side stream, gradients set to None so the capture
    allocates them from the graph's pool, then replay). Inputs are copied into static buffers each
    step; the random masking stays random because CUDA generators advance their offset on every replay."""
    static_imgs = example[0].clone()
    static_labels = example[1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # lazy initialisation (optimizer state, cuBLAS, compilation)
            train_step(parts, static_imgs, static_labels)
    torch.cuda.current_stream().wait_stream(side)
    parts.optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step(parts, static_imgs, static_labels)[0]

    def step(imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        static_imgs.copy_(imgs, non_blocking=True)
        static_labels.copy_(labels, non_blocking=True)
        graph.replay()
        return static_loss.detach()

    step.graph = graph  # keep the graph (and its memory pool) alive with the step
    return step


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(
    step: StepFn,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> tuple[list[float], torch.Tensor]:
    """Seconds for each of `repeats` windows of `steps` steps, after `warmup` untimed steps.

    The host only waits for the device at the edges of a window, so the CPU queues work ahead."""
    loss = None
    for i in range(warmup):
        loss = step(*batches[i % len(batches)])
    _sync(device)
    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(*batches[i % len(batches)])
        _sync(device)
        windows.append(time.perf_counter() - t0)
    return windows, loss


def host_sync_free(
    step: StepFn, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> bool | None:
    """On CUDA: True if one step runs with torch's sync debug mode set to raise on any host sync."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*batch)
        return True
    except RuntimeError as e:
        if "synchroniz" not in str(e).lower():
            raise
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _sync(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict whose "mib" holds the row's peak memory when the block exits (None if unknown)."""
    out: dict = {"mib": None, "kind": None}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["kind"] = "cuda max_memory_allocated"
        return
    _malloc_trim()
    base = _rss_bytes()
    if base is None:
        yield out
        return
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        out["mib"] = (peak[0] - base) / 2**20
        out["kind"] = "cpu rss growth (sampled)"


_FLOPS_CACHE: dict[tuple, float] = {}


def hf_step_flops(c: ModelConfig, batch: int = 2) -> float:
    """Training FLOPs per image (forward + backward) of the HF model, counted like model_flops."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_hf(c).train()
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=x).loss.backward()
    return counter.get_total_flops() / batch


def train_flops_per_image(spec: RowSpec, variant: str, c: ModelConfig) -> float:
    """Forward + backward FLOPs per image; counted once per model on the CPU (device independent)."""
    key = (spec.impl, spec.framework, variant, c.num_classes)
    if key not in _FLOPS_CACHE:
        if spec.impl == "ours":
            gflop = step_flops(variant, batch=2, framework=spec.framework, num_classes=c.num_classes)
            _FLOPS_CACHE[key] = gflop["train_step_GFLOP_per_img"] * 1e9
        else:
            _FLOPS_CACHE[key] = hf_step_flops(c)
    return _FLOPS_CACHE[key]


@dataclass
class RowResult:
    model: str
    levers: str
    batch: int
    images_per_s: float | None = None
    ms_per_step: float | None = None
    gflop_per_img: float | None = None
    tflops: float | None = None
    peak_mem_mib: float | None = None
    mem_kind: str | None = None
    sync_free: bool | None = None
    graph_breaks: int | None = None
    final_loss: float | None = None
    window_s: list[float] = field(default_factory=list)
    error: str | None = None


def measure_row(spec: RowSpec, cfg: BenchConfig, c: ModelConfig) -> RowResult:
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    res = RowResult(model=spec.label, levers=spec.levers.name, batch=cfg.batch)
    res.gflop_per_img = train_flops_per_image(spec, cfg.variant, c) / 1e9
    torch.manual_seed(cfg.seed)
    if spec.levers.compile:
        torch._dynamo.reset()  # no cache entries (or references to the last row's model) carried over
        torch._dynamo.utils.counters.clear()
    with peak_memory(device) as mem:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        batches = [
            (
                torch.randn(cfg.batch, c.in_chans, c.img_size, c.img_size, device=device, generator=gen),
                torch.randint(0, c.num_classes, (cfg.batch,), device=device, generator=gen),
            )
            for _ in range(2)
        ]
        contender = make_contender(spec, c, device, dtype)
        step, _opt = make_step(contender, spec.levers, device, batches[0], cfg.compile_backend)
        windows, loss = time_windows(step, batches, cfg.steps, cfg.warmup, cfg.repeats, device)
        # the one read-back, after timing (and before another step may overwrite a graph's output)
        res.final_loss = float(loss)
        res.sync_free = host_sync_free(step, batches[0], device)
        del step, _opt, contender, batches, loss
    if not math.isfinite(res.final_loss):
        res.error = f"non-finite loss {res.final_loss}"
    res.peak_mem_mib, res.mem_kind = mem["mib"], mem["kind"]
    if spec.levers.compile:
        # torch.optim breaks the graph on purpose around a compiled step (optimizer.py, _use_grad);
        # count only the others, i.e. those in the model's forward and loss
        breaks = torch._dynamo.utils.counters["graph_break"]
        res.graph_breaks = sum(n for reason, n in breaks.items() if "User-inserted graph break" not in reason)
        torch._dynamo.reset()
    res.window_s = windows
    sec = sorted(windows)[len(windows) // 2]  # median window
    res.ms_per_step = 1e3 * sec / cfg.steps
    res.images_per_s = cfg.batch * cfg.steps / sec
    res.tflops = res.images_per_s * res.gflop_per_img / 1e3
    return res


def environment(device: torch.device) -> dict:
    import timm

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = "cpu"
    return env


def run(cfg: BenchConfig, json_path: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Measure every row of `cfg`; rows that fail are kept with their error. The JSON file, if given,
    is rewritten after each row so a run stopped by a time limit keeps what it measured."""
    cfg.validate()
    device = cfg.resolved_device()
    if device.type == "cuda":
        # as the official MAE/SupMAE training scripts do; applies to every row (the patch-embedding conv)
        torch.backends.cudnn.benchmark = True
    c = model_config(cfg.variant, num_classes=cfg.resolved_classes())
    report = {
        "env": environment(device),
        "config": {**dataclasses.asdict(cfg), "rows": None, "dtype": cfg.resolved_dtype(device)},
        "rows": [],
    }
    for spec in cfg.rows:
        try:
            res = measure_row(spec, cfg, c)
        except Exception as e:  # noqa: BLE001 - one failing lever must not lose the other rows
            res = RowResult(
                model=spec.label, levers=spec.levers.name, batch=cfg.batch, error=f"{type(e).__name__}: {e}"
            )
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        report["rows"].append(dataclasses.asdict(res))
        if log:
            log(format_row(report["rows"][-1], report["rows"]))
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=1))
    return report


# ---------------------------------------------------------------------------------------------- table
COLUMNS = (
    "model",
    "levers",
    "batch",
    "img/s",
    "ms/step",
    "GFLOP/img",
    "TFLOP/s",
    "peak MiB",
    "vs HF img/s",
    "vs HF mem",
    "sync-free",
)
BASELINE_LEVERS = Levers(fused_adamw=True).name  # the HF reference row: eager + fused AdamW

# issue 7's GPU targets (H100, bf16): best of ours vs the HF row, and an absolute floor
TARGETS = {
    ("base_patch16_224", 256): {"speedup": 1.5, "images_per_s": 9000.0},
    ("tiny_patch4_32", 1024): {"speedup": 3.0, "images_per_s": None},
}


def baseline_row(rows: list[dict]) -> dict | None:
    for r in rows:
        if r["model"] == HF_NAME and r["levers"] == BASELINE_LEVERS and r.get("images_per_s"):
            return r
    return None


def _fmt(v, spec: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def format_row(r: dict, rows: list[dict]) -> str:
    if r.get("images_per_s") is None:
        return f"| {r['model']} | {r['levers']} | {r['batch']} | error: {(r.get('error') or '')[:300]} |"
    base = baseline_row(rows)
    speed = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "n/a"
    mem = "n/a"
    if base and base.get("peak_mem_mib") and r.get("peak_mem_mib") is not None:
        mem = f"{r['peak_mem_mib'] / base['peak_mem_mib']:.2f}x"
    cells = [
        r["model"],
        r["levers"] + (f" ({r['graph_breaks']} graph breaks)" if r.get("graph_breaks") else ""),
        str(r["batch"]),
        _fmt(r["images_per_s"], ",.0f" if r["images_per_s"] >= 100 else ".1f"),
        _fmt(r["ms_per_step"], ".2f"),
        _fmt(r["gflop_per_img"], ".3f"),
        _fmt(r["tflops"], ".3g"),
        _fmt(r["peak_mem_mib"], ",.0f"),
        speed,
        mem,
        _fmt(r["sync_free"], ""),
    ]
    if r.get("error"):
        cells[-1] += f" (error: {r['error'][:80]})"
    return "| " + " | ".join(cells) + " |"


def format_table(report: dict) -> str:
    env, rows, cfg = report["env"], report["rows"], report["config"]
    where = env["device"]
    if where == "cpu":
        where = f"CPU {env.get('cpu', '?')} ({env.get('cpu_threads', '?')} torch threads)"
    head = (
        f"{cfg['variant']}, batch {cfg['batch']}, {cfg['dtype']}, {where}, torch {env['torch']}, "
        f"timm {env['timm']}, transformers {env['transformers'] or 'absent'}, {env['date']}"
    )
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += [format_row(r, rows) for r in rows]
    kinds = sorted({r["mem_kind"] for r in rows if r.get("mem_kind")})
    if kinds:
        lines += ["", "peak memory: " + ", ".join(kinds)]
    verdict = target_verdict(report)
    if verdict:
        lines += ["", verdict]
    return "\n".join(lines)


def target_verdict(report: dict) -> str | None:
    """One line saying whether issue 7's target for this variant and batch is met (CUDA runs only)."""
    cfg, rows = report["config"], report["rows"]
    target = TARGETS.get((cfg["variant"], cfg["batch"]))
    base = baseline_row(rows)
    ours = [r for r in rows if r["model"] != HF_NAME and r.get("images_per_s") and not r.get("error")]
    if target is None or base is None or not ours or report["env"]["device"] == "cpu":
        return None
    best = max(ours, key=lambda r: r["images_per_s"])
    speedup = best["images_per_s"] / base["images_per_s"]
    ok = speedup >= target["speedup"]
    floor = target["images_per_s"]
    if floor:
        ok = ok and best["images_per_s"] >= floor
    mem_ok = best["peak_mem_mib"] is not None and best["peak_mem_mib"] <= base["peak_mem_mib"]
    return (
        f"target {target['speedup']}x HF"
        + (f" and >= {floor:,.0f} img/s" if floor else "")
        + f": best is {best['model']} [{best['levers']}] at {best['images_per_s']:,.0f} img/s = "
        + f"{speedup:.2f}x HF -> {'MET' if ok else 'NOT MET'}; its peak memory "
        + f"{'<=' if mem_ok else '>'} HF's ({_fmt(best['peak_mem_mib'], ',.0f')} vs "
        + f"{_fmt(base['peak_mem_mib'], ',.0f')} MiB)"
    )


def merge_reports(paths: list[str]) -> list[dict]:
    """Reports from several runs (e.g. the GPU suite's processes), merged per (variant, batch, dtype)."""
    merged: dict[tuple, dict] = {}
    for p in paths:
        try:
            rep = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {p}: {e}")
            continue
        cfg = rep["config"]
        key = (cfg["variant"], cfg["batch"], cfg["dtype"])
        if key in merged:
            merged[key]["rows"].extend(rep["rows"])
        else:
            merged[key] = rep
    return list(merged.values())


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="micro_patch4_32", help="e.g. tiny_patch4_32, base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per window")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bf16 autocast on CUDA, fp32 on CPU"
    )
    ap.add_argument("--framework", choices=("supmae", "mae"), default="supmae", help="our model's framework")
    ap.add_argument("--num-classes", type=int, default=None, help="default: 10 at 32 px, else 1000")
    ap.add_argument("--compile", action="store_true", help="torch.compile our forward+backward (+ optimizer)")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--cuda-graphs", action="store_true", help="capture our whole step as one CUDA graph")
    ap.add_argument("--fused-adamw", action="store_true", help="fused AdamW for our model")
    ap.add_argument("--no-baseline", action="store_true", help="skip the Hugging Face row")
    ap.add_argument(
        "--baseline-compile", action="store_true", help="also time the HF model under torch.compile"
    )
    ap.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        choices=SWEEPS,
        help="lever combinations instead of the lever flags: main, extra or all (the default)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument(
        "--summarize", nargs="+", metavar="JSON", help="print the merged tables of earlier --json reports"
    )
    args = ap.parse_args(argv)
    cfg = config_from_args(BenchConfig, args)
    device = cfg.resolved_device()
    if args.sweep:
        rows = sweep_rows(device, args.sweep)
        if args.no_baseline:
            rows = [r for r in rows if r.impl != "hf"]
    else:
        levers = Levers(
            fused_adamw=args.fused_adamw,
            compile=args.compile,
            compile_mode=args.compile_mode,
            cuda_graphs=args.cuda_graphs,
        )
        rows = [] if args.no_baseline else [RowSpec("hf", Levers(fused_adamw=True))]
        rows.append(RowSpec("ours", levers, framework=args.framework))
    hf_compiled = any(r.impl == "hf" and r.levers.compile for r in rows)
    if args.baseline_compile and not args.no_baseline and not hf_compiled:
        rows.append(RowSpec("hf", Levers(fused_adamw=True, compile=True)))
    cfg.rows = rows
    return cfg, args


def main(argv=None) -> dict | list[dict]:
    try:
        cfg, args = parse_args(argv)
        if args.summarize:
            reports = merge_reports(args.summarize)
            for rep in reports:
                print(format_table(rep), end="\n\n")
            return reports
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg.validate()
    except (ValueError, KeyError) as e:
        raise SystemExit(f"train_throughput: {e}") from None
    report = run(cfg, json_path=args.json, log=lambda line: print(line, flush=True))
    print()
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
