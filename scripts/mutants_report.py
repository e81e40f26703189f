"""Summarise a mutmut run: how many mutants changed behaviour, and how many of those were killed.

Run from the directory mutmut ran in (``scripts/mutants.sh`` does). A mutant counts as
*message text* when all it changes is the wording of a human-readable message: a string
literal with a space in it or an f-string (replaced, re-cased, ``XX``-wrapped or ``None``), a
value inside such an f-string (a truncation length), or anything inside a ``log.*(...)`` call.
Every other mutant changes behaviour: an error code, a status, a threshold, a branch, a key of
the error envelope. The kill rate the issue asks for is over the behaviour-changing mutants
(mutmut's timeouts count as killed, as in mutmut's own score).

Writes ``survivors.txt`` (behaviour-changing survivors, each with its diff line) and prints the
totals.
"""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path


def _functions(path: Path) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    out: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = node
    return out


def _first_difference(a: object, b: object, trail: list[ast.AST]) -> tuple[object, list[ast.AST]]:
    """The first node of ``a`` that differs from ``b``, and the nodes above it."""
    if type(a) is not type(b):
        return a, trail
    if isinstance(a, ast.AST):
        for name in a._fields:
            x, y = getattr(a, name, None), getattr(b, name, None)
            if _dump(x) != _dump(y):
                if not isinstance(x, ast.AST | list) or not isinstance(y, ast.AST | list):
                    return a, trail  # a scalar field (a constant's value): ``a`` itself
                return _first_difference(x, y, [*trail, a])
        return a, trail
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return a, trail
        for x, y in zip(a, b, strict=True):
            if _dump(x) != _dump(y):
                return _first_difference(x, y, trail)
    return a, trail


def _dump(x: object) -> str:
    if isinstance(x, ast.AST):
        return ast.dump(x)
    if isinstance(x, list):
        return "[" + ",".join(_dump(i) for i in x) + "]"
    return repr(x)


def _is_message(node: object) -> bool:
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value


def _in_log_call(trail: list[ast.AST]) -> bool:
    for n in trail:
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id in ("log", "logger", "logging")
        ):
            return True
    return False


def classify(orig: ast.AST, mutant: ast.AST) -> str:
    """``"message"`` or ``"behaviour"``."""
    a, b = ast.Module(body=orig.body, type_ignores=[]), ast.Module(body=mutant.body, type_ignores=[])
    node, trail = _first_difference(a, b, [])
    if _in_log_call(trail) or _is_message(node) or any(isinstance(n, ast.JoinedStr) for n in trail):
        return "message"
    return "behaviour"


def main() -> int:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        capture_output=True, text=True, check=True,
    ).stdout
    status = {}
    for line in out.splitlines():
        if ": " in line:
            name, st = line.strip().rsplit(": ", 1)
            status[name] = st
    modules: dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    table: collections.Counter[tuple[str, str]] = collections.Counter()
    survivors = []
    for name, st in sorted(status.items()):
        module, _, fn = name.rpartition(".")
        if module not in modules:
            modules[module] = _functions(Path("mutants") / (module.replace(".", "/") + ".py"))
        funcs = modules[module]
        base = fn.rsplit("__mutmut_", 1)[0]
        kind = classify(funcs[base + "__mutmut_orig"], funcs[fn])
        table[kind, st] += 1
        if kind == "behaviour" and st not in ("killed", "timeout"):
            survivors.append(f"{name}: {st}")
    Path("survivors.txt").write_text("".join(s + "\n" for s in survivors))
    for kind in ("behaviour", "message"):
        counts = {st: n for (k, st), n in sorted(table.items()) if k == kind}
        print(f"{kind}: {sum(counts.values())} {counts}")
    total = sum(table.values())
    killed = sum(n for (_, st), n in table.items() if st in ("killed", "timeout"))
    behav = sum(n for (k, _), n in table.items() if k == "behaviour")
    behav_killed = sum(
        n for (k, st), n in table.items() if k == "behaviour" and st in ("killed", "timeout")
    )
    print(f"total {total}, killed {killed}, not killed {total - killed}")
    rate = 100.0 * behav_killed / behav if behav else 100.0
    print(f"behaviour-changing: {behav}, killed {behav_killed} ({rate:.1f}%)")
    print(f"behaviour-changing survivors: {len(survivors)} (survivors.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
