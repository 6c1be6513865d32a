"""Every console script answers --help (and each subcommand's --help) with exit 0: help texts built from
settings or registries must format (a bare % in a description once broke `supmae-serve --help`)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TABLE = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
SCRIPTS = dict(re.findall(r'^(supmae-[a-z]+) = "([^"]+)"', _TABLE, flags=re.M))  # (tomllib is 3.11+)
SUBCOMMANDS = {
    "supmae-eval": ["accuracy", "knn", "linprobe", "fewshot", "robustness", "retrieval"],
    "supmae-embed": ["run", "index", "search"],
}


def _main(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


@pytest.mark.parametrize(
    "script,args",
    [(s, ["--help"]) for s in SCRIPTS]
    + [(s, [sub, "--help"]) for s, subs in SUBCOMMANDS.items() for sub in subs],
)
def test_help_exits_zero(script, args, capsys):
    with pytest.raises(SystemExit) as e:
        _main(SCRIPTS[script])(args)
    assert e.value.code == 0, capsys.readouterr().err
    assert "usage:" in capsys.readouterr().out
