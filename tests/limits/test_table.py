"""The per-request lookup of what applies (pure)."""

from __future__ import annotations

from fleetgate.limits.spec import Limits, Quota, Subject
from fleetgate.limits.table import LimitTable


def test_checks_are_built_once_per_caller_and_model() -> None:
    t = LimitTable({Subject("group", "team"): Limits(rpm=5), Subject("model", "m"): Limits()},
                   {Subject("user", "al"): Quota(100, "day")}, {"team": 3.0})
    a = t.checks(model="m", user="al", groups=("team",), key="1")
    assert a is t.checks(model="m", user="al", groups=("team",), key="1")
    assert [s for s, _ in a.limits] == [Subject("group", "team")]  # an empty Limits is dropped
    assert [s for s, _ in a.quotas] == [Subject("user", "al")]
    b = t.checks(model="m", user="bo", groups=(), key="2")
    assert b.empty
    assert t.configured and t.weight(("team", "x")) == 3.0 and t.weight(()) == 1.0


def test_memo_is_bounded() -> None:
    t = LimitTable({Subject("model", "m"): Limits(rpm=1)}, max_memo=10)
    for i in range(25):
        t.checks(model="m", user=f"u{i}")
    assert len(t._memo) <= 10


def test_nothing_configured() -> None:
    assert not LimitTable().configured
    assert not LimitTable({Subject("user", "x"): Limits()}).configured
