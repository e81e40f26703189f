"""Which limits apply to a request, and the caps (pure)."""

from __future__ import annotations

import pytest

from fleetgate.errors import InvalidRequest
from fleetgate.limits.spec import Checks, Limits, Quota, Subject, check_caps

G_TEAM, G_BIG = Subject("group", "team"), Subject("group", "big")
ALICE, KEY, MODEL = Subject("user", "alice"), Subject("key", "7"), Subject("model", "m")

LIMITS = {
    G_TEAM: Limits(rpm=100, max_tokens=2048),
    G_BIG: Limits(max_n=4),
    ALICE: Limits(tpm=10_000, max_tokens=512),
    KEY: Limits(max_concurrent=2),
    MODEL: Limits(rpm=1000, max_n=8),
    Subject("user", "bob"): Limits(rpm=1),
}
QUOTAS = {ALICE: Quota(1_000_000, "month"), G_TEAM: Quota(50_000, "day"), KEY: Quota(1, "day")}


def test_build_collects_every_subject_that_applies() -> None:
    c = Checks.build(model="m", user="alice", groups=("team", "big", "none"), key="7",
                     limits=LIMITS, quotas=QUOTAS)
    # Caps-only subjects (big) keep no counter.
    assert [s for s, _ in c.limits] == [MODEL, ALICE, G_TEAM, KEY]
    # Quotas only on users and groups; a quota keyed to a key is ignored.
    assert [s for s, _ in c.quotas] == [ALICE, G_TEAM]
    assert c.max_tokens == (512, ALICE)  # the tightest cap, with who set it
    assert c.max_n == (4, G_BIG)
    assert c.counts and not c.empty


def test_a_group_named_twice_is_one_counter() -> None:
    c = Checks.build(model="x", user=None, groups=("team", "team"), limits=LIMITS)
    assert [s for s, _ in c.limits] == [G_TEAM]


def test_build_with_nothing_set() -> None:
    c = Checks.build(model="other", user="carol", groups=(), key="9", limits=LIMITS)
    assert c.empty and not c.counts


CAPS = [
    # (name, max_tokens, n, error param or None)
    ("under both caps", 512, 4, None),
    ("no max_tokens: not above a cap", None, 1, None),
    ("max_tokens above", 513, 1, "max_tokens"),
    ("n above", 10, 5, "n"),
]


@pytest.mark.parametrize(("name", "mt", "n", "param"), CAPS, ids=[c[0] for c in CAPS])
def test_caps(name: str, mt: int | None, n: int, param: str | None) -> None:
    c = Checks.build(model="m", user="alice", groups=("team", "big"), limits=LIMITS)
    if param is None:
        check_caps(c, mt, n)
        return
    with pytest.raises(InvalidRequest) as e:
        check_caps(c, mt, n)
    assert e.value.status == 400
    assert e.value.param == param
    # The message names the cap and who set it; nothing is clamped.
    assert ("512" in e.value.message and "user 'alice'" in e.value.message) if param == "max_tokens" \
        else ("4" in e.value.message and "group 'big'" in e.value.message)


@pytest.mark.parametrize("bad", [{"rpm": 0}, {"tpm": -5}, {"max_n": True}, {"rpm": 1.5}])
def test_bad_limits(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)  # type: ignore[arg-type]


def test_bad_subject_kind() -> None:
    with pytest.raises(ValueError):
        Subject.of("team", "x")
    assert Subject.of("group", "x") == Subject("group", "x")
    assert str(Subject("key", "7")) == "this API key (id 7)"
