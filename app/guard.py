"""The HTTP boundary in front of the mounted Gradio demo: only files uploaded through it, only images, within
the server's limits (issue 11).

Gradio checks that a file an event names was uploaded by a user only when `blocks.has_launched` is set, which
`launch()` does and `mount_gradio_app` does not: a mounted demo would hash `/dev/zero` on the event loop for
ever, classify any image on the server's disk and copy any file into its cache. `mount_demo` sets the flag,
and `DemoGuard` enforces the rule itself, whatever a Gradio version's defaults:

- every JSON body sent to the demo (events, the queue, the HTTP API, whichever route) is read, and each file
  reference in it (an object with a "path" or "url") must name a regular file inside Gradio's upload folder
  (where uploads, the example copies and the demo's outputs live); a URL path or an inline `data:` URL is
  refused too (Gradio would download it, or decode it with every Pillow plugin);
- every multipart body (the upload route) holds at most `max_files` files, each at most the server's
  `max_image_bytes`, each an image of an advertised format within the pixel limits (its header is read
  here, before Gradio writes anything), the whole body at most `max_request_bytes`; the bytes accepted
  within `ttl_s` stay under `quota_bytes` (uploads are deleted after `ttl_s` by Gradio's `delete_cache`);
- `file=<URL>` and `proxy=` requests are refused: the demo never needs Gradio to fetch a URL for a client.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from supmae_serve.preprocess import ImageError, ImageLimits, open_image

BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class UploadPolicy:
    limits: ImageLimits  # per file: bytes, pixels, smallest side
    max_request_bytes: int = 32 * 1024 * 1024  # a whole upload request
    max_files: int = 1  # per upload request: the page uploads one image at a time
    max_json_bytes: int = 1024 * 1024  # an event's JSON body (the page's are a few KB)
    ttl_s: int = 600  # uploads are deleted this long after they arrive
    quota_bytes: int = 256 * 1024 * 1024  # upload bytes accepted within ttl_s


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _file_refs(value: Any) -> Iterator[dict]:
    """Every object in a JSON document that could be a Gradio file reference."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if "path" in v or "url" in v:
                yield v
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


class DemoGuard:
    """Pure ASGI middleware for the requests under `prefix` (the demo's mount path); others pass untouched."""

    def __init__(self, app, prefix: str, policy: UploadPolicy, upload_dir: str | Path):
        self.app = app
        self.prefix = prefix.rstrip("/")
        self.policy = policy
        self.upload_dir = Path(upload_dir).resolve()
        self._accepted: deque[tuple[float, int]] = deque()  # (time, bytes) of recent uploads

    def _ours(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._ours(scope.get("path", "")):
            return await self.app(scope, receive, send)
        try:
            self._check_route(unquote(scope["path"][len(self.prefix) :]))
            if scope["method"] not in BODY_METHODS:
                return await self.app(scope, receive, send)
            headers = Headers(scope=scope)
            multipart = headers.get("content-type", "").lower().startswith("multipart/form-data")
            limit = self.policy.max_request_bytes if multipart else self.policy.max_json_bytes
            body = await self._read(headers, receive, limit)
            if multipart:
                await self._check_upload(headers, body)
            elif body.strip():
                self._check_json(body)
        except Refused as e:
            return await self._refuse(send, e)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_route(path: str) -> None:
        for marker in ("/file=", "/proxy="):
            target = path.partition(marker)[2]
            if marker in path and (marker == "/proxy=" or "://" in target or target.startswith("//")):
                raise Refused(403, "url_not_served", "the demo does not fetch URLs for clients")

    @staticmethod
    async def _read(headers: Headers, receive, limit: int) -> bytes:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise Refused(
                413, "request_too_large", f"request body is {length} bytes; the limit is {limit} bytes"
            )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "client_disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_json(self, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise Refused(400, "invalid_json", "the demo's request bodies are JSON documents") from e
        for ref in _file_refs(doc):
            path, url = ref.get("path"), ref.get("url")
            if isinstance(url, str) and url.lstrip()[:5].lower() == "data:":
                raise Refused(
                    403, "file_not_uploaded", "inline data: URLs are not accepted; upload the image"
                )
            if path is None and "path" not in ref:
                continue
            if not isinstance(path, str) or not self._uploaded(path):
                raise Refused(
                    403,
                    "file_not_uploaded",
                    "the demo only reads files uploaded to it (POST <demo>/gradio_api/upload)",
                )

    def _uploaded(self, path: str) -> bool:
        """A file inside Gradio's upload folder (after resolving links and '..'), nothing else."""
        if "://" in path or path.startswith("//"):
            return False
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return False
        return resolved.is_relative_to(self.upload_dir) and (not resolved.exists() or resolved.is_file())

    async def _check_upload(self, headers: Headers, body: bytes) -> None:
        p = self.policy

        async def stream():
            yield body

        parser = MultiPartParser(headers, stream(), max_files=p.max_files, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            if "files" in str(e).lower():
                raise Refused(413, "too_many_files", f"at most {p.max_files} file(s) per upload") from e
            raise Refused(400, "invalid_multipart", f"malformed multipart body: {e}") from e
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            for f in files:
                data = await f.read()  # at most max_request_bytes: the body was read within that
                try:
                    open_image(data, p.limits)  # header only: format, bytes, pixels, smallest side
                except ImageError as e:
                    raise Refused(e.status, e.code, f"{f.filename or 'upload'}: {e}") from e
        finally:
            await form.close()
        now = time.monotonic()
        while self._accepted and self._accepted[0][0] < now - p.ttl_s:
            self._accepted.popleft()
        held = sum(n for _, n in self._accepted)
        if held + len(body) > p.quota_bytes:
            raise Refused(
                429,
                "upload_quota",
                f"the demo holds {held} bytes of uploads from the last {p.ttl_s} s; the limit is "
                f"{p.quota_bytes} bytes: try again later",
            )
        self._accepted.append((now, len(body)))

    @staticmethod
    async def _refuse(send, e: Refused) -> None:
        # plain text: the page shows an upload error as "HTTP <status>: <text>"
        body = f"{e.message} ({e.code})".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if e.status == 429:
            headers.append((b"retry-after", b"60"))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
