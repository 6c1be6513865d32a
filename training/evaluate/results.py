"""What a task returns (`EvalResult`) and what is done with it: Markdown tables, side-by-side comparison,
JSON next to the checkpoint, the summary recorded in the model card."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supmae_serve.common.files import atomic_write_text
from supmae_serve.common.versions import software_versions
from supmae_serve.model import ModelCard

from .errors import EvalError


@dataclass
class EvalResult:
    task: str
    checkpoint: str
    name: str  # the row label in tables (default: the checkpoint path as given)
    summary: dict[str, Any]  # the headline numbers, in table order
    details: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # names the data split in file names and card keys
    created: str = ""
    software: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The summary row, then the task's detail table when it has one."""
        text = format_table(["checkpoint", *self.summary], [[self.name, *self.summary.values()]])
        detail = DETAIL_TABLES.get(self.task)
        if detail is not None:
            text += "\n\n" + detail(self)
        return text


# task name -> a function giving the task's detail table (registered by the task's module)
DETAIL_TABLES: dict[str, Callable[[EvalResult], str]] = {}


def make_result(task, loaded, summary, details, config, data, tag) -> EvalResult:
    """An EvalResult of `loaded` (common.Loaded), stamped with the time and software versions."""
    return EvalResult(
        task=task,
        checkpoint=loaded.path,
        name=loaded.name,
        summary=summary,
        details=details,
        config=config,
        data=data,
        tag=tag,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        software=software_versions(),
    )


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into a README) with columns padded to line up in a terminal."""
    cells = [[str(h) for h in headers]] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(r[i]) if i < len(r) else 1 for r in cells) for i in range(len(headers))]

    def line(r):
        padded = [(r[i] if i < len(r) else "-").ljust(widths[i]) for i in range(len(headers))]
        return "| " + " | ".join(padded) + " |"

    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def compare(results: Sequence[EvalResult]) -> str:
    """Side by side: one row per checkpoint, the union of their summary columns (in first-seen order)."""
    columns: list[str] = []
    for r in results:
        columns += [k for k in r.summary if k not in columns]
    rows = [[r.name, *(r.summary.get(c) for c in columns)] for r in results]
    return format_table(["checkpoint", *columns], rows)


def result_path(result: EvalResult) -> Path:
    """`<checkpoint folder>/eval/<task>-<tag>.json`."""
    return _checkpoint_dir(result.checkpoint) / "eval" / f"{result.task}-{result.tag}.json"


def save_result(result: EvalResult, path: str | os.PathLike | None = None) -> Path:
    """Write the result as JSON (atomically) next to its checkpoint, or to `path`."""
    out = Path(path) if path is not None else result_path(result)
    text = json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n"
    atomic_write_text(out, text)
    return out


def save_results(results: Sequence[EvalResult], path: str | os.PathLike) -> Path:
    """Write several results (a side-by-side run) to one JSON file: {"results": [...]}."""
    out = Path(path)
    text = json.dumps({"results": [r.to_dict() for r in results]}, indent=2, default=_json_default) + "\n"
    atomic_write_text(out, text)
    return out


def update_card_metrics(result: EvalResult) -> Path:
    """Record the summary in the checkpoint's model card under metrics["eval"]["<task>/<tag>"].

    Only model.json is rewritten (atomically, every other field kept as it was); the weights file is
    never touched."""
    card_path = _card_path(result.checkpoint)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{card_path}: cannot read the model card to update it ({e})") from e
    metrics = card.get("metrics") or {}
    evals = metrics.get("eval") or {}
    evals[f"{result.task}/{result.tag}"] = {**result.summary, "data": result.data, "created": result.created}
    metrics["eval"] = evals
    card["metrics"] = metrics
    ModelCard.from_dict(json.loads(json.dumps(card, default=_json_default)), source=str(card_path))
    atomic_write_text(card_path, json.dumps(card, indent=2, default=_json_default) + "\n")
    return card_path


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def _checkpoint_dir(checkpoint: str | os.PathLike) -> Path:
    p = Path(checkpoint)
    return p if p.is_dir() else p.parent


def _card_path(checkpoint: str | os.PathLike) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        return p / "model.json"
    if p.suffix == ".json":
        return p
    return p.with_suffix(".json") if p.with_suffix(".json").exists() else p.with_name("model.json")
