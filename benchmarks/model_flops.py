"""Parameter counts and FLOPs per image of a training step (forward + backward), torch's flop counter.

    python benchmarks/model_flops.py tiny_patch4_32 base_patch16_224

Counts matmul/conv/SDPA FLOPs (2 per multiply-add), as torch.utils.flop_counter does.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from supmae_serve.model import count_parameters, create_model


def step_flops(variant: str, batch: int = 2, framework: str = "supmae", num_classes: int = 1000) -> dict:
    model = create_model(variant, framework=framework, num_classes=num_classes).train()
    c = model.config
    x = torch.randn(batch, 3, c.img_size, c.img_size)
    y = torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as fwd:
        out = model(x, y)
    fwd_flops = fwd.get_total_flops()
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    with torch.no_grad(), FlopCounterMode(display=False) as inf:
        model.eval().forward_features(x)
    pc = count_parameters(model)
    return {
        "variant": variant,
        "framework": framework,
        "params_encoder_M": pc.encoder / 1e6,
        "params_decoder_M": pc.decoder / 1e6,
        "params_head_M": pc.head / 1e6,
        "params_total_M": pc.total / 1e6,
        "train_step_GFLOP_per_img": (fwd_flops + bwd.get_total_flops()) / batch / 1e9,
        "train_fwd_GFLOP_per_img": fwd_flops / batch / 1e9,
        "inference_GFLOP_per_img": inf.get_total_flops() / batch / 1e9,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=["tiny_patch4_32", "base_patch16_224"])
    ap.add_argument("--num-classes", type=int, default=1000)
    args = ap.parse_args(argv)
    rows = [step_flops(v, num_classes=args.num_classes) for v in args.variants]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in cols) + " |")


if __name__ == "__main__":
    main()
