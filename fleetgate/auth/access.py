"""Model access: which model names a caller may use. Pure; no I/O, no logging.

A pattern is an ``fnmatch``-style glob matched case-sensitively against the whole model name,
where ``*`` also matches ``/`` (so ``Qwen/*`` matches ``Qwen/Qwen3-8B``). A list of patterns
allows a model when any pattern matches it; ``None`` instead of a list means "no narrowing".

Effective access is an intersection of *layers* (see :func:`effective`):

1. the user's groups: the union of every group's list. A group with an empty list allows
   nothing, and so does a user with no groups, except the built-in ``default`` user and users
   with role ``admin``, who may use every model when they belong to no group;
2. the user's own list, if set, narrows that;
3. the key's list, if set, narrows it further. It can never widen it: a model must pass every
   layer.

:class:`ModelAccess` is compiled once (when a key is loaded into the cache) and answers
:meth:`ModelAccess.allows` from a bounded memo, so the per-request cost is one dict lookup.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Sequence

DEFAULT_USER = "default"
ADMIN_USER = "admin"
BUILTIN_USERS = (DEFAULT_USER, ADMIN_USER)

# A memo this big covers every configured model many times over; past it, start again rather
# than grow without bound on a flood of made-up model names.
MEMO_LIMIT = 4096

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` is a glob rather than a literal model name."""
    return any(c in _GLOB_CHARS for c in pattern)


def matches(pattern: str, model: str) -> bool:
    return fnmatch.fnmatchcase(model, pattern)


def parse_globs(text: str | None) -> tuple[str, ...] | None:
    """``"a, b/*"`` -> ``("a", "b/*")``; ``None`` stays ``None``; blanks are dropped.

    ``""`` gives ``()``: callers decide what an empty list means (for a user's own list it means
    "remove the narrowing", for a group "no model").
    """
    if text is None:
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class ModelAccess:
    """An intersection of pattern layers, compiled once. ``layers == ()`` allows everything."""

    __slots__ = ("layers", "_compiled", "_memo")

    def __init__(self, layers: Iterable[Sequence[str]] = ()) -> None:
        self.layers: tuple[tuple[str, ...], ...] = tuple(tuple(layer) for layer in layers)
        self._compiled = tuple(_compile(layer) for layer in self.layers)
        self._memo: dict[str, bool] = {}

    @classmethod
    def of(cls, *layers: Sequence[str] | None) -> ModelAccess:
        """Layers where ``None`` means "no narrowing" (and is dropped)."""
        return cls(layer for layer in layers if layer is not None)

    @property
    def unrestricted(self) -> bool:
        return not self.layers

    def narrowed(self, patterns: Sequence[str] | None) -> ModelAccess:
        return self if patterns is None else ModelAccess((*self.layers, tuple(patterns)))

    def allows(self, model: str) -> bool:
        hit = self._memo.get(model)
        if hit is not None:
            return hit
        ok = all(rx is not None and rx.match(model) is not None for rx in self._compiled)
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[model] = ok
        return ok

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelAccess) and other.layers == self.layers

    def __hash__(self) -> int:
        return hash(self.layers)

    def __repr__(self) -> str:
        return f"ModelAccess({list(map(list, self.layers))!r})"


EVERYTHING = ModelAccess()


def user_access(
    user: str,
    role: str,
    group_lists: Sequence[Sequence[str]],
    own: Sequence[str] | None,
) -> ModelAccess:
    """A user's access: the union of their groups' lists, narrowed by their own list.

    ``group_lists`` holds one list per group the user belongs to.
    """
    return _shared(_layers(user, role, group_lists, own, None))


def _layers(
    user: str, role: str, group_lists: Sequence[Sequence[str]], own: Sequence[str] | None,
    key: Sequence[str] | None,
) -> tuple[tuple[str, ...], ...]:
    if not group_lists and (user == DEFAULT_USER or role == "admin"):
        groups: tuple[str, ...] | None = None
    else:
        groups = tuple(p for lst in group_lists for p in lst)
    return tuple(tuple(x) for x in (groups, own, key) if x is not None)


@functools.lru_cache(maxsize=4096)
def _shared(layers: tuple[tuple[str, ...], ...]) -> ModelAccess:
    # Keys with the same layers (most keys of a deployment) share one compiled object and its
    # memo: loading 100,000 keys compiles a handful of patterns, not 100,000.
    return ModelAccess(layers)


def effective(
    user: str,
    role: str,
    group_lists: Sequence[Sequence[str]],
    own: Sequence[str] | None,
    key: Sequence[str] | None,
) -> ModelAccess:
    """What one key may use: its user's access intersected with the key's own list."""
    return _shared(_layers(user, role, group_lists, own, key))


def key_pattern_problems(
    patterns: Sequence[str], owner: ModelAccess, configured: Sequence[str]
) -> list[str]:
    """Why a key with ``patterns`` would claim more than its owner may use (empty: it's fine).

    A literal that names a configured model its owner may not use is refused, and so is any
    pattern that matches no configured model its owner may use (an unknown name included).
    A glob that also covers forbidden models is fine: the request-time intersection cuts it.
    """
    problems = []
    usable = [m for m in configured if owner.allows(m)]
    for p in patterns:
        if not is_glob(p) and p in configured and not owner.allows(p):
            problems.append(f"the owner may not use the model {p!r}")
        elif not any(matches(p, m) for m in usable):
            if not is_glob(p) and p not in configured:
                problems.append(f"unknown model {p!r}")
            else:
                problems.append(f"{p!r} matches no model the owner may use")
    return problems
