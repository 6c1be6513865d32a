"""Optional dependencies: which extra installs each, and one way to import them with that hint.

Heavy runtimes (gradio, onnxruntime, tensorrt, faiss, pyarrow, ray, ...) are imported inside the function
that needs them; when one is missing, the error says what needed it and the exact `pip install`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> what to install (the extra of pyproject.toml that carries it)
INSTALL = {
    "gradio": "pip install 'supmae[demo]'",
    "tensorboard": "pip install 'supmae[train]'",
    "webdataset": "pip install 'supmae[train]'",
    "transformers": "pip install 'supmae[train]'",
    "pyarrow": "pip install 'supmae[features]'",
    "faiss": "pip install 'supmae[features]' (faiss-cpu)",
    "ray": "pip install 'supmae[cluster]'",
    "onnxruntime": "pip install onnxruntime (CPU) or pip install 'supmae[gpu]' (onnxruntime-gpu)",
    "tensorrt": "pip install 'supmae[gpu]' (TensorRT >= 10 and a CUDA GPU)",
    "litserve": "pip install 'supmae[bench]'",
}


def install_hint(module: str) -> str:
    """The command that installs `module` (its top-level name), e.g. "pip install 'supmae[demo]'"."""
    top = module.split(".")[0]
    return INSTALL.get(top, f"pip install {top}")


class MissingDependency(ImportError):
    """An optional package is not installed; the message names who needed it and how to install it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependency("<purpose> needs <module>: <install hint>")."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{purpose} needs {module.split('.')[0]}: {install_hint(module)}") from e
