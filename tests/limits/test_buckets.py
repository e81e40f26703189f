"""Buckets, admission cost, headers and OpenAI's duration format, as tables of cases (pure)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.limits.buckets import admission_cost, refill, settle_level, until_full_s, wait_s
from fleetgate.limits.headers import (
    RateView,
    _ceil_ms,
    bucket_head,
    format_duration,
    head_lines,
    head_pairs,
    most_restrictive,
    rate_head,
    rate_headers,
    retry_after,
)

COST = [
    # (name, body bytes, max_tokens, n, default, generates, want)
    ("max_tokens set", 400, 100, 1, 1024, True, 100 + 100),
    ("neither set: the default", 400, None, 1, 1024, True, 100 + 1024),
    ("model default", 400, None, 1, 256, True, 100 + 256),
    ("n multiplies the completion only", 400, 100, 3, 1024, True, 100 + 300),
    ("prompt rounds up", 5, 10, 1, 1024, True, 2 + 10),
    ("max_tokens 0", 8, 0, 1, 1024, True, 2),
    ("embeddings: prompt only", 400, None, 1, 1024, False, 100),
    ("empty body", 0, 7, 1, 1024, True, 7),
]


@pytest.mark.parametrize(("name", "size", "mt", "n", "default", "gen", "want"), COST,
                         ids=[c[0] for c in COST])
def test_admission_cost(name: str, size: int, mt: int | None, n: int, default: int, gen: bool,
                        want: int) -> None:
    assert admission_cost(size, mt, n, default, generates=gen) == want


REFILL = [
    # (name, level, updated, now, capacity, want)
    ("no time passed", 3.0, 10.0, 10.0, 60, 3.0),
    ("one second of a 60/min bucket", 3.0, 10.0, 11.0, 60, 4.0),
    ("half a second of 120/min", 0.0, 0.0, 0.5, 120, 1.0),
    ("capped at capacity", 55.0, 0.0, 60.0, 60, 60.0),
    ("negative level refills too", -30.0, 0.0, 30.0, 60, 0.0),
    ("clock went backwards: no refill", 3.0, 10.0, 5.0, 60, 3.0),
    ("a lowered limit caps the level", 50.0, 10.0, 10.0, 10, 10.0),
]


@pytest.mark.parametrize(("name", "level", "updated", "now", "cap", "want"), REFILL,
                         ids=[c[0] for c in REFILL])
def test_refill(name: str, level: float, updated: float, now: float, cap: int, want: float) -> None:
    assert refill(level, updated, now, cap) == pytest.approx(want)


WAIT = [
    # (level, need, capacity, seconds)
    (5.0, 1, 10, 0.0),
    (0.0, 1, 10, 6.0),  # 10 rpm: one request every 6 s
    (0.5, 1, 60, 0.5),
    (-100.0, 100, 1000, 12.0),
]


@pytest.mark.parametrize(("level", "need", "cap", "want"), WAIT)
def test_wait_s(level: float, need: int, cap: int, want: float) -> None:
    assert wait_s(level, need, cap) == pytest.approx(want)


def test_until_full() -> None:
    assert until_full_s(10.0, 10) == 0
    assert until_full_s(0.0, 10) == pytest.approx(60)
    assert until_full_s(5.0, 10) == pytest.approx(30)


SETTLE = [
    # (name, level, charged, actual, capacity, want)
    ("refund the over-count", 0.0, 1000, 300, 10_000, 700.0),
    ("charge the under-count", 500.0, 100, 900, 10_000, -300.0),
    ("exact", 42.0, 10, 10, 100, 42.0),
    ("refund never passes capacity", 90.0, 50, 0, 100, 100.0),
]


@pytest.mark.parametrize(("name", "level", "charged", "actual", "cap", "want"), SETTLE,
                         ids=[c[0] for c in SETTLE])
def test_settle_level(name: str, level: float, charged: int, actual: int, cap: int,
                      want: float) -> None:
    assert settle_level(level, charged, actual, cap) == want


DURATIONS = [
    (0, "0s"),
    (0.02, "20ms"),
    (0.0201, "21ms"),  # rounded up: never announce a reset earlier than it happens
    (0.999, "999ms"),
    (1, "1s"),
    (1.5, "1.5s"),
    (6.0, "6s"),
    (59.25, "59.25s"),
    (60, "1m0s"),
    (360, "6m0s"),
    (361.5, "6m1.5s"),
    (3600, "1h0m0s"),
    (3723, "1h2m3s"),
    (-1, "0s"),
]


@pytest.mark.parametrize(("seconds", "want"), DURATIONS)
def test_format_duration(seconds: float, want: str) -> None:
    assert format_duration(seconds) == want


def test_rate_view_of_a_bucket() -> None:
    v = RateView.of(10, 2.7)
    assert (v.limit, v.remaining) == (10, 2)
    assert v.reset_s == pytest.approx(43.8)
    assert RateView.of(10, -3.0).remaining == 0


MOST = [
    ("fewest remaining wins", [(100, 50), (10, 9)], (10, 9)),
    ("remaining beats a smaller limit", [(10, 9), (1000, 3)], (1000, 3)),
    ("tie: the smaller limit", [(1000, 0), (10, 0)], (10, 0)),
    ("none", [], None),
]


@pytest.mark.parametrize(("name", "views", "want"), MOST, ids=[c[0] for c in MOST])
def test_most_restrictive(name: str, views: list[tuple[int, int]],
                          want: tuple[int, int] | None) -> None:
    got = most_restrictive(RateView(lim, rem, 0.0) for lim, rem in views)
    assert (None if got is None else (got.limit, got.remaining)) == want


def test_rate_headers_values() -> None:
    h = rate_headers(RateView(10, 9, 6.0), RateView(1000, 200, 48.0))
    assert h == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "200",
        "x-ratelimit-reset-tokens": "48s",
    }
    assert rate_headers(None, None) == {}
    assert set(rate_headers(None, RateView(5, 1, 0.0))) == {
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}


RETRY = [(0.001, "1", "1"), (0.5, "1", "500"), (6.0, "6", "6000"), (6.0001, "7", "6001")]


@pytest.mark.parametrize(("s", "ra", "ms"), RETRY)
def test_retry_after(s: float, ra: str, ms: str) -> None:
    assert retry_after(s) == {"retry-after": ra, "retry-after-ms": ms}


@given(capacity=st.integers(1, 10**12), gap=st.floats(0, 1.1, allow_nan=False))
def test_a_nearly_full_buckets_header_lines_are_what_rate_headers_writes(
    capacity: int, gap: float
) -> None:
    # gap: seconds of refill short of full, so the reset is under a second (the fast branch)
    _bucket_lines_agree(capacity, capacity - gap * capacity / 60)


@given(capacity=st.integers(1, 10**12),
       level=st.floats(-1e13, 1e13, allow_nan=False, allow_infinity=False))
def test_a_buckets_header_lines_are_what_rate_headers_writes(capacity: int, level: float) -> None:
    _bucket_lines_agree(capacity, level)


def _bucket_lines_agree(capacity: int, level: float) -> None:
    # The admitted request's fast path must say exactly what the refusal path says.
    for kind in ("requests", "tokens"):
        fast = bucket_head(kind.encode(), capacity, level)
        view = RateView.of(capacity, level)
        slow = rate_headers(view if kind == "requests" else None,
                            view if kind == "tokens" else None)
        assert head_pairs(fast) == [(k.encode(), v.encode()) for k, v in slow.items()]
        assert fast == head_lines(slow)


_CAPS = st.one_of(st.none(), st.integers(1, 10**12))
_LEVELS = st.floats(-1e13, 1e13, allow_nan=False, allow_infinity=False)


@given(r_cap=_CAPS, r_level=_LEVELS, t_cap=_CAPS, t_level=_LEVELS)
def test_both_kinds_in_one_format_are_each_buckets_lines(
    r_cap: int | None, r_level: float, t_cap: int | None, t_level: float
) -> None:
    _same_lines(r_cap, r_level, t_cap, t_level)


# A level within a second's refill of full: the one-format path (both resets under a second),
# which levels drawn from the whole range almost never reach.
_NEAR_FULL = st.floats(0, 1.1, allow_nan=False)


@given(r_cap=st.integers(1, 10**9), r_gap=_NEAR_FULL, t_cap=st.integers(1, 10**12),
       t_gap=_NEAR_FULL)
def test_one_format_near_full_is_each_buckets_lines(
    r_cap: int, r_gap: float, t_cap: int, t_gap: float
) -> None:
    # gap: seconds of refill the bucket is short of full
    _same_lines(r_cap, r_cap - r_gap * r_cap / 60.0, t_cap, t_cap - t_gap * t_cap / 60.0)


def _same_lines(r_cap: int | None, r_level: float, t_cap: int | None, t_level: float) -> None:
    both = rate_head(r_cap, r_level, t_cap, t_level)
    one_by_one = (b"" if r_cap is None else bucket_head(b"requests", r_cap, r_level)) + (
        b"" if t_cap is None else bucket_head(b"tokens", t_cap, t_level))
    assert both == one_by_one


def test_a_reset_under_a_microsecond_is_0s_in_either_format() -> None:
    # Found by the property above: a bucket short of full by a hair resets in 0 ms once rounded;
    # the one-format path wrote "0ms" where a bucket's own lines write "0s".
    head = rate_head(1, 1 - 0.5 / 60, 1, 1 - 1.5e-12)
    assert b"x-ratelimit-reset-tokens: 0s\r\n" in head
    assert b"x-ratelimit-reset-requests: 500ms\r\n" in head
    _same_lines(1, 1 - 0.5 / 60, 1, 1 - 1.5e-12)
    _same_lines(10, 10 - 1e-13, 60_000, 60_000 - 1.0)


def test_one_format_covers_resets_under_a_second_at_its_edges() -> None:
    # A bucket 1 token short of full at 60,000/minute resets in 1 ms; at 61/minute in 984 ms.
    assert rate_head(60_000, 59_999.0, 61, 60.0) == (
        bucket_head(b"requests", 60_000, 59_999.0) + bucket_head(b"tokens", 61, 60.0))
    assert b"reset-tokens: 984ms" in rate_head(60_000, 59_999.0, 61, 60.0)
    # A reset of a second or more is written as Go's duration, by the one-by-one path.
    assert b"reset-tokens: 1s" in rate_head(60_000, 59_999.0, 60, 59.0)


@given(st.one_of(
    st.floats(1e-9, 1e6, allow_nan=False, allow_infinity=False),
    # within a millionth of a whole number, where round() decides
    st.builds(lambda k, d: k + d, st.integers(0, 999), st.floats(-2e-6, 2e-6)).filter(
        lambda x: x > 0),
))
def test_the_fast_ceiling_of_milliseconds_rounds_as_format_duration(ms: float) -> None:
    assert _ceil_ms(ms) == math.ceil(round(ms, 6))


def test_the_fast_ceiling_at_its_edges() -> None:
    for ms in (1.0, 1.0000004, 1.0000006, 1.9999994, 1.9999996, 5e-7, 4e-7, 6e-7, 0.3, 999.0):
        assert _ceil_ms(ms) == math.ceil(round(ms, 6)), ms
