"""The architecture, kept honest: the core imports no ML framework and no transport."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlflow"
TRANSPORT = ("multiprocessing", "ray", "socket", "concurrent.futures.process")
OPT_IN_TORCH = {"torch_utils.py"}   # imported only by users who ask for it


def imported_modules(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def test_import_rlflow_imports_neither_torch_nor_ray():
    code = ("import sys, rlflow, rlflow.envs, rlflow.adders, rlflow.replay, rlflow.experiment;"
            "bad = [m for m in ('torch', 'ray', 'tensorflow', 'jax') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"import rlflow pulled in {out.stdout.strip()} {out.stderr[-2000:]}"


def test_transport_imports_only_under_runtime():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "runtime":
            continue
        for mod in imported_modules(path):
            if any(mod == t or mod.startswith(t + ".") for t in TRANSPORT):
                offenders.append(f"{rel}: {mod}")
    assert not offenders, "transport imported outside rlflow/runtime/: " + ", ".join(offenders)


def test_no_ml_framework_in_the_core():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if str(rel) in OPT_IN_TORCH:
            continue
        for mod in imported_modules(path):
            if mod.split(".")[0] in ("torch", "tensorflow", "jax"):
                offenders.append(f"{rel}: {mod}")
    assert not offenders, "ML framework imported in the core: " + ", ".join(offenders)


@pytest.mark.parametrize("path", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_every_top_level_module_imports(path):
    __import__(f"rlflow.{path[:-3]}") if path != "__init__.py" else __import__("rlflow")
