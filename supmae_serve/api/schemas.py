"""Request options and response shapes (pydantic: validation and the OpenAPI docs at /docs).

Options come from the query string, multipart form fields or JSON body keys (the body wins); unknown
options are refused so that a typo never silently does nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedOptions(_Options):
    normalize: bool = Field(
        True, description="L2-normalise each embedding (each patch token for pooling=patch)"
    )
    pooling: Literal["avg", "cls", "patch"] = Field(
        "avg",
        description="avg: mean of the patch tokens; cls: the cls token; patch: every patch token (L x D)",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes, base64-encoded"
    )


class ClassifyOptions(_Options):
    top_k: int = Field(5, ge=1, le=100_000, description="how many classes to return per image, best first")


class ReconstructOptions(_Options):
    mask_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="fraction of patches removed (default: the model's training ratio)"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="the mask is a function of the seed alone")
    upscale: int = Field(
        1, ge=1, description="enlarge the returned PNGs by this factor (nearest), for display"
    )


class ItemError(BaseModel):
    status: int = Field(description="the HTTP status this image alone would get: 413, 415 or 422")
    code: str = Field(description="machine-readable reason, e.g. unsupported_format, too_many_pixels")
    message: str


class FailedItem(BaseModel):
    index: int
    error: ItemError


class Usage(BaseModel):
    images: int
    succeeded: int
    failed: int


class EmbeddingItem(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | list[list[float]] | str = Field(
        description="(D,) or (L, D) floats, or base64 of little-endian float32 when encoding_format=base64"
    )
    shape: list[int]


class ListResponse(BaseModel):
    """What every image route answers: a list (OpenAI's envelope) of per-image items, for the named model."""

    object: Literal["list"] = "list"
    model: str


class EmbedResponse(ListResponse):
    pooling: str
    normalized: bool
    encoding_format: str
    data: list[EmbeddingItem | FailedItem]
    usage: Usage


class Prediction(BaseModel):
    label: str
    class_index: int
    score: float = Field(description="softmax probability")


class ClassificationItem(BaseModel):
    index: int
    object: Literal["classification"] = "classification"
    predictions: list[Prediction]


class ClassifyResponse(ListResponse):
    data: list[ClassificationItem | FailedItem]
    usage: Usage


class ReconstructionImages(BaseModel):
    original: str = Field(description="the model input (resized and cropped), base64 PNG")
    masked: str = Field(description="the visible patches only, base64 PNG")
    reconstruction: str = Field(description="the decoder's prediction for every patch, base64 PNG")
    reconstruction_visible: str = Field(
        description="the prediction with the visible patches pasted back, base64 PNG"
    )


class ReconstructionItem(BaseModel):
    index: int
    object: Literal["reconstruction"] = "reconstruction"
    mask_ratio: float
    seed: int
    grid: list[int] = Field(description="patch grid (rows, columns)")
    visible_patches: int
    mask: list[int] = Field(description="per patch, row-major: 0 visible, 1 removed")
    media_type: Literal["image/png"] = "image/png"
    images: ReconstructionImages


class ReconstructResponse(ListResponse):
    data: list[ReconstructionItem | FailedItem]
    usage: Usage


class ErrorResponse(BaseModel):
    error: dict[str, Any] = Field(description="{status, code, message}")


def openapi_extra(options: type[BaseModel]) -> dict:
    """OpenAPI for a route that parses its own body: the options as query parameters and the three body forms."""
    schema = options.model_json_schema()
    params = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": prop,
            "description": prop.get("description", ""),
        }
        for name, prop in schema.get("properties", {}).items()
    ]
    binary = {"type": "string", "format": "binary"}
    return {
        "parameters": params,
        "requestBody": {
            "required": True,
            "description": "images as multipart files (several allowed), a raw image/* body, or JSON with base64 / data URIs; "
            "options may also be form fields or JSON keys",
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"files": {"type": "array", "items": binary}}}
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {
                                    "type": "string",
                                    "description": "base64 or data:image/...;base64,...",
                                },
                            },
                            **schema.get("properties", {}),
                        },
                        "required": ["images"],
                    }
                },
                "image/*": {"schema": binary},
            },
        },
    }
