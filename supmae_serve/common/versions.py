"""Software versions for model cards and manifests (standard library only: versions are read from the
installed distributions' metadata, so nothing heavy is imported to learn them)."""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable
from importlib import metadata


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """{distribution name: version} for each of `names` that is installed (the others are left out); a module
    already imported reports its own `__version__`, which keeps a build tag such as torch's "+cpu"."""
    out = {}
    for name in names:
        module = sys.modules.get(name)
        if getattr(module, "__version__", None):  # already imported: its own string ("2.14.1+cu130")
            out[name] = str(module.__version__)
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


CORE = ("torch", "timm", "numpy")


def software_versions(extra: Iterable[str] = (), *, system: bool = False) -> dict[str, str]:
    """{"supmae": ..., "python": ..., "torch": ..., "timm": ..., "numpy": ...} plus each installed package
    of `extra` (e.g. onnx, onnxruntime); `system=True` adds the platform and the CPU's name (manifests of
    artefacts whose speed or validity depends on the machine: exports, graph caches, benchmarks)."""
    from supmae_serve import __version__

    out = {"supmae": __version__, "python": platform.python_version()}
    out.update(package_versions((*CORE, *extra)))
    if system:
        from .system import cpu_name

        out["platform"] = platform.platform()
        out["cpu"] = cpu_name()
    return out
