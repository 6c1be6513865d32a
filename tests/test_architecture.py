"""Design rules as tests: the import direction between packages (ARCHITECTURE.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: Path) -> dict[str, set[str]]:
    found = {}
    for py in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(py.relative_to(ROOT))] = names
    return found


def _violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{f} imports {n}"
        for f, names in _imports(ROOT / folder).items()
        for n in names
        if any(n == p or n.startswith(p + ".") for p in forbidden)
    ]


def test_model_imports_only_torch_timm_numpy():
    forbidden = (
        "fastapi",
        "gradio",
        "onnxruntime",
        "onnx",
        "tensorrt",
        "training",
        "export",
        "app",
        "supmae_serve.api",
        "supmae_serve.backends",
        "uvicorn",
        "starlette",
        "pydantic",
    )
    assert _violations("supmae_serve/model", forbidden) == []


def test_training_and_export_never_import_serving_api_or_app():
    forbidden = ("supmae_serve.api", "app", "fastapi", "gradio")
    assert _violations("training", forbidden) == []
    assert _violations("export", forbidden) == []


def test_serving_never_imports_training():
    assert _violations("supmae_serve", ("training",)) == []
    assert _violations("app", ("training",)) == []


@pytest.mark.parametrize("module", ["supmae_serve.model", "supmae_serve.preprocess"])
def test_model_import_does_not_load_heavy_runtimes(module):
    code = (
        f"import sys, {module}; heavy = [m for m in ('fastapi', 'gradio', 'onnxruntime', 'tensorrt') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_packages_import():
    r = subprocess.run(
        [sys.executable, "-c", "import supmae_serve, training, export, app"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr


def test_common_imports_only_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"numpy", "torch", "tqdm", "supmae_serve"}
    found = [
        f"{f} imports {n}"
        for f, names in _imports(ROOT / "supmae_serve/common").items()
        for n in names
        if n.split(".")[0] not in allowed
        or (n.startswith("supmae_serve.") and not n.startswith("supmae_serve.common"))
    ]
    assert found == []


def test_features_stay_below_the_api_and_the_demo():
    forbidden = ("supmae_serve.api", "app", "fastapi", "gradio", "training", "export")
    assert _violations("supmae_serve/features", forbidden) == []


def test_features_import_does_not_load_faiss_pyarrow_or_ray():
    mods = "supmae_serve.features.bulk, supmae_serve.features.index, supmae_serve.features.ray_data, supmae_serve.features.cli"
    code = (
        f"import sys, {mods}; heavy = [m for m in ('faiss', 'pyarrow', 'ray') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
