"""supmae-serve: the REST API (and the Gradio demo at /demo) over a checkpoint or an export folder.

    supmae-serve                                   # the bundled CIFAR-10 model, http://127.0.0.1:8000
    supmae-serve --model ckpt/ --device cuda --max-batch-size 64 --host 0.0.0.0
    supmae-serve --model export/ --backend onnxruntime --no-demo
    supmae-serve --check                           # load, warm up, print {ready, backend, selection, model, index}
    supmae-serve --no-graph-cache                  # torch on the CPU: build no ONNX Runtime graph

Every flag mirrors a field of `supmae_serve.settings.Settings` (environment `SUPMAE_<NAME>`); flags win over
the environment. Prefer SUPMAE_API_KEYS to --api-keys: flags are visible in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import logging
import os
import sys
import typing
from dataclasses import asdict

from pydantic import ValidationError

from supmae_serve.settings import Settings

EXTRA_FLAGS = ("check",)  # flags that are not settings


def _choices(annotation) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae-serve",
        description="Serve a SupMAE model over REST (+ the Gradio demo at /demo). "
        "Every flag can also be set as the environment variable SUPMAE_<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        is_bool = field.annotation in (bool, bool | None)
        default = (
            "[]"
            if field.default_factory is list
            else "unset"
            if is_bool and field.default is None
            else field.default
        )
        help_text = f"{field.description} (default: {default}; env SUPMAE_{name.upper()})".replace("%", "%%")
        if is_bool:
            p.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            p.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                choices=_choices(field.annotation),
                metavar=None if _choices(field.annotation) else name.upper(),
                help=help_text,
            )
    p.add_argument(
        "--no-graph-cache",
        dest="graph_cache",
        action="store_const",
        const="off",
        default=argparse.SUPPRESS,
        help="build no ONNX Runtime graph from the checkpoint: `auto` serves it through torch on the CPU "
        "(same as --graph-cache off; env SUPMAE_GRAPH_CACHE=off)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="load the model (and the index), warm it up, print {ready, backend, selection, model, index} as JSON "
        "(selection: what `auto` picked and why) and exit (0: servable)",
    )
    return p


def parse_settings(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given), args


async def _check(settings: Settings) -> dict:
    from supmae_serve.api.app import create_app

    app = create_app(settings.model_copy(update={"demo": False}))
    service = app.state.service
    await service.start()
    try:
        return {
            "ready": service.readiness(),
            "backend": asdict(service.backend_info),
            "selection": service.selection,
            "model": service.card.variant,
            "index": app.state.search.describe(),
        }
    finally:
        await service.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        settings, args = parse_settings(argv)
    except ValidationError as e:
        lines = [
            f"  --{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors()
        ]
        print("supmae-serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU build it tries

    from supmae_serve.api.app import create_app
    from supmae_serve.api.search import SearchIndexError
    from supmae_serve.backends.base import BackendError
    from supmae_serve.model import CheckpointError

    try:
        if args.check:
            print(json.dumps(asyncio.run(_check(settings)), indent=2, default=str))
            return 0
        app = create_app(settings)  # fails fast, with the reason, on a missing or unreadable model
    except (BackendError, CheckpointError, FileNotFoundError, SearchIndexError) as e:
        print(f"supmae-serve: error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from supmae_serve.api.limits import HeaderTimeoutProtocol

    common = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        proxy_headers=True,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive,
        http=functools.partial(HeaderTimeoutProtocol, header_timeout_s=settings.header_timeout_s),
    )
    if settings.workers == 1:
        uvicorn.run(app, **common)
    else:
        # each worker process rebuilds the same settings from the environment; uvicorn restarts a worker that
        # does not answer its health ping within timeout_worker_healthcheck (5 s by default), which loading
        # torch and a model can exceed on a busy machine
        os.environ.update(settings.to_env())
        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
            common["timeout_worker_healthcheck"] = 120
        uvicorn.run("supmae_serve.api.app:app_from_env", factory=True, workers=settings.workers, **common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
