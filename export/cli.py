"""supmae-export: a checkpoint -> verified ONNX / INT8 / TensorRT / Triton / timm artefacts.

    supmae-export --checkpoint runs/cifar10/final --out exported/
    supmae-export --checkpoint ck --out exported/ --calib-data data/val --tensorrt --triton triton_repo/
    supmae-export --checkpoint ck --out exported/ --format timm
    supmae-export --checkpoint ck --out exported/ --format hf            # ViTMAE for transformers
    supmae-export --checkpoint ck --out exported/ --verify-only      # re-check an existing folder

Exit status: 0 all artefacts verified; 1 an artefact failed verification (it is listed under "failed"
in manifest.json, not under "artefacts"); 2 bad input (checkpoint, model card, arguments);
3 a requested stage could not run here (e.g. --tensorrt without tensorrt), everything else written.
A thin wrapper over `export.pipeline.run_export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from supmae_serve.common.args import config_from_args
from supmae_serve.model import CheckpointError

from .onnx import DEFAULT_OPSET, ExportError
from .pipeline import FORMATS, ONNX_PRECISIONS, ExportConfig, run_export, verify_existing
from .quantize import QuantizeConfig
from .report import format_table
from .tensorrt import PRECISIONS as TRT_PRECISIONS
from .tensorrt import Profile


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated batch sizes like 1,32, got {text!r}"
        ) from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae-export",
        description="Export a SupMAE checkpoint to ONNX (fp32/fp16/INT8), TensorRT engines, a Triton model "
        "repository, timm weights and a Hugging Face ViTMAE folder; verify each against the PyTorch model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint folder (model.safetensors + model.json)"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (artefacts, model.json, manifest.json)"
    )
    p.add_argument("--format", nargs="+", default=["onnx"], choices=FORMATS, help="what to write")
    p.add_argument(
        "--precision",
        nargs="+",
        default=list(ONNX_PRECISIONS),
        choices=ONNX_PRECISIONS,
        help="ONNX encoder precisions (fp32 is always written; int8 = dynamic, plus static with --calib-data)",
    )
    p.add_argument(
        "--calib-data",
        type=Path,
        help="image folder (flat or root/<class>/<image>) for INT8 calibration and verification",
    )
    p.add_argument("--calib-images", type=int, default=64, help="calibration images for static INT8")
    p.add_argument("--verify-images", type=int, default=32, help="images every artefact is checked on")
    p.add_argument(
        "--no-verify", action="store_true", help="skip parity checks (artefacts are written unverified)"
    )
    p.add_argument(
        "--verify-only", action="store_true", help="re-check an existing --out folder against --checkpoint"
    )
    p.add_argument("--no-optimize", action="store_true", help="do not write encoder.opt.onnx")
    p.add_argument("--no-reconstruct", action="store_true", help="do not write reconstruct.onnx")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--latency-batches", type=_batches, default=(1, 32), help="batch sizes timed per artefact")
    p.add_argument(
        "--threads", type=int, default=0, help="onnxruntime threads for checks and timing (0: all cores)"
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 18)")
    p.add_argument(
        "--tensorrt", action="store_true", help="build TensorRT engines (needs a CUDA GPU and tensorrt)"
    )
    p.add_argument("--trt-precision", nargs="+", default=["fp16", "bf16"], choices=TRT_PRECISIONS)
    p.add_argument("--opt-batch", type=int, default=8, help="TensorRT profile: the batch size tuned for")
    p.add_argument("--max-batch", type=int, default=32, help="TensorRT profile max and Triton max_batch_size")
    p.add_argument(
        "--timing-cache",
        type=Path,
        help="TensorRT timing cache file (default: in --out, named by GPU and version)",
    )
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")
    p.add_argument("--triton", type=Path, metavar="DIR", help="also write a Triton model repository here")
    p.add_argument("--triton-name", default="supmae", help="model name prefix in the Triton repository")
    p.add_argument("--seed", type=int, default=0, help="seed for image sampling")
    return p


def export_config(args: argparse.Namespace) -> ExportConfig:
    """The flags named like ExportConfig's fields go straight in; these are converted, negated or nested."""
    return config_from_args(
        ExportConfig,
        args,
        formats=tuple(dict.fromkeys(args.format)),
        precisions=tuple(dict.fromkeys(args.precision)),
        optimize=not args.no_optimize,
        reconstruct=not args.no_reconstruct,
        verify=not args.no_verify,
        latency=not args.no_latency,
        quantize=QuantizeConfig(),
        trt_precisions=tuple(dict.fromkeys(args.trt_precision)),
        profile=Profile(1, args.opt_batch, args.max_batch),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = export_config(args)
    except ValueError as e:
        parser.error(str(e))  # exits 2 with the usage line
    try:
        result = verify_existing(cfg) if args.verify_only else run_export(cfg)
    except (CheckpointError, ExportError) as e:
        print(f"supmae-export: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result, cfg.latency_batches if cfg.latency and not args.verify_only else ()))
    print(f"\nmanifest: {result.manifest}")
    failed = result.failed
    if failed and cfg.verify:
        print(
            "supmae-export: verification FAILED for "
            + "; ".join(f"{r.file} ({'; '.join((r.verify or {}).get('failures', []))})" for r in failed)
            + (
                "\nThese files are listed under 'failed' in manifest.json, not under 'artefacts'."
                " Use --no-verify to write artefacts without checks."
                if not args.verify_only
                else ""
            ),
            file=sys.stderr,
        )
        return 1
    if result.skipped:
        for s in result.skipped:
            print(f"supmae-export: {s['artefact']} not built: {s['reason']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
