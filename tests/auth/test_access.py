"""Model access as pure functions, with tables of cases."""

from __future__ import annotations

import pytest

from fleetgate.auth import access
from fleetgate.auth.access import ModelAccess
from fleetgate.auth.principals import Principal

MODELS = ("Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "meta/llama-3-8b", "demo")


@pytest.mark.parametrize(("pattern", "model", "ok"), [
    ("Qwen/*", "Qwen/Qwen3-8B", True),         # * crosses the slash
    ("*", "meta/llama-3-8b", True),
    ("Qwen*", "Qwen/Qwen3-8B", True),
    ("qwen/*", "Qwen/Qwen3-8B", False),        # case matters
    ("Qwen/Qwen3-?B", "Qwen/Qwen3-8B", True),
    ("Qwen/Qwen3-?B", "Qwen/Qwen3-32B", False),
    ("demo", "demo", True),
    ("demo", "demo2", False),                  # whole name, not a prefix
    ("demo", "xdemo", False),
    ("*-8b", "meta/llama-3-8b", True),
    ("[dq]emo", "demo", True),
])
def test_globs(pattern, model, ok):
    assert access.matches(pattern, model) is ok
    assert ModelAccess([[pattern]]).allows(model) is ok


@pytest.mark.parametrize(("user", "role", "groups", "own", "key", "allowed"), [
    # built-in default, no groups: everything, as before users existed
    ("default", "user", [], None, None, set(MODELS)),
    ("default", "user", [], None, ["demo"], {"demo"}),
    # an admin without groups: everything; the key still narrows
    ("root", "admin", [], None, None, set(MODELS)),
    ("root", "admin", [], None, ["Qwen/*"], {"Qwen/Qwen3-8B", "Qwen/Qwen3-32B"}),
    # a plain user without groups: nothing, whatever the key says
    ("alice", "user", [], None, None, set()),
    ("alice", "user", [], None, ["*"], set()),
    # a group with no list allows nothing
    ("alice", "user", [[]], None, None, set()),
    # union of groups
    ("alice", "user", [["Qwen/*"], ["demo"]], None, None,
     {"Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "demo"}),
    # the user's own list narrows the union
    ("alice", "user", [["Qwen/*"], ["demo"]], ["*-8B", "demo"], None,
     {"Qwen/Qwen3-8B", "demo"}),
    # the own list can't widen: it only narrows
    ("alice", "user", [["demo"]], ["*"], None, {"demo"}),
    # the key narrows further and can't widen
    ("alice", "user", [["Qwen/*"]], None, ["*"], {"Qwen/Qwen3-8B", "Qwen/Qwen3-32B"}),
    ("alice", "user", [["Qwen/*"]], None, ["meta/*"], set()),
    ("alice", "user", [["Qwen/*"]], None, ["Qwen/Qwen3-32B", "demo"], {"Qwen/Qwen3-32B"}),
    # the built-in default with a group: the group's list, not everything
    ("default", "user", [["demo"]], None, None, {"demo"}),
    # an admin with groups: their lists
    ("root", "admin", [["demo"]], None, None, {"demo"}),
])
def test_effective_access(user, role, groups, own, key, allowed):
    acc = access.effective(user, role, groups, own, key)
    assert {m for m in MODELS if acc.allows(m)} == allowed
    # asked twice (the memo), the same answer
    assert {m for m in MODELS if acc.allows(m)} == allowed


def test_memo_is_bounded():
    acc = ModelAccess([["a*"]])
    for i in range(access.MEMO_LIMIT * 2 + 5):
        acc.allows(f"a{i}")
        assert len(acc._memo) <= access.MEMO_LIMIT
    assert acc.allows("a1") and not acc.allows("b1")


@pytest.mark.parametrize(("patterns", "owner", "problems"), [
    (["demo"], ModelAccess(), []),
    (["*"], ModelAccess([["demo"]]), []),                        # wider glob: cut at request
    (["Qwen/*"], ModelAccess([["Qwen/Qwen3-8B"]]), []),
    (["Qwen/Qwen3-32B"], ModelAccess([["Qwen/Qwen3-8B"]]),
     ["the owner may not use the model 'Qwen/Qwen3-32B'"]),
    (["meta/*"], ModelAccess([["Qwen/*"]]), ["'meta/*' matches no model the owner may use"]),
    (["nope"], ModelAccess(), ["unknown model 'nope'"]),
    (["nope*"], ModelAccess(), ["'nope*' matches no model the owner may use"]),
    (["demo", "zzz"], ModelAccess(), ["unknown model 'zzz'"]),
    (["demo"], ModelAccess([[]]), ["the owner may not use the model 'demo'"]),
])
def test_key_pattern_problems(patterns, owner, problems):
    assert access.key_pattern_problems(patterns, owner, MODELS) == problems


@pytest.mark.parametrize(("text", "out"), [
    (None, None), ("", ()), ("a", ("a",)), (" a , b/* ,", ("a", "b/*")), (",,", ()),
])
def test_parse_globs(text, out):
    assert access.parse_globs(text) == out


def test_principal_old_style_arguments_still_work():
    p = Principal(name="alice", models=frozenset({"m"}))
    assert p.allows("m") and not p.allows("n") and not p.admin and p.role == "user"
    root = Principal(name="root", admin=True)
    assert root.admin and root.role == "admin" and root.allows("anything")
    assert Principal(name="x", role="admin").admin
    with pytest.raises(ValueError):
        Principal(name="x", role="owner")
    # frozen: a principal can't be changed after it was computed
    with pytest.raises(AttributeError):
        p.role = "admin"  # type: ignore[misc]
    assert p == Principal(name="alice", models=["m"]) and hash(p) == hash(
        Principal(name="alice", models=["m"]))


def test_a_layer_of_several_patterns_allows_any_of_them():
    acc = ModelAccess([["demo", "Qwen/*"]])
    assert acc.allows("demo") and acc.allows("Qwen/Qwen3-8B") and not acc.allows("meta/x")
    assert acc.narrowed(None) is acc
    assert not acc.narrowed(["demo"]).allows("Qwen/Qwen3-8B")


def test_durations():
    import datetime as dt

    from fleetgate.auth.keys import parse_duration

    assert parse_duration("1s") == dt.timedelta(seconds=1)
    assert parse_duration("2w") == dt.timedelta(weeks=2)
    for bad in ("0s", "1", "1y", "-1d", "soon"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)
