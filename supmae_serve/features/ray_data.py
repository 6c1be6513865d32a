"""Embeddings on a Ray cluster: a callable class for Ray Data's `map_batches`.

```python
import ray
from supmae_serve.features.ray_data import EmbedImages

ds = ray.data.read_binary_files("/data/images/", include_paths=True)     # columns: bytes, path
ds = ds.map_batches(
    EmbedImages,
    fn_constructor_kwargs={"model": "runs/c10/final"},   # a checkpoint (or export) folder every worker can read
    batch_size=256,
    concurrency=4,                                       # 4 actors, each loads the model once
    num_gpus=1,                                          # per actor; leave out on CPU clusters
)
ds.write_parquet("/data/embeddings/")                    # columns: path, embedding, error
```

Each actor creates one `Backend` (torch, onnxruntime or tensorrt, as `supmae-embed` would, bf16 for torch on
a GPU) and turns a batch into embeddings: bytes are decoded exactly as the server decodes them
(`supmae_serve.preprocess`), so the vectors equal `/v1/embed`'s for the same backend. A batch may instead
carry decoded RGB arrays in an `image` column (`ray.data.read_images(..., mode="RGB")`); Ray decoded those,
without the server's checks (EXIF orientation, size limits), so prefer bytes. A bad image fails only its own
row: its `embedding` is NaN and its `error` says why (`""` for good rows). Other columns pass through.

Ray is needed only to run the pipeline (`pip install 'supmae[cluster]'`); this class itself imports nothing
from Ray, and `embed_with_ray` imports it lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from supmae_serve.backends import BackendConfig, create_backend
from supmae_serve.common.optional import require
from supmae_serve.preprocess import ImageLimits, normalize, resize_crop

from .bulk import decode_crop, for_this_process
from .featureset import l2_normalize

INPUT_COLUMNS = ("bytes", "image")


def import_ray():
    require("ray.data", "Ray Data pipelines")  # the submodule is what we use
    import ray

    return ray


class EmbedImages:
    """Ray Data `map_batches` callable: a batch with `bytes` (encoded images) or `image` (RGB arrays) in, the
    same batch with `embedding` (N, D) float32 and `error` (N,) out (see the module docstring)."""

    def __init__(
        self,
        model: str | Path,
        *,
        export_dir: str | Path | None = None,
        backend: str = "auto",
        device: str = "auto",
        precision: str = "auto",
        threads: int = 0,
        pooling: str = "avg",
        normalize: bool = True,
        limits: ImageLimits = ImageLimits(),
        keep_input: bool = False,
    ):
        bc = BackendConfig(
            model=Path(model),
            export_dir=Path(export_dir) if export_dir else None,
            backend=backend,
            device=device,
            precision=precision,
            threads=threads,
        )
        self.backend = create_backend(for_this_process(bc))
        self.info = self.backend.info()
        self.prep = self.backend.card.preprocessing
        self.dim = int(self.backend.card.config.embed_dim)
        self.pooling, self.normalize, self.limits, self.keep_input = pooling, normalize, limits, keep_input
        self.device = torch.device(self.info.device) if self.info.name == "torch" else torch.device("cpu")

    def _crop_array(self, arr: Any) -> tuple[np.ndarray | None, str]:
        a = np.asarray(arr)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            return None, f"an image array must be uint8 (H, W, 3) RGB, got {a.dtype} {a.shape}"
        return np.asarray(resize_crop(Image.fromarray(a, "RGB"), self.prep), dtype=np.uint8), ""

    def _crop_bytes(self, data: Any) -> tuple[np.ndarray | None, str]:
        crop, err = decode_crop(lambda: bytes(data), self.prep, self.limits)
        return crop, "" if err is None else f"{err[0]}: {err[1]}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        column = next((c for c in INPUT_COLUMNS if c in batch), None)
        if column is None:
            raise ValueError(
                f"EmbedImages needs a 'bytes' column (encoded images, e.g. ray.data.read_binary_files) or an "
                f"'image' column (RGB arrays, ray.data.read_images(mode='RGB')); the batch has {sorted(batch)}"
            )
        crop = self._crop_bytes if column == "bytes" else self._crop_array
        results = [crop(v) for v in batch[column]]
        n = len(results)
        emb = np.full((n, self.dim), np.nan, dtype=np.float32)
        errors = np.array([e for _, e in results], dtype=object)
        good = [i for i, (c, _) in enumerate(results) if c is not None]
        if good:
            x = torch.from_numpy(np.stack([results[i][0] for i in good])).permute(0, 3, 1, 2)  # (n, 3, S, S)
            out = self.backend.embed(
                normalize(x.to(self.device), self.prep), self.pooling
            ).embedding  # (n, D)
            emb[good] = l2_normalize(out) if self.normalize else out
        result = {k: v for k, v in batch.items() if self.keep_input or k != column}
        result["embedding"] = emb
        result["error"] = errors
        return result


def embed_with_ray(
    paths: str | list[str],
    model: str | Path,
    *,
    batch_size: int = 256,
    concurrency: int = 1,
    num_gpus: float = 0,
    **kwargs: Any,
):
    """`read_binary_files(paths) -> map_batches(EmbedImages)`: a lazy Ray Dataset with columns path,
    embedding, error. `kwargs` go to `EmbedImages`."""
    ray = import_ray()
    ds = ray.data.read_binary_files(paths, include_paths=True)
    extra = {"num_gpus": num_gpus} if num_gpus else {}
    return ds.map_batches(
        EmbedImages,
        fn_constructor_kwargs={"model": str(model), **kwargs},
        batch_size=batch_size,
        concurrency=concurrency,
        **extra,
    )
