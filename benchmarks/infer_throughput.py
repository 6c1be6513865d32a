"""Encoder inference throughput: torch eager, torch.compile and ONNX Runtime (plain, graph-optimised,
INT8), plus CUDA/TensorRT execution providers and TensorRT engines when present, side by side in one run.

    # the CPU target of issue 5: ViT-S/16 at 224 px, batch 32, 2 threads
    nice -n 10 python benchmarks/infer_throughput.py --variant small_patch16_224 --batches 1 8 32 --threads 2
    # a trained checkpoint instead of a random-init encoder
    python benchmarks/infer_throughput.py --checkpoint runs/cifar10/final --batches 1 32
    # quick toy run
    python benchmarks/infer_throughput.py --variant micro_patch4_32 --batches 1 8 --repeats 3 --agreement-images 64

What is measured
- Throughput: images/s of one call on a ready batch (random float32, already preprocessed), median
  over --repeats rounds. Rounds are interleaved (every path and batch once per round) so load from
  other processes on a shared machine hits all rows alike; "cpu util" is process CPU time / wall time /
  threads, and well below 1.0 means the row was starved by other processes.
- Agreement: top-1 agreement and embedding cosine of every ONNX Runtime artefact with torch fp32 on
  real images. A random-init encoder's class scores are meaningless, so unless --checkpoint is given
  the head is replaced by a linear classifier fit (softmax regression) on the encoder's features of
  --fit-images real images, and agreement/accuracy are measured on other, held-out images. Images are
  CIFAR-10 train JPEGs from --images (default ../shared/data/cifar10/train), upscaled by the model
  card's preprocessing (bicubic to 256, centre crop 224 for 224-px models).

Artefacts are built with the export library (export/onnx.py, optimize.py, quantize.py) into --work and
reused on later runs with the same variant/seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.onnx import convert_fp16, export_encoder  # noqa: E402
from export.optimize import optimize_encoder  # noqa: E402
from export.quantize import QuantizeConfig, quantize_dynamic_int8, quantize_static_int8  # noqa: E402
from export.verify import generated_images, list_image_folder, output_metrics  # noqa: E402
from supmae_serve.common.system import cpu_name  # noqa: E402
from supmae_serve.model import ModelCard, SupMAE, create_model, load_checkpoint  # noqa: E402
from supmae_serve.model.checkpoint import Preprocessing  # noqa: E402
from supmae_serve.preprocess import batch as preprocess_batch  # noqa: E402
from supmae_serve.preprocess import decode_image  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "cifar10" / "train"


@dataclass
class Row:
    path: str
    batch: int
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.wall)

    def cpu_util(self, threads: int) -> float:
        return statistics.median(c / w for c, w in zip(self.cpu, self.wall, strict=True)) / threads


# ---------------------------------------------------------------------------- model and images
def load_images(
    source: str, n: int, prep: Preprocessing, seed: int
) -> tuple[torch.Tensor, np.ndarray | None, str]:
    if source == "generated" or not Path(source).exists():
        if source != "generated":
            print(f"note: {source} not found, using generated images", file=sys.stderr)
        return (
            preprocess_batch(generated_images(n, prep.image_size, seed), prep),
            None,
            f"{n} generated images",
        )
    paths, labels, _ = list_image_folder(source)
    idx = list(range(len(paths)))
    random.Random(seed).shuffle(idx)
    idx = idx[:n]
    imgs = [decode_image(paths[i].read_bytes()) for i in idx]
    y = np.asarray([labels[i] for i in idx]) if labels is not None else None
    return (
        preprocess_batch(imgs, prep),
        y,
        f"{len(idx)} images from {source}, upscaled by the model card's preprocessing",
    )


def _softmax_regression(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> torch.nn.Linear:
    lin = torch.nn.Linear(z.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(z), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin


def fit_linear_head(model: SupMAE, feats: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict:
    """A linear probe, as one would train it: softmax regression on standardised features with the L2
    strength chosen on a 20% validation split, refit on all, folded into the model's (linear) head."""
    y = torch.from_numpy(labels).long()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mu) / sd
    n_val = max(1, len(z) // 5)
    scores = {}
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        lin = _softmax_regression(z[n_val:], y[n_val:], num_classes, l2)
        with torch.no_grad():
            scores[l2] = float((lin(z[:n_val]).argmax(1) == y[:n_val]).float().mean())
    best = max(scores, key=lambda k: (scores[k], k))  # ties: the stronger regularisation
    lin = _softmax_regression(z, y, num_classes, best)
    with torch.no_grad():
        head = model.cls_head
        head.weight.copy_(lin.weight / sd)
        head.bias.copy_(lin.bias - (lin.weight * (mu / sd)).sum(1))
        train_acc = float((lin(z).argmax(1) == y).float().mean())
    return {"l2": best, "val_accuracy": scores[best], "train_accuracy": train_acc}


def build_model(args) -> tuple[SupMAE, ModelCard, str]:
    if args.checkpoint:
        model, card = load_checkpoint(args.checkpoint)
        return model.eval(), card, f"checkpoint {args.checkpoint}"
    torch.manual_seed(args.seed)
    # a linear head (cls_hidden_dim=0) so it can be fit in closed form-ish below
    model = create_model(args.variant, num_classes=10, cls_hidden_dim=0).eval()
    card = ModelCard(
        config=model.config, variant=args.variant, preprocessing=Preprocessing.for_size(model.config.img_size)
    )
    return (
        model,
        card,
        f"{args.variant}, random-init encoder (seed {args.seed}) + linear head fit on real features",
    )


# ---------------------------------------------------------------------------- artefacts
def build_artefacts(model: SupMAE, card: ModelCard, work: Path, calib: np.ndarray, log) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    files = {
        "fp32": work / "encoder.onnx",
        "opt": work / "encoder.opt.onnx",
        "int8": work / "encoder.int8.onnx",
        "int8-static": work / "encoder.int8-static.onnx",
        "fp16": work / "encoder.fp16.onnx",
    }
    t0 = time.perf_counter()
    export_encoder(model, card, files["fp32"])  # always re-exported: the head was just fit
    log(f"exported encoder.onnx ({time.perf_counter() - t0:.0f} s)")
    rep = optimize_encoder(files["fp32"], files["opt"], card.config.num_heads, card.config.embed_dim)
    log(f"encoder.opt.onnx fused: {rep.fused_ops}")
    quantize_dynamic_int8(files["opt"], files["int8"], QuantizeConfig())
    quantize_static_int8(files["fp32"], files["int8-static"], calib, QuantizeConfig())
    convert_fp16(files["fp32"], files["fp16"])
    return files


def ort_session(path: Path, threads: int, providers: list):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers)


