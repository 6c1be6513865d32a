"""robustness: the classification head under ImageNet-C-style corruptions applied on the fly
(training/corruptions.py): per-corruption error, mean corruption error (mCE relative to a baseline when
given), extra variant folders (ImageNet-A/-R/-Sketch style) and the poster's combined score."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.corruptions import CORRUPTIONS, SEVERITIES, check_corruptions, check_table

from .common import Loaded, RunConfig, decode_all, head_outputs, load, require_head, top1_hits_per_pass
from .datasets import DataSpec, ImageDataset, Split, load_split, map_classes, resolve_spec, short
from .errors import EvalError
from .metrics import percent, topk_accuracy
from .results import DETAIL_TABLES, EvalResult, format_table, make_result


# ---------------------------------------------------------------------------- the scores (pure)
def mean_corruption_error(
    errors: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]] | None = None,
    clean_error: float | None = None,
    baseline_clean_error: float | None = None,
) -> dict[str, Any]:
    """Corruption errors (percent, per corruption the errors at each severity) -> summary numbers.

    - mean_error: the plain mean over corruptions and severities (no baseline needed).
    - with a baseline, Hendrycks & Dietterich's CE_c = sum_s E_s,c / sum_s E^base_s,c, mCE = mean_c CE_c,
      and relative CE_c = sum_s (E_s,c - E_clean) / sum_s (E^base_s,c - E^base_clean)."""
    names = list(errors)
    if not names:
        raise EvalError("no corruption errors to summarise")
    out: dict[str, Any] = {
        "mean_error": float(np.mean([np.mean(errors[n]) for n in names])),
        "corruption_mean_error": {n: float(np.mean(errors[n])) for n in names},
    }
    if baseline is None:
        return out
    missing = [n for n in names if n not in baseline]
    if missing:
        raise EvalError(f"the baseline has no errors for {missing}; it must cover the same corruptions")
    ce, rce = {}, {}
    for n in names:
        e, eb = np.asarray(errors[n], float), np.asarray(baseline[n], float)
        if e.shape != eb.shape:
            raise EvalError(f"{n}: {len(e)} severities evaluated but the baseline has {len(eb)}")
        if eb.sum() <= 0:
            raise EvalError(f"{n}: the baseline makes no errors, so the corruption error is undefined")
        ce[n] = 100.0 * e.sum() / eb.sum()
        if clean_error is not None and baseline_clean_error is not None:
            denom = (eb - baseline_clean_error).sum()
            rce[n] = 100.0 * (e - clean_error).sum() / denom if denom > 0 else float("nan")
    out["ce"] = ce
    out["mCE"] = float(np.mean(list(ce.values())))
    if rce:
        out["relative_ce"] = rce
        out["relative_mCE"] = float(np.mean(list(rce.values())))
    return out


def combined_score(corruption_error: float, variant_top1: Mapping[str, float]) -> float:
    """The poster's robustness summary: mean of (100 - corruption error) and each variant's top-1."""
    return float(np.mean([100.0 - corruption_error, *variant_top1.values()]))


# ---------------------------------------------------------------------------- the baseline
@dataclass
class Baseline:
    """The errors mCE is measured against: per corruption the errors at each severity, the clean error when
    known, and where they came from (recorded in the result)."""

    errors: Mapping[str, Sequence[float]]
    clean_error: float | None
    info: dict[str, Any]


def _read_baseline_json(path: Path) -> tuple[dict, float | None]:
    """Baseline corruption errors from a JSON file: a robustness result of this tool, or a plain
    {corruption: [error at severity 1, ..., 5]} table (e.g. AlexNet's ImageNet-C errors)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot read baseline errors ({e})") from e
    if isinstance(d, dict) and isinstance(d.get("details"), dict) and "errors" in d["details"]:
        return d["details"]["errors"], d["details"].get("clean_error")
    if isinstance(d, dict) and "errors" in d:
        return d["errors"], d.get("clean_error")
    if isinstance(d, dict) and all(isinstance(v, list) for v in d.values()):
        return d, None
    raise EvalError(
        f"{path}: expected a robustness result or a JSON object {{corruption: [errors per severity]}}"
    )


def _baseline_from_result(result: EvalResult, corruptions, severities, corruption_seed, table) -> Baseline:
    if result.task != "robustness":
        raise EvalError(f"the baseline must be a robustness result, got a {result.task!r} result")
    same = result.config.get("severities") == list(severities) and all(
        c in result.details["errors"] for c in corruptions
    )
    same = same and result.config.get("corruption_seed") == corruption_seed
    if not same or result.config.get("table") != table:
        raise EvalError("the baseline result was computed with other corruptions, severities, seed or table")
    errors, clean = result.details["errors"], result.details["clean_error"]
    return Baseline(errors, clean, {"source": result.checkpoint, "errors": errors, "clean_error": clean})


def _baseline_from_json(path: Path, corruptions, severities) -> Baseline:
    errors, clean = _read_baseline_json(path)
    bad = [c for c in corruptions if len(errors.get(c) or []) != len(severities)]
    if bad:
        raise EvalError(
            f"{path}: the baseline needs {len(severities)} errors (one per severity) for each of "
            f"{short(bad)}; it has {', '.join(f'{c}: {len(errors.get(c) or [])}' for c in bad[:4])}"
        )
    return Baseline(errors, clean, {"source": str(path)})


def load_baseline(
    baseline: str | os.PathLike | EvalResult | None,
    spec: DataSpec,
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    corruption_seed: int,
    table: str,
    class_map: Mapping[str, str] | None,
    run: RunConfig,
) -> Baseline | None:
    """The baseline's errors from a robustness result already computed (the CLI evaluates one baseline
    checkpoint once for many models), a JSON file of errors, or a checkpoint evaluated here the same way.
    Called before the long run, so a bad baseline fails first."""
    if baseline is None:
        return None
    if isinstance(baseline, EvalResult):
        return _baseline_from_result(baseline, corruptions, severities, corruption_seed, table)
    path = Path(baseline)
    if path.is_file() and path.suffix == ".json" and path.name != "model.json":
        return _baseline_from_json(path, corruptions, severities)
    b = evaluate_robustness(
        baseline,
        spec,
        corruptions=corruptions,
        severities=severities,
        corruption_seed=corruption_seed,
        table=table,
        class_map=class_map,
        run=run,
    )
    errors, clean = b.details["errors"], b.details["clean_error"]
    return Baseline(errors, clean, {"source": str(baseline), "errors": errors, "clean_error": clean})


# ---------------------------------------------------------------------------- running
def _corruption_errors(
    loaded: Loaded, split: Split, class_map, corruptions, severities, corruption_seed, table, run: RunConfig
) -> tuple[float, dict[str, list[float]]]:
    """(clean error, {corruption: [error per severity]}), in percent, from one stream of every pass."""
    prep = loaded.card.preprocessing
    # decode + crop once; every corrupted pass reads the crops from memory when they fit
    base = ImageDataset(split.samples, prep)
    if len(base) * prep.image_size**2 * 3 <= run.cache_gb * 2**30:
        base.pixels = decode_all(base, run)
    cols = map_classes(
        split.class_names, require_head(loaded, "robustness"), class_map, source=f"eval set {split.spec.root}"
    )
    passes = [(None, 0)] + [(c, s) for c in corruptions for s in severities]  # clean first
    ds = ImageDataset(
        split.samples, prep, pixels=base.pixels, passes=passes, seed=corruption_seed, table=table
    )
    top1 = [percent(h, len(split.samples)) for h in top1_hits_per_pass(loaded, ds, cols, run, "robustness")]
    errors: dict[str, list[float]] = {}
    for (c, _), t in zip(passes[1:], top1[1:], strict=True):
        errors.setdefault(c, []).append(100.0 - float(t))
    return 100.0 - float(top1[0]), errors


def _variant_top1(loaded: Loaded, variants, class_map, run: RunConfig) -> dict[str, float]:
    out = {}
    for vname, vspec in (variants or {}).items():
        vsplit = load_split(resolve_spec(vspec, loaded.card, loaded.path))
        logits, labels, _ = head_outputs(loaded, vsplit, class_map, run, vname)
        out[vname] = topk_accuracy(logits, labels, (1,))[1]
    return out


def evaluate_robustness(
    checkpoint: str | os.PathLike,
    data: DataSpec,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    corruption_seed: int = 0,
    table: str = "auto",
    baseline: str | os.PathLike | EvalResult | None = None,
    variants: Mapping[str, DataSpec] | None = None,
    class_map: Mapping[str, str] | None = None,
    run: RunConfig = RunConfig(),
    name: str | None = None,
) -> EvalResult:
    """The classification head under ImageNet-C-style corruptions applied on the fly to `data`, plus
    any variant folders (`{"imagenet-r": DataSpec(...)}`, class subsets allowed).

    Errors are percentages (100 - top-1). The corruption score is the mCE relative to `baseline` (a
    checkpoint, evaluated here the same way; its robustness result; or a JSON file of its errors) when
    given, else the mean error;
    `combined` = mean(100 - corruption score, each variant's top-1), the poster's summary."""
    t0 = time.perf_counter()
    corruptions = check_corruptions(corruptions)
    check_table(table)
    severities = tuple(severities)
    if not severities or any(not 1 <= int(s) <= 5 for s in severities):
        raise EvalError(f"severities must be in 1-5, got {list(severities)}")
    loaded = load(checkpoint, run, name)
    require_head(loaded, "robustness")
    spec = resolve_spec(data, loaded.card, loaded.path)
    split = load_split(spec)
    setting = dict(
        corruptions=corruptions, severities=severities, corruption_seed=corruption_seed, table=table
    )
    base = load_baseline(baseline, spec, **setting, class_map=class_map, run=run)

    clean_error, errors = _corruption_errors(
        loaded, split, class_map, corruptions, severities, corruption_seed, table, run
    )
    if base is None:
        scores = mean_corruption_error(errors, None, clean_error)
    else:
        scores = mean_corruption_error(errors, base.errors, clean_error, base.clean_error)
    variant_top1 = _variant_top1(loaded, variants, class_map, run)

    corruption_score = scores["mCE"] if base is not None else scores["mean_error"]
    summary: dict[str, Any] = {"clean error": clean_error}
    summary.update({c: scores["corruption_mean_error"][c] for c in corruptions})
    summary["mCE" if base is not None else "mean corruption error"] = corruption_score
    if "relative_mCE" in scores:
        summary["relative mCE"] = scores["relative_mCE"]
    summary.update({f"{v} top-1": a for v, a in variant_top1.items()})
    summary["combined"] = combined_score(corruption_score, variant_top1)
    details = {
        "clean_error": clean_error,
        "errors": errors,
        **scores,
        "corruption_score": corruption_score,
        "corruption_score_kind": "mCE" if base is not None else "mean_error",
        "variants_top1": variant_top1,
        "combined": summary["combined"],
        "baseline": base.info if base is not None else None,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    config = {
        **setting,
        "corruptions": list(corruptions),
        "severities": list(severities),
        "class_map": dict(class_map) if class_map else None,
        "run": asdict(run),
    }
    data_d = {"eval": spec.describe(), "variants": {v: s.describe() for v, s in (variants or {}).items()}}
    return make_result("robustness", loaded, summary, details, config, data_d, spec.tag())


# ---------------------------------------------------------------------------- the command line's helpers
def parse_variants(items: list[str], args: Any) -> dict[str, DataSpec]:
    """--variant NAME=PATH (repeatable) -> {name: DataSpec}, capped like --data by --max-per-class."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--variant expects NAME=PATH, got {item!r}")
        out[name] = DataSpec(path, max_per_class=getattr(args, "max_per_class", None))
    return out


def shared_baseline(kwargs: dict, data: DataSpec, checkpoints: Sequence[str]) -> dict:
    """Several models against one baseline checkpoint: evaluate the baseline once, not once per model."""
    baseline = kwargs.get("baseline")
    if baseline and len(checkpoints) > 1 and not Path(baseline).suffix == ".json":
        setting = {k: v for k, v in kwargs.items() if k not in ("baseline", "variants")}
        kwargs = {**kwargs, "baseline": evaluate_robustness(baseline, data, **setting)}
    return kwargs


def robustness_table(result: EvalResult) -> str:
    """Per-corruption errors at each severity (and CE against the baseline when there is one)."""
    d = result.details
    sev = result.config["severities"]
    has_ce = "ce" in d
    headers = ["corruption", *(f"s{s}" for s in sev), "mean"] + (["CE"] if has_ce else [])
    rows = []
    for c, errs in d["errors"].items():
        rows.append([c, *errs, float(np.mean(errs))] + ([d["ce"][c]] if has_ce else []))
    return format_table(headers, rows)


DETAIL_TABLES["robustness"] = robustness_table
