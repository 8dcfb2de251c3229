"""setup.py installs every package of the source tree (a regular, non-editable install)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwargs():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    return {
        k.arg: ast.literal_eval(k.value)
        for k in call.keywords
        if k.arg in ("packages", "package_dir")
    }


def test_every_package_is_listed():
    kwargs = _setup_kwargs()
    found = {"fastdiff.kernels"}
    for init in (ROOT / "fastdiff").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    assert found == set(kwargs["packages"])
    assert kwargs["package_dir"]["fastdiff.kernels"] == "kernels"
    assert (ROOT / "kernels" / "__init__.py").exists()
