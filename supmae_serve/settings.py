"""The one settings object of the service: environment variables `SUPMAE_*`, mirrored by `supmae-serve` flags.

Read once at the entry point (the CLI, or `create_app()` when it is given none) and passed inward as typed
values: the backend gets a `BackendConfig`, the batcher a `BatchConfig`, the decoder an `ImageLimits`.
Lists (`api_keys`, `cors_origins`) are comma-separated in the environment and on the command line.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The bundled default model: a ViT-T/4 SupMAE trained on CIFAR-10, stored as fp16 (model.json + model.safetensors).
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "cifar10_vit_tiny"

# 4096 x 4096: ten times the side of the largest model input (384 px) and more than a 12 MP photo; decoding
# such an image peaks at about 5 bytes per pixel at most (81 MiB), see docs/deployment.md "Security"
DEFAULT_MAX_PIXELS = 4096 * 4096
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "fake")
GRAPH_CACHE_OFF = ("off", "false", "no", "none", "0")


def default_graph_cache() -> Path:
    """$XDG_CACHE_HOME/supmae/graphs, else ~/.cache/supmae/graphs (the per-user cache of built graphs)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "supmae" / "graphs"


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of `supmae-serve`. Environment: `SUPMAE_<NAME>`; command line: `--<name-with-dashes>`."""

    # hide_input_in_errors: a validation error must never print the API keys it was given
    model_config = SettingsConfigDict(
        env_prefix="SUPMAE_", extra="ignore", validate_default=True, hide_input_in_errors=True
    )

    # --- model and backend
    model: Path = Field(
        DEFAULT_MODEL,
        description="checkpoint folder (model.safetensors + model.json) or a supmae-export folder "
        "(manifest.json + model.json + *.onnx / *.plan); default: the bundled CIFAR-10 ViT-T/4",
    )
    export_dir: Path | None = Field(
        None,
        description="supmae-export folder for the onnxruntime/tensorrt backends when --model is a checkpoint",
    )
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt", "fake"] = Field(
        "auto",
        description="auto picks the fastest available: tensorrt engine > onnxruntime on CUDA/TensorRT > "
        "torch on CUDA > onnxruntime on CPU (an export folder, or the graph built from the checkpoint and cached: "
        "--graph-cache) > torch on CPU",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto",
        description="auto: fp16 on a GPU; on the CPU bf16 where the CPU has AMX and bf16 agrees with fp32 "
        "(top-1, >= 99.5%), else fp32; int8: an int8 ONNX export, or the static INT8 graph built from the "
        "checkpoint when its top-1 agreement with fp32 is >= 99% (refused otherwise)",
    )
    graph_cache: str | None = Field(
        None,
        description="where the ONNX Runtime graphs built from a checkpoint are cached (CPU, backend auto, no "
        "export folder); unset: $XDG_CACHE_HOME/supmae/graphs or ~/.cache/supmae/graphs; 'off' (or "
        "--no-graph-cache): build nothing, serve the checkpoint through torch",
    )
    calib_data: Path | None = Field(
        None,
        description="image folder (flat or <class>/<image>) to verify and calibrate the graphs built from the "
        "checkpoint (needed by --precision int8 unless the checkpoint folder ships a calib/ folder)",
    )
    compile: bool = Field(False, description="torch backend: torch.compile the model (slower start)")
    threads: int = Field(0, ge=0, description="intra-op threads for torch / onnxruntime (0: library default)")
    warmup: bool = Field(True, description="run each batch size once before reporting ready")

    # --- dynamic batching
    batching: bool = Field(
        True, description="merge concurrent requests into batches (off: one image at a time)"
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per model call")
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="how long the oldest queued image waits at most for a batch to fill "
        "(only while more images are being decoded)",
    )
    max_queue: int = Field(256, ge=1, description="images waiting at most; beyond it requests get 429")
    request_timeout_s: float = Field(
        30.0, gt=0, description="per-request deadline (URL fetching, decoding, queue, inference) -> 504"
    )
    decode_threads: int = Field(4, ge=1, le=256, description="threads that decode images off the event loop")
    inference_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="batches run at once, each on its own thread (torch and onnxruntime backends; others run "
        "one); pair with --threads so workers x threads = cores, e.g. 2 workers x 1 thread on 2 cores",
    )
    gpu_decode: bool = Field(True, description="decode JPEGs on the GPU (nvjpeg) when serving on CUDA")

    # --- similarity search (/v1/search; supmae_serve/api/search.py)
    index: str = Field(
        "auto",
        description="FAISS index folder for /v1/search (built by `supmae-embed index`); auto: the shipped "
        "CIFAR-10 gallery when serving the bundled model, none for any other model; none: no index",
    )
    max_top_k: int = Field(100, ge=1, le=1000, description="largest /v1/search top_k -> 422")
    search_threads: int = Field(
        2, ge=1, le=64, description="threads that run FAISS searches off the event loop"
    )

    # --- input limits
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="body size limit -> 413")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=64, description="encoded size limit per image -> 413")
    max_images_per_request: int = Field(64, ge=1, description="images in one request at most -> 413")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=64,
        description="width x height limit, checked from the header before decoding (decompression bombs) -> 413",
    )
    min_side: int = Field(8, ge=1, description="smallest allowed image side -> 422")
    max_upscale: int = Field(8, ge=1, le=64, description="largest reconstruct `upscale` factor")

    # --- security
    api_keys: CommaList = Field(
        default_factory=list,
        repr=False,
        description="comma-separated Bearer tokens (visible ASCII); empty: no authentication. /healthz, /readyz, "
        "/metrics, /docs and /openapi.json stay public; the demo is not mounted",
    )
    cors_origins: CommaList = Field(
        default_factory=list, description="comma-separated allowed CORS origins ('*' for any)"
    )
    allow_url_fetch: bool = Field(
        False, description="accept {'url': ...} inputs and fetch them (SSRF risk: off by default)"
    )
    url_fetch_allow_private: bool = Field(
        False, description="let URL fetching reach loopback/private/link-local addresses (off: blocked)"
    )
    url_fetch_timeout_s: float = Field(
        5.0, gt=0, description="deadline of one whole URL fetch (connecting, redirects, headers, body)"
    )
    url_fetch_threads: int = Field(
        8, ge=1, le=256, description="threads that fetch URLs (their own pool: slow URLs never hold decoding)"
    )

    # --- server
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 inside containers)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(
        1, ge=1, description="uvicorn worker processes (each loads the model and batches alone)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )
    shutdown_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown: time to drain the queue")
    # --- what one client can hold (supmae_serve/api/limits.py; a reverse proxy should add its own)
    limit_concurrency: int = Field(
        256, ge=1, description="connections + requests in progress at most; beyond it uvicorn answers 503"
    )
    timeout_keep_alive: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send its request head within this -> closed"
    )
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this -> 408")
    max_bytes_in_flight: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="request body bytes being received or held at once, reserved from Content-Length "
        "before reading -> 503",
    )
    demo: bool | None = Field(
        None,
        description="mount the Gradio demo at /demo (needs pip install 'supmae[demo]'); unset: only when --host "
        "is a loopback address (a demo on a public address is opt-in: --demo)",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        # an HTTP header carries only visible ASCII: any other character makes a key that can never match
        for i, key in enumerate(keys, 1):
            if not all("!" <= c <= "~" for c in key):
                raise ValueError(
                    f"API key {i} of {len(keys)} has a character that is not visible ASCII (non-ASCII, a space "
                    "or a control character), so no Authorization header can carry it; use letters, digits "
                    "and punctuation, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return keys

    @field_validator("graph_cache", mode="before")
    @classmethod
    def _graph_cache_off(cls, v):
        if v is False or (isinstance(v, str) and v.strip().lower() in GRAPH_CACHE_OFF):
            return "off"
        if v is None or v is True or (isinstance(v, str) and not v.strip()):
            return None
        return str(v)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) cannot exceed max_queue ({self.max_queue}): "
                "such a request could never be queued"
            )
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError(
                f"max_image_bytes ({self.max_image_bytes}) cannot exceed max_request_bytes ({self.max_request_bytes})"
            )
        if self.max_request_bytes > self.max_bytes_in_flight:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) cannot exceed max_bytes_in_flight "
                f"({self.max_bytes_in_flight}): a request of the largest size could never be received"
            )
        return self

    def demo_on(self) -> bool:
        """Whether to mount the demo: as set, else only on a loopback address. The demo is as open as the API
        without keys, but it is a larger surface (Gradio's routes, uploads kept on disk for a while), so a
        server reachable from other machines gets it only when asked (docs/deployment.md, "Security")."""
        if self.demo is not None:
            return self.demo
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    # ------------------------------------------------------------------ typed views passed inward
    # (imports inside: reading settings must not load torch, so `supmae-serve --help` and uvicorn's worker
    # bootstrap stay fast)
    def image_limits(self):
        from supmae_serve.preprocess import ImageLimits

        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_pixels, min_side=self.min_side)

    def batch_config(self):
        from supmae_serve.batching import BatchConfig

        if not self.batching:
            return BatchConfig(
                max_batch_size=1,
                max_wait_ms=0.0,
                max_queue=self.max_queue,
                timeout_s=self.request_timeout_s,
                workers=self.inference_workers,
            )
        return BatchConfig(
            max_batch_size=self.max_batch_size,
            max_wait_ms=self.max_wait_ms,
            max_queue=self.max_queue,
            timeout_s=self.request_timeout_s,
            workers=self.inference_workers,
        )

    def graph_cache_dir(self) -> Path | None:
        """The graph cache folder, or None when it is off."""
        if self.graph_cache == "off":
            return None
        if self.graph_cache:
            return Path(self.graph_cache).expanduser()
        return default_graph_cache()

    def backend_config(self):
        from supmae_serve.backends.registry import BackendConfig

        return BackendConfig(
            model=self.model,
            export_dir=self.export_dir,
            backend=self.backend,
            device=self.device,
            precision=self.precision,
            compile=self.compile,
            threads=self.threads,
            max_batch_size=self.max_batch_size if self.batching else 1,
            graph_cache=self.graph_cache_dir(),
            calib_data=self.calib_data,
        )

    def to_env(self) -> dict[str, str]:
        """`SUPMAE_*` variables that rebuild these settings in another process (uvicorn workers)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"SUPMAE_{name.upper()}"] = str(value)
        return env

    def public_dict(self) -> dict:
        """The settings without secrets (for /v1/info and logs)."""
        d = self.model_dump(mode="json", exclude={"api_keys"})
        d["api_keys"] = f"{len(self.api_keys)} configured" if self.api_keys else "none (authentication off)"
        return d
