"""Which model made a vector: the identity a feature set and an index record, and the check against a model.

A vector means something only next to the model that made it: the same weights, the same preprocessing,
the same pooling and normalisation. A feature set and an index store that identity; whoever loads one
(`supmae-embed index --add`, `supmae-embed search`, the server's `--index`) compares it with the model in
hand and refuses, saying exactly what differs, when they disagree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supmae_serve.common.files import sha256_file

if TYPE_CHECKING:  # the model package imports torch and timm: not needed to read or compare identities
    from supmae_serve.model.checkpoint import ModelCard

EXPORT_MANIFEST = "manifest.json"  # a supmae-export folder's manifest (backends.graph.MANIFEST_NAME)


class IdentityError(ValueError):
    """A feature set or index that does not belong to the model it is used with; the message lists what differs."""


@dataclass(frozen=True)
class ModelIdentity:
    """The facts that decide whether two vectors are comparable. `weights_sha256` is the sha256 of the
    checkpoint's model.safetensors (an export folder records its checkpoint's in its manifest)."""

    weights_sha256: str | None
    pooling: str  # "avg" | "cls"
    normalized: bool  # L2-normalised vectors
    dim: int
    preprocessing: dict[str, Any] = field(default_factory=dict)  # the card's image size, mean, std, ...
    variant: str | None = None  # informative: not compared
    framework: str = ""  # informative: not compared

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["preprocessing"] = _plain(d.get("preprocessing") or {})
        return cls(**d)

    def with_normalized(self, normalized: bool) -> ModelIdentity:
        return ModelIdentity(**{**asdict(self), "normalized": normalized})


def _plain(x: Any) -> Any:
    """JSON round trip, so tuples in a card compare equal to the lists read back from a manifest."""
    return json.loads(json.dumps(x))


def weights_digest(model: str | Path, export_dir: str | Path | None = None) -> str | None:
    """sha256 of the weights behind a model path: a checkpoint folder's model.safetensors, a .safetensors file,
    or, for a supmae-export folder, the checkpoint digest its manifest recorded. None when there is none."""
    from supmae_serve.model.checkpoint import CARD_NAME, WEIGHTS_NAME

    p = Path(model)
    if p.is_dir() and (p / WEIGHTS_NAME).is_file():
        return sha256_file(p / WEIGHTS_NAME)
    if p.is_file() and p.suffix == ".safetensors":
        return sha256_file(p)
    if p.is_file() and p.name == CARD_NAME and (p.parent / WEIGHTS_NAME).is_file():
        return sha256_file(p.parent / WEIGHTS_NAME)
    for folder in (Path(export_dir) if export_dir else None, p if p.is_dir() else None):
        manifest = folder / EXPORT_MANIFEST if folder else None
        if manifest is not None and manifest.is_file():
            try:
                source = json.loads(manifest.read_text()).get("source") or {}
            except (json.JSONDecodeError, AttributeError):
                continue
            if source.get("weights_sha256"):
                return str(source["weights_sha256"])
    return None


def model_identity(
    card: ModelCard,
    model: str | Path,
    *,
    pooling: str = "avg",
    normalized: bool = True,
    export_dir: str | Path | None = None,
    digest: str | None = None,
) -> ModelIdentity:
    """The identity of the vectors `model` (a checkpoint or export folder with this card) gives for a pooling."""
    if pooling not in ("avg", "cls"):
        raise ValueError(
            f"feature sets hold one vector per image: pooling must be avg or cls, got {pooling!r}"
        )
    return ModelIdentity(
        weights_sha256=digest if digest is not None else weights_digest(model, export_dir),
        pooling=pooling,
        normalized=bool(normalized),
        dim=int(card.config.embed_dim),
        preprocessing=_plain(asdict(card.preprocessing)),
        variant=card.variant,
        framework=card.framework,
    )


def _short(digest: str | None) -> str:
    return "none recorded" if not digest else digest[:12]


def compare_identity(
    expected: ModelIdentity, actual: ModelIdentity, what: str = "index", other: str = "model"
) -> list[str]:
    """Every difference that makes `expected`'s vectors incomparable with `actual`'s, one readable line each
    (empty when they match). A missing weights digest on either side is a difference: it cannot be checked."""
    diffs = []
    if (
        not expected.weights_sha256
        or not actual.weights_sha256
        or expected.weights_sha256 != actual.weights_sha256
    ):
        diffs.append(
            f"weights digest (sha256 of model.safetensors): {what} {_short(expected.weights_sha256)} vs "
            f"{other} {_short(actual.weights_sha256)}"
        )
    if expected.pooling != actual.pooling:
        diffs.append(f"pooling: {what} {expected.pooling!r} vs {other} {actual.pooling!r}")
    if expected.normalized != actual.normalized:
        diffs.append(f"L2-normalised: {what} {expected.normalized} vs {other} {actual.normalized}")
    if expected.dim != actual.dim:
        diffs.append(f"embedding dimension: {what} {expected.dim} vs {other} {actual.dim}")
    a, b = _plain(expected.preprocessing), _plain(actual.preprocessing)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"preprocessing {key}: {what} {a.get(key)!r} vs {other} {b.get(key)!r}")
    return diffs


def check_identity(
    expected: ModelIdentity, actual: ModelIdentity, what: str = "index", other: str = "model"
) -> None:
    """Raise IdentityError listing every difference (see `compare_identity`)."""
    diffs = compare_identity(expected, actual, what, other)
    if diffs:
        raise IdentityError(
            f"the {what} was made by a different model than this {other} ("
            + "; ".join(diffs)
            + f"); rebuild the {what} with this model, or use the model that made it"
        )
