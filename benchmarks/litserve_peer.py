"""The peer server of benchmarks/serve_peer.py: what a user gets from LitServe with about 40 lines.

    python benchmarks/litserve_peer.py --model supmae_serve/assets/cifar10_vit_tiny --port 8100

LitServe (the `bench` extra: pip install 'supmae[bench]') with its own dynamic batching (max batch 16,
10 ms timeout), torch eager fp32 on the CPU with --threads intra-op threads, the project's model
(`supmae_serve.model.load_checkpoint`) and preprocessing (`supmae_serve.preprocess`: the same decode, resize,
crop and normalisation as supmae-serve). It answers POST /v1/classify with JSON `{"image": "<base64>"}` (the
body supmae-serve takes too) by the top-5 classes, as supmae-serve's /v1/classify does. With --stats FILE
it keeps "<batches> <images>" in FILE (one pwrite per batch) for the mean batch size.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # supmae_serve, also in LitServe's worker

import litserve as ls  # noqa: E402
import torch  # noqa: E402

from supmae_serve.model import load_checkpoint  # noqa: E402
from supmae_serve.preprocess import ImageLimits, decode_image, resize_side, to_tensor  # noqa: E402


class ClassifyAPI(ls.LitAPI):
    def __init__(
        self, model: str, threads: int, stats: str | None, max_batch_size: int, batch_timeout: float
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/classify")
        self.model_path, self.threads, self.stats_path = model, threads, stats

    def setup(self, device):
        torch.set_num_threads(self.threads)
        self.model, card = load_checkpoint(self.model_path, device="cpu")  # fp32
        self.prep, self.limits = card.preprocessing, ImageLimits()
        self.labels = card.class_names or [f"class_{i}" for i in range(card.config.num_classes)]
        # the temperature the head was trained with (supmae_serve.backends.base.probs_from_logits)
        self.temperature = (
            card.config.cls_temperature if card.framework in ("supmae", "mae", "simmim") else 1.0
        )
        self.batches = self.images = 0
        self.stats = os.open(self.stats_path, os.O_WRONLY | os.O_CREAT, 0o644) if self.stats_path else None

    def decode_request(self, request):
        data = base64.b64decode(request["image"])
        return to_tensor(decode_image(data, self.limits, resize_side(self.prep)), self.prep)

    @torch.inference_mode()
    def predict(self, x):  # (N, 3, S, S), stacked by LitAPI.batch
        probs = torch.softmax(self.model.forward_features(x).logits.float() / self.temperature, dim=-1)
        if self.stats is not None:
            self.batches, self.images = self.batches + 1, self.images + x.shape[0]
            os.pwrite(self.stats, f"{self.batches} {self.images}".ljust(40).encode(), 0)
        return probs

    def encode_response(self, probs):
        scores, index = probs.topk(min(5, probs.shape[0]))
        predictions = [
            {"label": self.labels[j], "class_index": j, "score": s}
            for j, s in zip(index.tolist(), scores.tolist(), strict=True)
        ]
        return {"object": "classification", "predictions": predictions}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds")
    p.add_argument("--stats", default=None, help="keep '<batches> <images>' in this file")
    args = p.parse_args(argv)
    api = ClassifyAPI(args.model, args.threads, args.stats, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