def ort_fn(sess) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return lambda x: dict(zip(names, sess.run(names, {"images": x}), strict=True))


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="small_patch16_224")
    p.add_argument("--checkpoint", help="a trained checkpoint (its own head; no head fitting)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="ImageFolder of real images, or 'generated'")
    p.add_argument("--fit-images", type=int, default=256, help="images the linear head is fit on")
    p.add_argument("--agreement-images", type=int, default=320, help="held-out images for agreement")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images for static INT8")
    p.add_argument("--paths", nargs="+", help="subset of rows to time (default: all available)")
    p.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (it compiles once per batch size)"
    )
    p.add_argument("--work", type=Path, help="artefact folder (default /tmp/supmae_infer_<variant>)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    model, card, model_desc = build_model(args)
    prep = card.preprocessing
    n_total = args.agreement_images + args.calib_images + (0 if args.checkpoint else args.fit_images)
    x_all, y_all, image_desc = load_images(args.images, n_total, prep, args.seed)
    x_eval, y_eval = x_all[: args.agreement_images], None if y_all is None else y_all[: args.agreement_images]
    x_calib = x_all[args.agreement_images : args.agreement_images + args.calib_images]
    work = args.work or Path(f"/tmp/supmae_infer_{card.variant or 'ckpt'}")
    if not args.checkpoint:
        if y_all is None:
            print("error: fitting a head needs labelled images (an ImageFolder)", file=sys.stderr)
            return 2
        x_fit, y_fit = (
            x_all[args.agreement_images + args.calib_images :],
            y_all[args.agreement_images + args.calib_images :],
        )
        t0 = time.perf_counter()
        key = f"{args.variant}_seed{args.seed}_n{len(x_fit)}_{Path(args.images).name}"
        cache = work / f"fit_features_{key}.pt"
        if cache.exists():  # the random-init encoder is a function of the seed: its features can be reused
            feats = torch.load(cache)
        else:
            with torch.inference_mode():
                feats = torch.cat(
                    [model.forward_features(x_fit[i : i + 32]).embedding for i in range(0, len(x_fit), 32)]
                )
            work.mkdir(parents=True, exist_ok=True)
            torch.save(feats, cache)
        fit = fit_linear_head(model, feats.clone(), y_fit, 10)
        model_desc += f"; head L2 {fit['l2']:g}, validation accuracy {fit['val_accuracy']:.3f}"
        log(f"linear head fit on {len(x_fit)} images ({time.perf_counter() - t0:.0f} s): {fit}")

    files = build_artefacts(model, card, work, x_calib.numpy(), log)

    import onnxruntime as ort

    threads = args.threads
    cpu = ["CPUExecutionProvider"]
    fns: dict[str, Callable[[np.ndarray], object]] = {}

    def torch_eager(x: np.ndarray):
        with torch.inference_mode():
            return model.forward_features(torch.from_numpy(x))

    fns["torch eager"] = torch_eager
    if not args.no_compile:
        compiled = torch.compile(model.forward_features, dynamic=False)

        def torch_compiled(x: np.ndarray):
            with torch.inference_mode():
                return compiled(torch.from_numpy(x))

        fns["torch.compile"] = torch_compiled
    sessions = {
        "ORT fp32 (encoder.onnx)": ort_session(files["fp32"], threads, cpu),
        "ORT fp32 fused (encoder.opt.onnx)": ort_session(files["opt"], threads, cpu),
        "ORT int8 dynamic (encoder.int8.onnx)": ort_session(files["int8"], threads, cpu),
        "ORT int8 static QDQ (encoder.int8-static.onnx)": ort_session(files["int8-static"], threads, cpu),
    }
    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail:
        sessions["ORT CUDA EP fp32"] = ort_session(files["fp32"], threads, ["CUDAExecutionProvider", *cpu])
        sessions["ORT CUDA EP fp16"] = ort_session(files["fp16"], threads, ["CUDAExecutionProvider", *cpu])
    if "TensorrtExecutionProvider" in avail:
        trt_opts = {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(work / "trt_ep"),
        }
        sessions["ORT TensorRT EP fp16"] = ort_session(
            files["fp32"], threads, [("TensorrtExecutionProvider", trt_opts), *cpu]
        )
    for name, sess in sessions.items():
        fns[name] = ort_fn(sess)
    engines = _tensorrt_engines(card, files, work, max(args.batches), log)
    fns.update(engines)
    if args.paths:
        fns = {k: v for k, v in fns.items() if any(s in k for s in args.paths)}

    # ---- agreement on held-out real images
    with torch.inference_mode():
        ref = model.forward_features(x_eval)
    agreement = []
    for name, sess in sessions.items():
        got = {"embedding": [], "logits": []}
        for i in range(0, len(x_eval), 32):
            out = ort_fn(sess)(x_eval[i : i + 32].numpy())
            got["embedding"].append(out["embedding"])
            got["logits"].append(out["logits"])
        emb, logits = np.concatenate(got["embedding"]), np.concatenate(got["logits"])
        top_ref = ref.logits.argmax(1).numpy()
        m = output_metrics(ref.embedding.numpy(), emb)
        row = {
            "path": name,
            "top1_agreement": float((logits.argmax(1) == top_ref).mean()),
            "embedding_cosine_min": m.cosine_min,
            "embedding_max_rel_err": m.max_rel_err,
        }
        if y_eval is not None:
            row["accuracy"] = float((logits.argmax(1) == y_eval).mean())
            row["torch_accuracy"] = float((top_ref == y_eval).mean())
        agreement.append(row)
        log(f"agreement {name}: {row}")

    # ---- throughput, interleaved rounds
    rng = np.random.default_rng(0)
    s = prep.image_size
    inputs = {b: rng.standard_normal((b, 3, s, s)).astype(np.float32) for b in args.batches}
    rows = {(name, b): Row(name, b) for name in fns for b in args.batches}
    for name, fn in fns.items():  # warm-up (and compile) every row once
        for b in args.batches:
            t0 = time.perf_counter()
            fn(inputs[b])
            log(f"warm-up {name} b{b}: {time.perf_counter() - t0:.1f} s")
    for r in range(args.repeats):
        for name, fn in fns.items():
            for b in args.batches:
                c0, t0 = time.process_time(), time.perf_counter()
                fn(inputs[b])
                wall = time.perf_counter() - t0
                rows[(name, b)].wall.append(wall)
                rows[(name, b)].cpu.append(time.process_time() - c0)
        log(f"round {r + 1}/{args.repeats} done")

    eager = {b: rows[("torch eager", b)].images_per_s for b in args.batches if ("torch eager", b) in rows}
    table = ["| path | batch | images/s | vs torch eager | cpu util |", "| --- | --- | --- | --- | --- |"]
    results = []
    for (name, b), row in rows.items():
        speed = row.images_per_s / eager[b] if b in eager else float("nan")
        table.append(
            f"| {name} | {b} | {row.images_per_s:.1f} | {speed:.2f}x | {row.cpu_util(threads):.2f} |"
        )
        results.append(
            {
                "path": name,
                "batch": b,
                "images_per_s": row.images_per_s,
                "vs_eager": speed,
                "wall_s": row.wall,
                "cpu_util": row.cpu_util(threads),
            }
        )
    agree = [
        "| path | top-1 agreement with torch fp32 | embedding cosine (min) | accuracy (torch) |",
        "| --- | --- | --- | --- |",
    ]
    for a in agreement:
        acc = f"{100 * a['accuracy']:.1f}% ({100 * a['torch_accuracy']:.1f}%)" if "accuracy" in a else "-"
        agree.append(
            f"| {a['path']} | {100 * a['top1_agreement']:.2f}% | {a['embedding_cosine_min']:.4f} | {acc} |"
        )
    env = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "providers": avail,
        "model": model_desc,
        "images": image_desc,
        "load_average": os.getloadavg(),
        "command": "python " + " ".join(sys.argv),
    }
    print("\n".join(f"{k}: {v}" for k, v in env.items()))
    print()
    print("\n".join(table))
    print()
    print(f"agreement on {len(x_eval)} held-out images:")
    print("\n".join(agree))
    if args.json:
        args.json.write_text(
            json.dumps({"env": env, "throughput": results, "agreement": agreement}, indent=2)
        )
    return 0


def _tensorrt_engines(card, files, work, max_batch, log) -> dict[str, Callable]:
    """TensorRT engines (fp16, bf16 where supported) when tensorrt and a CUDA GPU are present."""
    try:
        from export.tensorrt import (
            BuildConfig,
            EngineRunner,
            Profile,
            build_engine,
            cuda_capability,
            engine_filename,
            import_tensorrt,
            plan_precisions,
        )

        trt = import_tensorrt()
        cc = cuda_capability()
    except Exception as e:  # noqa: BLE001 - no tensorrt or no GPU: these rows are simply absent
        log(f"TensorRT engines skipped: {e}")
        return {}
    out = {}
    for plan in plan_precisions(["fp16", "bf16"], cc, trt):
        if not plan.build:
            continue
        engine = work / engine_filename("encoder", plan.precision, cc, trt.__version__)
        cfg = BuildConfig(plan.precision, Profile(1, max_batch, max_batch), 4 << 30, work / "timing.cache")
        build_engine(trt, work / Path(plan.onnx).name, engine, card.preprocessing.image_size, cfg, plan.mode)
        runner = EngineRunner(trt, engine)
        out[f"TensorRT engine {plan.precision}"] = lambda x, runner=runner: runner({"images": x})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
