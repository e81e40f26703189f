"""The memory backend's admission and settle, edge by edge: what a request is counted for, where a
limit's boundary lies, what a grant settles, which limit the headers report and which refusal a
client is told about. Written from a mutation run over ``fleetgate/limits`` (``MUTANTS_SET=limits
scripts/mutants.sh``): each test here fails on a mutant that survived the older tests."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits_fakes import FakeClock

from fleetgate.errors import GatewayError, InvalidRequest, QuotaExceeded, RateLimited
from fleetgate.limits.backend import NO_LIMITS, Grant, admit
from fleetgate.limits.headers import RateView, head_lines, most_restrictive, rate_headers
from fleetgate.limits.memory import MemoryBackend
from fleetgate.limits.spec import Checks, Limits, Quota, Subject

ALICE, BOB, TEAM = Subject("user", "alice"), Subject("user", "bob"), Subject("group", "team")
KEY = Subject("key", "7")


def backend() -> tuple[MemoryBackend, FakeClock]:
    clock = FakeClock()
    return MemoryBackend(clock=clock), clock


def taken(b: MemoryBackend, checks: Checks, **kw: object) -> Grant:
    """``admit`` (caps, cost, backend); the memory backend decides at once."""
    g = admit(b, checks, **kw)  # type: ignore[arg-type]
    assert isinstance(g, Grant)
    return g


# -- what a request is counted for ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "cost"),
    [
        ({"max_tokens": 10}, 10 + 10),  # 40 bytes: 10 prompt tokens, plus max_tokens
        ({"max_tokens": None}, 10 + 1024),  # neither field: the default
        ({"max_tokens": None, "default_max_tokens": 50}, 10 + 50),  # the model's default
        ({"max_tokens": 10, "n": 3}, 10 + 30),  # n choices of max_tokens each
        ({"max_tokens": None, "generates": False}, 10),  # embeddings: the prompt only
    ],
)
def test_admission_counts_the_request_as_it_asks(kw: dict[str, object], cost: int) -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(tpm=100_000))])
    g = taken(b, checks, body_bytes=40, **kw)
    assert g.cost == cost
    assert g.headers["x-ratelimit-remaining-tokens"] == str(100_000 - cost)


def test_a_request_costing_exactly_the_tpm_limit_is_admitted() -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(tpm=110))])
    g = taken(b, checks, body_bytes=40, max_tokens=100)  # 10 + 100 = 110: fits a full bucket
    assert g.cost == 110 and g.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(InvalidRequest) as e:  # one token more can never fit: a 400
        admit(b, checks, body_bytes=40, max_tokens=101)
    assert e.value.error_code == "request_above_tpm" and e.value.param == "max_tokens"


def test_limits_without_tpm_go_through_admit() -> None:
    b, _ = backend()
    for lim in (Limits(rpm=2), Limits(max_concurrent=1)):
        g = taken(b, Checks.of([(ALICE, lim)]), body_bytes=40, max_tokens=5)
        assert g is not NO_LIMITS and g.cost == 15
        g.settle(1, 1)
    with pytest.raises(InvalidRequest) as e:  # a tpm limit on one subject, none on the other
        admit(b, Checks.of([(BOB, Limits(rpm=5)), (TEAM, Limits(tpm=20))]),
              body_bytes=40, max_tokens=11)
    assert e.value.error_code == "request_above_tpm"


def test_the_caps_refuse_with_their_own_codes() -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(max_tokens=10, max_n=2))])
    with pytest.raises(InvalidRequest) as e:
        admit(b, checks, body_bytes=4, max_tokens=11)
    assert (e.value.error_code, e.value.param) == ("max_tokens_above_cap", "max_tokens")
    with pytest.raises(InvalidRequest) as e:
        admit(b, checks, body_bytes=4, max_tokens=10, n=3)
    assert (e.value.error_code, e.value.param) == ("n_above_cap", "n")
    assert admit(b, checks, body_bytes=4, max_tokens=10, n=2) is NO_LIMITS  # caps count nothing


@pytest.mark.parametrize(
    ("limits", "quotas", "empty", "counts", "capped", "floor"),
    [
        ((), (), True, False, False, None),
        (((ALICE, Limits(rpm=1)),), (), False, True, False, None),
        (((ALICE, Limits(max_tokens=5)),), (), False, False, True, None),
        ((), ((ALICE, Quota(5)),), False, True, False, None),
        (((ALICE, Limits(tpm=50)), (TEAM, Limits(tpm=30, max_n=2))), (), False, True, True, 30),
    ],
)
def test_what_checks_derive_once(limits: tuple, quotas: tuple, empty: bool, counts: bool,
                                 capped: bool, floor: int | None) -> None:
    c = Checks.of(limits, quotas)
    assert (c.empty, c.counts, c.capped, c.tpm_floor) == (empty, counts, capped, floor)


# -- settle ---------------------------------------------------------------------------------


def test_settle_counts_negative_usage_as_none_and_one_token_as_one() -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(tpm=600))])
    b.admit(checks, 100).settle(-50, 1)  # charged 100, used 0 + 1: 99 back
    assert b.admit(checks, 1).headers["x-ratelimit-remaining-tokens"] == "598"
    b, _ = backend()
    b.admit(checks, 100).settle(1, -7)
    assert b.admit(checks, 1).headers["x-ratelimit-remaining-tokens"] == "598"


def test_settle_refills_the_bucket_to_now_before_the_refund() -> None:
    b, clock = backend()
    checks = Checks.of([(ALICE, Limits(tpm=600))])  # 10 tokens a second
    g = b.admit(checks, 100)  # 500 left
    clock.advance(1)  # 510
    g.settle(20, 20)  # used 40 of 100: 60 back, 570
    assert b.admit(checks, 70).headers["x-ratelimit-remaining-tokens"] == "500"


def test_settle_caps_the_bucket_at_its_capacity() -> None:
    b, clock = backend()
    checks = Checks.of([(ALICE, Limits(tpm=600))])
    g = b.admit(checks, 100)  # 500
    clock.advance(6)  # 560
    g.settle(0, 0)  # 100 back would make 660: capped at 600
    assert b.admit(checks, 1).headers["x-ratelimit-remaining-tokens"] == "599"


# -- the headers report the most restrictive limit -------------------------------------------


def _expected_head(b: MemoryBackend, checks: Checks) -> bytes:
    """What the headers must say, from the counters as they are after the take."""
    req = [RateView.of(lim.rpm, b._cells[s].r) for s, lim in checks.limits if lim.rpm is not None]
    tok = [RateView.of(lim.tpm, b._cells[s].t) for s, lim in checks.limits if lim.tpm is not None]
    return head_lines(rate_headers(most_restrictive(req), most_restrictive(tok)))


_LIMIT = st.builds(
    Limits,
    rpm=st.one_of(st.none(), st.integers(1, 400)),
    tpm=st.one_of(st.none(), st.integers(1, 4000)),
)


@settings(max_examples=300, deadline=None)
@given(
    limits=st.lists(_LIMIT, min_size=1, max_size=3),
    steps=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 300), st.floats(0, 3)),
                   min_size=1, max_size=12),
)
def test_success_headers_are_the_most_restrictive_bucket_of_each_kind(
    limits: list[Limits], steps: list[tuple[int, int, float]]
) -> None:
    b, clock = backend()
    subjects = [ALICE, TEAM, KEY]
    full = Checks.of(list(zip(subjects, limits, strict=False)))
    # Requests use different subsets of the subjects, so their buckets drift apart.
    views = [full] + [Checks.of([row]) for row in full.limits]
    for which, cost, wait in steps:
        clock.advance(wait)
        checks = views[which % len(views)]
        try:
            g = b.admit(checks, cost)
        except RateLimited:
            continue
        assert g.head == _expected_head(b, checks)


def test_among_equal_remaining_the_smaller_limit_is_reported() -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(rpm=11, tpm=500)), (TEAM, Limits(rpm=10, tpm=400))])
    pre = Checks.of([(ALICE, Limits(rpm=11, tpm=500))])
    b.admit(pre, 100)  # alice: 10 requests and 400 tokens left, the same as the team's
    h = b.admit(checks, 1).headers
    assert h["x-ratelimit-limit-requests"] == "10" and h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-limit-tokens"] == "400" and h["x-ratelimit-remaining-tokens"] == "399"


# -- which refusal the client is told about --------------------------------------------------


def test_a_quota_refusal_with_rate_limits_that_pass_reports_their_headers() -> None:
    b, _ = backend()
    checks = Checks.of([(TEAM, Limits(rpm=10, tpm=1000))], [(ALICE, Quota(50, "day"))])
    b.admit(checks, 40)
    with pytest.raises(QuotaExceeded) as e:
        b.admit(checks, 11)
    assert "10 tokens left" in e.value.message and "this request counts 11" in e.value.message
    h = e.value.headers
    assert h["x-ratelimit-remaining-requests"] == "9" and h["x-ratelimit-remaining-tokens"] == "960"


def test_the_quota_is_refused_over_a_full_concurrency_slot() -> None:
    b, _ = backend()
    checks = Checks.of([(TEAM, Limits(max_concurrent=1))], [(ALICE, Quota(50, "day"))])
    b.admit(checks, 45)  # holds the slot, and leaves 5 of the quota
    with pytest.raises(QuotaExceeded):
        b.admit(checks, 10)


def test_a_quota_that_still_fits_is_not_the_reason() -> None:
    b, _ = backend()
    checks = Checks.of([(TEAM, Limits(max_concurrent=1))], [(ALICE, Quota(50, "day"))])
    b.admit(checks, 20)  # 30 left
    with pytest.raises(RateLimited) as e:  # 30 fits exactly: the slot is what refuses
        b.admit(checks, 30)
    assert "concurrent" in e.value.message


def test_a_rate_limit_is_the_reason_over_a_full_slot_and_the_longest_wait_wins() -> None:
    b, clock = backend()
    checks = Checks.of([(ALICE, Limits(rpm=60, max_concurrent=1)), (TEAM, Limits(tpm=60))])
    b.admit(checks, 30)  # alice holds her slot; team has 30 tokens left (1 a second)
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 50)  # alice's bucket is fine, her slot is not, team waits 20 s
    assert "tokens per minute" in e.value.message
    assert e.value.headers["retry-after"] == "20"
    other = Checks.of([(BOB, Limits(rpm=60)), (KEY, Limits(rpm=6))])
    for _ in range(6):
        b.admit(other, 1)
    with pytest.raises(RateLimited) as e:  # key: 0 left, 10 s a request; bob: 54 left
        b.admit(other, 1)
    assert "key" in e.value.message and e.value.headers["retry-after"] == "10"
    clock.advance(10)
    b.admit(other, 1)


def test_a_bucket_holding_exactly_one_request_admits_it() -> None:
    b, clock = backend()
    checks = Checks.of([(ALICE, Limits(rpm=60, tpm=60))])
    b.admit(checks, 59)  # rpm 59 left, tpm 1 left
    g = b.admit(checks, 1)  # exactly the one token left
    assert g.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 1)
    assert "tokens per minute" in e.value.message and e.value.headers["retry-after-ms"] == "1000"
    clock.advance(1)
    b.admit(checks, 1)


def test_refusal_headers_reset_from_the_refill_the_decision_saw() -> None:
    b, clock = backend()
    checks = Checks.of([(ALICE, Limits(rpm=2))])
    b.admit(checks, 1)
    b.admit(checks, 1)
    clock.advance(15)  # half a request back: 0.5
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 1)
    h = e.value.headers
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"] == "45s"  # 1.5 requests to full, at 2 a minute
    assert h["retry-after-ms"] == "15000"


def test_refusals_are_gateway_errors_with_the_status_a_client_expects() -> None:
    b, _ = backend()
    with pytest.raises(GatewayError) as e:
        admit(b, Checks.of([(ALICE, Limits(tpm=5))]), body_bytes=400, max_tokens=None)
    assert e.value.status == 400


# -- found by the second mutation run ----------------------------------------------------------


def test_admission_refills_tpm_at_its_rate() -> None:
    b, clock = backend()
    checks = Checks.of([(ALICE, Limits(tpm=600))])  # 10 tokens a second
    b.admit(checks, 600)
    clock.advance(1)
    assert b.admit(checks, 10).headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited):
        b.admit(checks, 1)


def test_a_rate_refusal_beside_a_quota_that_fits() -> None:
    b, _ = backend()
    checks = Checks.of([(TEAM, Limits(tpm=100))], [(ALICE, Quota(1000, "day"))])
    b.admit(checks, 90)
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 20)
    assert "tokens per minute" in e.value.message
    rpm = Checks.of([(TEAM, Limits(rpm=1))], [(BOB, Quota(1000, "month"))])
    b.admit(rpm, 1)
    with pytest.raises(RateLimited) as e:
        b.admit(rpm, 1)
    assert "requests per minute" in e.value.message


def test_three_subjects_each_keep_their_own_level() -> None:
    b, _ = backend()
    rows = [(ALICE, Limits(rpm=10)), (TEAM, Limits(rpm=20)), (KEY, Limits(rpm=30))]
    for subject, lim in rows:  # 9, 18 and 27 left before the shared request
        b.admit(Checks.of([(subject, lim)]), 1)
        if subject != ALICE:
            b.admit(Checks.of([(subject, lim)]), 1)
        if subject == KEY:
            b.admit(Checks.of([(subject, lim)]), 1)
    b.admit(Checks.of(rows), 1)  # 8, 17 and 26 left
    for (subject, lim), left in zip(rows, (7, 16, 25), strict=True):
        h = b.admit(Checks.of([(subject, lim)]), 1).headers
        assert h["x-ratelimit-remaining-requests"] == str(left), subject


@pytest.mark.parametrize("small_first", [True, False])
def test_equal_whole_remaining_reports_the_smaller_limit_whatever_the_fractions(
    small_first: bool,
) -> None:
    b, clock = backend()
    small = (ALICE, Limits(rpm=60, tpm=600))
    large = (TEAM, Limits(rpm=120, tpm=1200))
    b.admit(Checks.of([(ALICE, Limits(rpm=60, tpm=600))]), 300)
    for _ in range(3):
        b.admit(Checks.of([(TEAM, Limits(rpm=120, tpm=1200))]), 300)
    for _ in range(29):
        b.admit(Checks.of([(ALICE, Limits(rpm=60))]), 1)
    for _ in range(87):
        b.admit(Checks.of([(TEAM, Limits(rpm=120))]), 1)
    # alice: 30 requests and 300 tokens left, team: 30 and 300
    clock.advance(0.025)  # alice +0.025 and +0.25, team +0.05 and +0.5
    rows = [small, large] if small_first else [large, small]
    h = b.admit(Checks.of(rows), 1).headers  # 29.025 / 29.05 and 299.25 / 299.5 left
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "29"
    assert h["x-ratelimit-limit-tokens"] == "600" and h["x-ratelimit-remaining-tokens"] == "299"


def test_a_concurrency_refusal_is_not_blamed_on_a_bucket_with_a_request_left() -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(rpm=60, max_concurrent=1))])
    for _ in range(58):
        b.admit(checks, 1).settle(0, 0)
    b.admit(checks, 1)  # holds the slot; exactly 1 request left in the bucket
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 1)
    assert "concurrent" in e.value.message and "alice" in e.value.message
    b2, _ = backend()
    checks = Checks.of([(ALICE, Limits(rpm=60, max_concurrent=1))])
    for _ in range(57):
        b2.admit(checks, 1).settle(0, 0)
    b2.admit(checks, 1)  # 2 left
    with pytest.raises(RateLimited) as e:
        b2.admit(checks, 1)
    assert "concurrent" in e.value.message


def test_a_concurrency_refusal_names_the_subject_whose_slots_are_full() -> None:
    b, _ = backend()
    checks = Checks.of([(ALICE, Limits(max_concurrent=5)), (TEAM, Limits(max_concurrent=1))])
    b.admit(checks, 1)
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 1)
    assert "group 'team'" in e.value.message and "limit is 1" in e.value.message


def test_a_new_day_keeps_this_months_quota_counters() -> None:
    wall = FakeClock(dt.datetime(2026, 11, 24, 23, 59, 0, tzinfo=dt.UTC).timestamp())
    b = MemoryBackend(clock=FakeClock(), wall=wall)
    month = Checks.of([], [(TEAM, Quota(100, "month"))])
    b.admit(month, 60)
    wall.advance(120)  # the 25th: a day quota's first request opens the new day
    b.admit(Checks.of([], [(ALICE, Quota(100, "day"))]), 1)
    again = Checks.of([], [(TEAM, Quota(100, "month"))])  # compiled afresh (a reloaded key)
    with pytest.raises(QuotaExceeded):
        b.admit(again, 41)
    b.admit(again, 40)
