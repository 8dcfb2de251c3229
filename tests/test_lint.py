"""ruff lint and format, configured in pyproject.toml, over the whole repository."""

import ast
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=" ".join)
def test_ruff(args):
    result = subprocess.run([RUFF, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _private_imports(path: Path) -> list[str]:
    """``from module import _name`` of a function or class (a private module, ``from
    package import _module``, is the package's own business)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                name = alias.name
                if not name.startswith("_") or name.startswith("__"):
                    continue
                spec = importlib.util.find_spec(f"{node.module}.{name}")
                if spec is None:  # not a submodule: a private function or class
                    found.append(f"{path.relative_to(ROOT)}: from {node.module} import {name}")
    return found


def test_no_module_imports_another_modules_private_name():
    """Library code talks to other modules through their public names only."""
    package = [f for f in (ROOT / "fastdiff").rglob("*.py") if "kernels" not in f.parts]
    files = sorted(package) + sorted((ROOT / "kernels").glob("*.py"))
    assert [line for f in files for line in _private_imports(f)] == []


def test_no_library_module_is_over_500_lines():
    """One job a module: none under fastdiff/ is over 500 lines (the kernel family in
    kernels/ may be longer: it stays one kernel and its launcher)."""
    package = [f for f in (ROOT / "fastdiff").rglob("*.py") if "kernels" not in f.parts]
    long = {
        str(f.relative_to(ROOT)): n for f in package if (n := len(f.read_text().splitlines())) > 500
    }
    assert not long, long
