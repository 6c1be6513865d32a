"""Reading images out of a request, in the three forms the API takes, under the request limits.

- `multipart/form-data`: every file part is an image (any field name, several allowed), other fields are options;
- `application/json`: `{"images": [...]}` (or `"image": ...`) where each item is base64, a data URI
  (`data:image/png;base64,...`), `{"data": base64}` or `{"url": ...}`; other keys are options;
- a raw body with `Content-Type: image/*` (or `application/octet-stream`): one image; options in the query.

A problem with the request as a whole (too big, too many images, wrong content type, malformed JSON) is an
`ApiError`; a problem with one image becomes that item's `ImageError` and the others carry on.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from supmae_serve.preprocess import ImageError

from .errors import ApiError

ACCEPTED = "multipart/form-data (image files), application/json (base64 or data URIs) or an image/* body"
IMAGE_KEYS = ("images", "image")
# base64 in either alphabet (RFC 4648 standard, or URL-safe), never a mix, padding optional
_BASE64 = {
    b"+/": re.compile(r"[A-Za-z0-9+/]*={0,2}"),
    b"-_": re.compile(r"[A-Za-z0-9_-]*={0,2}"),
}


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_images: int = 64


@dataclass
class RawImage:
    data: bytes | None = None
    url: str | None = None
    error: ImageError | None = None
    name: str | None = None  # file name or source, for messages


@dataclass
class ParsedRequest:
    items: list[RawImage]
    options: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 as soon as it is known to exceed `limit` (Content-Length or streamed)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(
            413,
            "request_too_large",
            f"request body is {length} bytes; the limit is {limit} bytes per request",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, "request_too_large", f"request body exceeds the limit of {limit} bytes per request"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def too_many_images(n: int, limits: RequestLimits) -> ApiError:
    """413 for a request of `n` images, over the per-request limit."""
    return ApiError(
        413, "too_many_images", f"request has {n} images; the limit is {limits.max_images} images per request"
    )


def decode_base64(text: str, limits: RequestLimits, name: str) -> RawImage:
    """base64 or a data URI -> bytes, checking the size before decoding anything."""
    media = None
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            return RawImage(
                name=name,
                error=ImageError(
                    "a data URI must be data:<image type>;base64,<data>", 422, "invalid_data_uri"
                ),
            )
        media = head[5:].split(";", 1)[0].strip().lower()
        if media and not (media.startswith("image/") or media == "application/octet-stream"):
            return RawImage(
                name=name,
                error=ImageError(
                    f"data URI media type {media!r} is not an image (image/*)", 415, "unsupported_media_type"
                ),
            )
    text = "".join(text.split())  # line breaks and spaces are common in pasted base64
    if len(text) // 4 * 3 > limits.max_image_bytes:
        return RawImage(
            name=name,
            error=ImageError(
                f"base64 image decodes to about {len(text) // 4 * 3} bytes; the limit is {limits.max_image_bytes} bytes per image",
                413,
                "image_too_large",
            ),
        )
    data = _b64decode(text)
    if data is None:
        return RawImage(
            name=name,
            error=ImageError(
                "not valid base64: use the standard (A-Z a-z 0-9 + /) or the URL-safe (A-Z a-z 0-9 - _) "
                "alphabet, optionally padded with '=', or a data URI (data:image/png;base64,...)",
                422,
                "invalid_base64",
            ),
        )
    return RawImage(data=data, name=name)


def _b64decode(text: str) -> bytes | None:
    """Strict base64 of either alphabet -> bytes; None when `text` is not base64 (a character outside the
    alphabet, both alphabets mixed, or a length no encoder produces). Nothing is silently dropped."""
    for altchars, pattern in _BASE64.items():
        if pattern.fullmatch(text):
            body = text.rstrip("=")
            if len(body) % 4 == 1:
                return None
            try:
                return base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars, validate=True)
            except (binascii.Error, ValueError):
                return None
    return None


def _json_item(value: Any, index: int, limits: RequestLimits) -> RawImage:
    name = f"images[{index}]"
    if isinstance(value, dict):
        if isinstance(value.get("url"), str):
            return RawImage(url=value["url"], name=name)
        for key in ("data", "base64", "b64"):
            if isinstance(value.get(key), str):
                return decode_base64(value[key], limits, name)
        return RawImage(
            name=name, error=ImageError("an image object needs 'data' (base64) or 'url'", 422, "invalid_item")
        )
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            return RawImage(url=value, name=name)
        return decode_base64(value, limits, name)
    return RawImage(
        name=name,
        error=ImageError(
            f"an image must be a base64 string, a data URI or an object, not {type(value).__name__}",
            422,
            "invalid_item",
        ),
    )


# JSON bodies above this are parsed (json.loads, base64) on a worker thread: a call holds the GIL for its whole
# run, and a 32 MB body would stall the event loop, and so every other request, for tens of milliseconds;
# below it the thread hop costs more than the parse
PARSE_OFF_LOOP_BYTES = 64 * 1024


async def parse_request(
    request: Request, limits: RequestLimits, run_blocking: Callable[..., Awaitable[Any]] | None = None
) -> ParsedRequest:
    """The request's images and options; `run_blocking(fn, *args)` (the service's decode pool) takes the
    parsing of large JSON bodies off the event loop."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await _parse_multipart(request, limits)
    if media == "application/json" or media.endswith("+json"):
        body = await read_body(request, limits.max_request_bytes)
        if run_blocking is not None and len(body) > PARSE_OFF_LOOP_BYTES:
            return await run_blocking(_parse_json, body, limits)
        return _parse_json(body, limits)
    if media.startswith("image/") or media == "application/octet-stream":
        body = await read_body(request, limits.max_request_bytes)
        return ParsedRequest([RawImage(data=body, name="body")])
    raise ApiError(
        415, "unsupported_media_type", f"content type {media or '(none)'!r} is not accepted; send {ACCEPTED}"
    )


