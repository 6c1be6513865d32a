"""Design rules as tests: the import direction between packages, and the one place model input is made
(ARCHITECTURE.md)."""

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


# Calls that resize or normalise images (torch, torchvision, PIL, timm). Model input is made only by
# supmae_serve/preprocess.py; anywhere else such a call must be listed here with what it does instead.
IMAGE_OPS = {
    "interpolate", "grid_sample", "resize", "resized_crop", "thumbnail",
    "Resize", "CenterCrop", "RandomResizedCrop", "Normalize", "ToTensor", "create_transform",
}  # fmt: skip
NOT_MODEL_INPUT = {
    ("supmae_serve/model/masking.py", "interpolate"): "position tables (interpolate_pos_embed), not images",
    ("training/augment.py", "grid_sample"): "random resized crops: training augmentation on the device",
    ("training/augment.py", "resize"): "the linear probe's clamped random crop: training augmentation",
    ("training/batches.py", "create_transform"): "timm's RandAugment/erasing pipeline (normalises with the card's mean/std, as erasing needs)",
    ("training/corruptions.py", "resize"): "the pixelate corruption (ImageNet-C), applied before preprocessing",
    ("training/observe.py", "resize"): "enlarges the reconstruction PNG for viewing",
}  # fmt: skip


def image_op_calls(root: Path) -> set[tuple[str, str]]:
    """(file, operation) of every call of an IMAGE_OPS name in the packages under `root`."""
    found = set()
    for pkg in ("supmae_serve", "training", "export", "app"):
        for py in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                    if name in IMAGE_OPS:
                        found.add((str(py.relative_to(root)), name))
    return found


def test_model_input_is_preprocessed_only_in_preprocess_py():
    """ARCHITECTURE.md: one module turns images into model input (resize, normalise), so training,
    export and serving cannot drift apart. Validation images resized by the trainer go through
    preprocess.resize_uint8; augmentation and the other listed uses are not model-input preprocessing."""
    outside = {(f, op) for f, op in image_op_calls(ROOT) if f != "supmae_serve/preprocess.py"}
    unexplained = sorted(k for k in outside if k not in NOT_MODEL_INPUT)
    assert unexplained == [], f"resize/normalise outside supmae_serve/preprocess.py: {unexplained}"
    stale = sorted(k for k in NOT_MODEL_INPUT if k not in outside)
    assert stale == [], f"listed in NOT_MODEL_INPUT but no longer called there: {stale}"


# The helpers every package shares live once, in supmae_serve/common; nothing else defines them again (by name,
# leading underscores ignored; `optional.require` is left out: capability checks are also called `require`), and the
# machine facts they read (/proc/cpuinfo) and the process-wide tables they hold are read nowhere else.
SHARED_HELPERS = {
    "supmae_serve/common/files.py": ("atomic_write", "atomic_write_text", "scan_images", "sha256_file"),
    "supmae_serve/common/versions.py": ("software_versions", "package_versions"),
    "supmae_serve/common/system.py": (
        "cpu_name",
        "cpu_flags",
        "cpu_features",
        "resolve_device",
        "peak_rss_bytes",
    ),
    "supmae_serve/common/optional.py": ("install_hint", "MissingDependency"),
    "supmae_serve/common/progress.py": ("Progress",),
    "supmae_serve/common/args.py": ("config_from_args",),
}
CODE_FOLDERS = ("supmae_serve", "training", "export", "app", "benchmarks")


def _definitions() -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for folder in CODE_FOLDERS:
        for py in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = node.name.lstrip("_")
                    where.setdefault(name, []).append(str(py.relative_to(ROOT)))
    return where


def test_shared_helpers_are_defined_only_in_common():
    where = _definitions()
    copies = [
        f"{name} defined in {f} (its home: {home})"
        for home, names in SHARED_HELPERS.items()
        for name in names
        for f in where.get(name, [])
        if f != home
    ]
    assert copies == []
    missing = [
        f"{home}: {n}"
        for home, names in SHARED_HELPERS.items()
        for n in names
        if home not in where.get(n, [])
    ]
    assert missing == []  # the table names real definitions


def test_cpuinfo_is_read_only_by_common_system():
    readers = [
        str(py.relative_to(ROOT))
        for folder in CODE_FOLDERS
        for py in (ROOT / folder).rglob("*.py")
        if "/proc/cpuinfo" in py.read_text()
    ]
    assert readers == ["supmae_serve/common/system.py"]
