"""`python -m app --checkpoint PATH [--host 127.0.0.1] [--port 7860]`: the Gradio demo on its own.

A thin wrapper: the backend comes from the serving registry (`supmae_serve.backends.create_backend`,
the same `auto` rule as `supmae-serve`), the page from `app.demo.create_demo_app`. `supmae-serve`
mounts the same page at /demo next to the REST API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app", description="Serve the SupMAE Gradio demo alone.")
    p.add_argument(
        "--checkpoint",
        "--model",
        required=True,
        help="checkpoint folder (model.safetensors + model.json) or a supmae-export folder",
    )
    p.add_argument(
        "--backend", default="auto", help="auto | torch | onnxruntime | tensorrt (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument(
        "--precision", default="auto", help="auto | fp32 | fp16 | bf16 | int8 (default: %(default)s)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--path", default="/demo", help="URL path of the demo (default: %(default)s)")
    p.add_argument("--examples", default=None, help="folder of example images (default: the bundled ones)")
    p.add_argument(
        "--index",
        default="auto",
        help="index for the Similar images tab: a folder built by `supmae-embed index`, auto (the shipped "
        "gallery for the bundled model) or none (default: %(default)s)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from supmae_serve.backends import BackendConfig, BackendError, create_backend
    from supmae_serve.features.gallery import load_served_index, resolve_index_spec
    from supmae_serve.model.checkpoint import CheckpointError

    try:
        from .demo import create_demo_app

        cfg = BackendConfig(
            model=Path(args.checkpoint), backend=args.backend, device=args.device, precision=args.precision
        )
        backend = create_backend(cfg)
        backend.warmup()
        index_dir = resolve_index_spec(args.index, args.checkpoint)
        index = load_served_index(index_dir, backend.card, args.checkpoint) if index_dir else None
        app = create_demo_app(backend, path=args.path, examples_dir=args.examples, index=index)
    except (BackendError, CheckpointError, ImportError, ValueError) as e:
        print(f"python -m app: {e}", file=sys.stderr)
        return 2
    import functools

    import uvicorn

    from supmae_serve.api.limits import HeaderTimeoutProtocol
    from supmae_serve.settings import Settings

    print(f"SupMAE demo on http://{args.host}:{args.port}{args.path.rstrip('/')}/", file=sys.stderr)
    s = Settings.model_fields  # the connection limits of supmae-serve's defaults
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        limit_concurrency=s["limit_concurrency"].default,
        timeout_keep_alive=s["timeout_keep_alive"].default,
        http=functools.partial(HeaderTimeoutProtocol, header_timeout_s=s["header_timeout_s"].default),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
