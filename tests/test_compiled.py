"""The compiled build (setup.py, ``FLEETGATE_USE_MYPYC=1``): which build these tests run on.

``scripts/test.sh`` runs the suite on the Python build, then the request path's tests again in a
compiled copy (``scripts/compiled.sh``) with ``FLEETGATE_EXPECT_COMPILED=1``: there every module
in ``setup.py``'s list must be an extension module, or that pass would test the source twice.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _compiled_list() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    raise AssertionError("setup.py has no COMPILED list")


def test_the_compiled_list_names_modules_that_exist() -> None:
    names = _compiled_list()
    assert names and len(set(names)) == len(names)
    for n in names:
        assert (ROOT / n).is_file(), n
        assert n.startswith("fleetgate/") and n.endswith(".py"), n


def test_each_module_is_the_build_this_pass_expects() -> None:
    expect_compiled = os.environ.get("FLEETGATE_EXPECT_COMPILED") == "1"
    for n in _compiled_list():
        mod = importlib.import_module(n[:-3].replace("/", "."))
        file = str(mod.__file__)
        assert file.endswith(".so") == expect_compiled, (n, file)
