"""Dataclass configs from parsed command-line flags, where each flag is named like the field it sets."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """`cls(...)` with each field taken from the flag of the same name (`--batch-size` -> `batch_size`);
    `values` give the fields whose value is not a flag's as it stands (converted, renamed, computed). A field
    with neither keeps its default, so a flag added later under a field's name sets that field."""
    for name in values:
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
    taken = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and f.name not in values and hasattr(args, f.name)
    }
    return cls(**taken, **values)
