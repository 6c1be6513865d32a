"""Bulk embedding throughput: supmae-embed against the backend on ready tensors and against the loop a user
would write, torch against ONNX Runtime, and 1 against 2 torchrun processes, side by side in one run.

    flock /tmp/supmae-bench.lock python benchmarks/embed_throughput.py --limit 5000 --json embed.json
    python benchmarks/embed_throughput.py --limit 500 --paths bulk-torch raw-torch   # quick look

Rows (all on the same images, the same batch size, decode workers and threads):
- raw-<backend>:  `Backend.embed` on ready, normalised batches of real images (no decoding, no I/O):
                  the ceiling (median of --raw-rounds batches per measurement).
- bulk-<backend>: `supmae-embed run` in this process (`features.bulk.embed_inputs`): list, read, decode
                  in DataLoader workers, embed, normalise, write Parquet shards and the manifest.
- user-loop:      torchvision `ImageFolder` + `DataLoader` (same workers, batch size) + Resize/CenterCrop/
                  ToTensor/Normalize from the model card + `model.eval()` under `inference_mode`.
- torchrun-N:     `torchrun --nproc-per-node N -m supmae_serve.features.cli run ...` with the threads split
                  between the processes; images/s over the slowest process's embedding span (from its
                  shards' metadata: loop start to last shard written), and the wall time of the command.

Every row runs once per round, rounds interleaved (--repeats), and the raw rows once more at the end; the table
gives the median of the runs and lists them. Images/s counts every image of the run. --limit takes an evenly spaced subset of the sorted file list (the
same subset for every row). The ONNX rows need an export of the model: made once in --work with
`supmae-export --precision fp32` (the CPU backend serves the fused encoder.opt.onnx).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supmae_serve.backends import BackendConfig, create_backend  # noqa: E402
from supmae_serve.common.files import scan_image_folder  # noqa: E402
from supmae_serve.common.system import cpu_name  # noqa: E402
from supmae_serve.features.bulk import EmbedConfig, decode_crop, embed_inputs  # noqa: E402
from supmae_serve.features.featureset import FeatureSet  # noqa: E402
from supmae_serve.preprocess import ImageLimits, normalize  # noqa: E402
from supmae_serve.settings import DEFAULT_MODEL  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "cifar10" / "train"
PATHS = ("raw-torch", "bulk-torch", "user-loop", "raw-onnx", "bulk-onnx", "torchrun-1", "torchrun-2")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subset(images: Path, limit: int | None) -> tuple[list[tuple[Path, int]], list[str], list[int]]:
    samples, classes = scan_image_folder(images)
    idx = list(range(len(samples)))
    if limit and limit < len(samples):
        idx = sorted({int(i) for i in np.linspace(0, len(samples) - 1, limit)})
    return [samples[i] for i in idx], classes, idx


def timed(fn):
    """(fn()'s result, wall seconds, process CPU seconds)."""
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w, time.process_time() - c


def raw_rate(
    model: Path, export: Path | None, backend: str, crops: torch.Tensor, batch: int, rounds: int
) -> float:
    b = create_backend(BackendConfig(model=export or model, backend=backend, device="cpu"))
    prep = b.card.preprocessing
    x = normalize(crops[:batch], prep)  # (B, 3, S, S) ready
    b.embed(x)  # warm-up
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        b.embed(x)
        rates.append(x.shape[0] / (time.perf_counter() - t))
    return statistics.median(rates)


def user_loop(images: Path, idx: list[int], model_path: Path, batch: int, workers: int) -> tuple[int, float]:
    """What a user would write with torchvision: ImageFolder + DataLoader + the model in eval mode.
    -> (images, seconds of the loop: from the DataLoader's creation, as bulk's embed_seconds)."""
    from torchvision import datasets, transforms

    from supmae_serve.model import load_checkpoint

    model, card = load_checkpoint(model_path)
    p = card.preprocessing
    tf = transforms.Compose(
        [
            transforms.Resize(
                round(p.image_size / p.crop_pct), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(p.image_size),
            transforms.ToTensor(),
            transforms.Normalize(p.mean, p.std),
        ]
    )
    ds = torch.utils.data.Subset(datasets.ImageFolder(str(images), transform=tf), idx)
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    n = 0
    with torch.inference_mode():
        for x, _ in loader:
            model.forward_features(x).embedding.numpy()
            n += x.shape[0]
    return n, time.perf_counter() - t0


def write_list(samples, classes, path: Path) -> Path:
    path.write_text("".join(f"{p}\t{classes[c]}\n" for p, c in samples))
    return path


def torchrun(nproc: int, lst: Path, out: Path, args, threads: int) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "supmae_serve.features.cli", "run", str(lst), "--out", str(out), "--model", str(args.model),
        "--backend", "torch", "--device", "cpu", "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--shard-size", str(args.shard_size), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"torchrun {nproc} failed:\n{r.stderr[-3000:]}")
    import pyarrow.parquet as pq

    fs = FeatureSet.open(out)
    spans: dict[int, list[float]] = {}
    for p in fs.shard_paths():
        m = json.loads(pq.read_schema(p).metadata[b"supmae"])
        s = spans.setdefault(m["rank"], [m["loop_start"], m["t_end"]])
        s[0], s[1] = min(s[0], m["loop_start"]), max(s[1], m["t_end"])
    span = max(b - a for a, b in spans.values())
    return {"wall_s": wall, "span_s": span, "ranks": sorted(spans)}


def compare_sets(a: Path, b: Path) -> dict:
    fa, fb = FeatureSet.open(a).read(), FeatureSet.open(b).read()
    same_ids = fa.ids == fb.ids
    diff = float(np.abs(fa.embeddings - fb.embeddings).max()) if same_ids else None
    return {"same_ids": same_ids, "max_abs_diff": diff, "count": len(fa)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--limit", type=int, default=None, help="evenly spaced subset of this many images (default: all)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--raw-rounds", type=int, default=10, help="batches per raw measurement (median)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over every row (medians are reported)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--work", type=Path, default=Path("/tmp/supmae-embed-bench"))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work / f"n{args.limit or 'all'}-b{args.batch_size}-w{args.workers}"
    work.mkdir(parents=True, exist_ok=True)
    samples, classes, idx = subset(args.images, args.limit)
    n = len(samples)
    lst = write_list(samples, classes, work / "inputs.txt")
    log(
        f"{n} images from {args.images}, batch {args.batch_size}, {args.workers} workers, {args.threads} threads"
    )
    prep_probe = create_backend(
        BackendConfig(model=args.model, backend="torch", device="cpu")
    ).card.preprocessing
    crops = torch.stack(
        [
            torch.from_numpy(decode_crop(path.read_bytes, prep_probe, ImageLimits())[0].copy()).permute(
                2, 0, 1
            )
            for path, _ in samples[: args.batch_size]
        ]
    )  # (B, 3, S, S) uint8
    export = None
    if {"raw-onnx", "bulk-onnx"} & set(args.paths):
        export = args.work / "export"
        if not (export / "manifest.json").exists():
            log("exporting the model to ONNX (once)")
            subprocess.run(
                [sys.executable, "-m", "export.cli", "--checkpoint", str(args.model), "--out", str(export),
                 "--precision", "fp32", "--no-reconstruct", "--no-latency", "--verify-images", "8"],
                check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
            )  # fmt: skip
    uptime_before = os.getloadavg()
    onnx_model = {"torch": None, "onnxruntime": export}

    def bulk(backend: str) -> dict:
        out = work / f"bulk-{backend}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cfg = EmbedConfig(
            input=str(lst), out=out, model=onnx_model[backend] or args.model, backend=backend,
            device="cpu", threads=args.threads, batch_size=args.batch_size, workers=args.workers,
            shard_size=args.shard_size, progress=False,
        )  # fmt: skip
        s, wall, cpu = timed(lambda: embed_inputs(cfg))
        return {
            "images_per_s": n / s["embed_seconds"], "wall_s": wall, "embed_s": s["embed_seconds"],
            "cpu_util": cpu / wall / args.threads, "failed": s["failed"],
        }  # fmt: skip

    def user() -> dict:
        (got, loop_s), wall, cpu = timed(
            lambda: user_loop(args.images, idx, args.model, args.batch_size, args.workers)
        )
        return {
            "images_per_s": got / loop_s,
            "wall_s": wall,
            "embed_s": loop_s,
            "cpu_util": cpu / wall / args.threads,
        }

    def raw(backend: str) -> dict:
        return {
            "images_per_s": raw_rate(
                args.model, onnx_model[backend], backend, crops, args.batch_size, args.raw_rounds
            )
        }

    def run_torchrun(nproc: int) -> dict:
        out = work / f"torchrun-{nproc}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = torchrun(nproc, lst, out, args, max(1, args.threads // nproc))
        return {"images_per_s": n / r["span_s"], **r}

    measure = {
        "raw-torch": lambda: raw("torch"),
        "bulk-torch": lambda: bulk("torch"),
        "user-loop": user,
        "raw-onnx": lambda: raw("onnxruntime"),
        "bulk-onnx": lambda: bulk("onnxruntime"),
        "torchrun-1": lambda: run_torchrun(1),
        "torchrun-2": lambda: run_torchrun(2),
    }
    order = [name for name in PATHS if name in args.paths]
    runs: dict[str, list[dict]] = {}
    # rounds interleave every row, so load from other processes on a shared machine hits all rows alike;
    # the raw rows run once more at the end, bracketing the others
    for rep in range(args.repeats):
        for name in order:
            log(f"round {rep + 1} of {args.repeats}: {name}")
            runs.setdefault(name, []).append(measure[name]())
    for name in ("raw-torch", "raw-onnx"):
        if name in order:
            log(f"{name} once more")
            runs[name].append(measure[name]())
    rows = {
        name: {
            **rs[-1],
            "images": n,
            "images_per_s": statistics.median(r["images_per_s"] for r in rs),
            "runs": [round(r["images_per_s"], 1) for r in rs],
        }
        for name, rs in runs.items()
    }
    checks = {}
    if "torchrun-1" in rows and "torchrun-2" in rows:
        checks["torchrun-2 vs torchrun-1"] = compare_sets(work / "torchrun-1", work / "torchrun-2")
    if "bulk-torch" in rows and "torchrun-1" in rows:
        checks["torchrun-1 vs bulk-torch"] = compare_sets(work / "bulk-torch", work / "torchrun-1")
    ratios = {}
    if "bulk-torch" in rows and "raw-torch" in rows:
        ratios["bulk-torch / raw-torch"] = (
            rows["bulk-torch"]["images_per_s"] / rows["raw-torch"]["images_per_s"]
        )
    if "bulk-onnx" in rows and "raw-onnx" in rows:
        ratios["bulk-onnx / raw-onnx"] = rows["bulk-onnx"]["images_per_s"] / rows["raw-onnx"]["images_per_s"]
    if "bulk-torch" in rows and "user-loop" in rows:
        ratios["bulk-torch / user-loop"] = (
            rows["bulk-torch"]["images_per_s"] / rows["user-loop"]["images_per_s"]
        )
    if "bulk-onnx" in rows and "bulk-torch" in rows:
        ratios["bulk-onnx / bulk-torch"] = (
            rows["bulk-onnx"]["images_per_s"] / rows["bulk-torch"]["images_per_s"]
        )
    if "torchrun-2" in rows and "torchrun-1" in rows:
        ratios["torchrun-2 / torchrun-1"] = (
            rows["torchrun-2"]["images_per_s"] / rows["torchrun-1"]["images_per_s"]
        )
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_before": uptime_before,
        "loadavg_after": os.getloadavg(),
        "images": n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
        "command": " ".join(sys.argv),
    }
    if args.json:
        args.json.write_text(
            json.dumps({"env": env, "rows": rows, "ratios": ratios, "checks": checks}, indent=2)
        )
    print(f"\n{env['cpu']}, {n} images, batch {args.batch_size}, {args.workers} workers, {args.threads} threads, "
          f"load {env['loadavg_before'][0]:.1f} -> {env['loadavg_after'][0]:.1f}")  # fmt: skip
    print("| row | images/s | wall s | notes |")
    print("| --- | -------- | ------ | ----- |")
    for name, r in rows.items():
        notes = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items()
            if k in ("cpu_util", "span_s", "runs", "failed")
        )
        print(f"| {name} | {r['images_per_s']:.1f} | {r.get('wall_s', float('nan')):.1f} | {notes} |")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} | | |")
    for k, v in checks.items():
        print(f"| {k} | | | same ids {v['same_ids']}, max abs diff {v['max_abs_diff']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
