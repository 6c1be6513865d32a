"""Model cards as the server shows them: absolute paths of the machine that trained the model redacted.

A card records the training command and its data and output folders; served as is (`/v1/info`, the demo's
card tab) it tells every client the trainer's directory layout (user names, mount points). Each absolute
path in any string of the card is replaced by `[redacted]/<its last component>`; relative paths, URLs and
everything else are left alone. The card on disk is not changed.
"""

from __future__ import annotations

import re
from typing import Any

# an absolute POSIX path (a "/" that does not follow a word character, ".", ":" or another "/": so not the
# middle of a relative path or a URL) or a Windows drive path, up to whitespace or a quote
_ABSOLUTE = re.compile(r"""(?<![\w.:/\\~-])(?:/|[A-Za-z]:[\\/])[^\s'"]*""")
_LAST = re.compile(r"[^/\\]+[/\\]*$")


def _redact(match: re.Match) -> str:
    last = _LAST.search(match.group(0))
    return "[redacted]/" + (last.group(0).rstrip("/\\") if last else "")


def redact_paths(value: Any) -> Any:
    """A copy of `value` (dicts, lists, strings, numbers) with every absolute path in its strings redacted."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(_redact, value)
    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_paths(v) for v in value]
    return value