def load_json(body: bytes) -> Any:
    """A JSON body -> the document, or ApiError 422 `invalid_json` saying why not."""
    try:
        return json.loads(body)
    except RecursionError as e:
        raise ApiError(422, "invalid_json", "request body is not valid JSON (nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ApiError(422, "invalid_json", f"request body is not valid JSON ({e})") from e


def _parse_json(body: bytes, limits: RequestLimits) -> ParsedRequest:
    return images_from_json(load_json(body), limits)


def images_from_json(doc: Any, limits: RequestLimits) -> ParsedRequest:
    """A JSON document -> its images (`images`/`image`, or a bare list) and the other keys as options."""
    if isinstance(doc, list):
        doc = {"images": doc}
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_json", 'expected a JSON object like {"images": ["<base64>", ...]}')
    if "images" in doc:
        raw = doc.pop("images")
        doc.pop("image", None)
        values = raw if isinstance(raw, list) else [raw]
    elif "image" in doc:
        values = [doc.pop("image")]
    else:
        raise ApiError(
            422, "no_images", 'no images in the request: give "images": [<base64 or data URI>, ...]'
        )
    if len(values) > limits.max_images:
        raise too_many_images(len(values), limits)
    return ParsedRequest([_json_item(v, i, limits) for i, v in enumerate(values)], options=doc)


async def _parse_multipart(request: Request, limits: RequestLimits) -> ParsedRequest:
    body = await read_body(request, limits.max_request_bytes)

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=limits.max_images, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "files" in str(e).lower():
            raise too_many_images(limits.max_images + 1, limits) from e
        raise ApiError(422, "invalid_multipart", f"malformed multipart body: {e}") from e
    items, options = [], {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(limits.max_image_bytes + 1)
                name = value.filename or key
                if len(data) > limits.max_image_bytes:
                    err = ImageError(
                        f"file {name!r} is over the limit of {limits.max_image_bytes} bytes per image",
                        413,
                        "image_too_large",
                    )
                    items.append(RawImage(name=name, error=err))
                else:
                    items.append(RawImage(data=data, name=name))
            else:
                options[key] = value
    finally:
        await form.close()
    return ParsedRequest(items, options)
