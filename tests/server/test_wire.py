"""Response header checks (``fleetgate.server.wire.check_header``): whatever its caches and fast
paths, it refuses exactly the names and values that could split a response."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.server import wire

BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

names = st.one_of(st.sampled_from([b"x-ratelimit-remaining-requests", b"content-type", b"x"]),
                  st.binary(max_size=12))
values = st.one_of(st.sampled_from([b"99", b"1ms", b"6m0s", b"a\r\nset-cookie: x", b"\x00"]),
                   st.binary(max_size=12))


@given(st.lists(st.tuples(names, values), min_size=1, max_size=20))
def test_check_header_refuses_exactly_what_could_split_a_response(
    pairs: list[tuple[bytes, bytes]],
) -> None:
    # A sequence, so that the caches a good pair fills are in play for the pairs after it.
    for name, value in pairs:
        bad = not name or bool(BAD_NAME.search(name)) or bool(BAD_VALUE.search(value))
        if bad:
            with pytest.raises(ValueError):
                wire.check_header(name, value)
        else:
            wire.check_header(name, value)


def test_a_known_name_still_refuses_a_bad_value() -> None:
    wire.check_header(b"x-ratelimit-remaining-tokens", b"12")
    with pytest.raises(ValueError):
        wire.check_header(b"x-ratelimit-remaining-tokens", b"12\r\nset-cookie: a=b")


@pytest.mark.parametrize("status", [100, 200, 429, 599, 999])
def test_any_three_digit_status_gets_a_status_line(status: int) -> None:
    # An upstream's unusual status is relayed: the known ones with their phrase, others bare.
    line = wire.status_line(status)
    assert line.startswith(b"HTTP/1.1 %d " % status) and line.endswith(b"\r\n")
    assert line.count(b"\r\n") == 1
    if status == 599:
        assert line == b"HTTP/1.1 599 \r\n"


@pytest.mark.parametrize("status", [-1, 0, 99, 1000, 10000])
def test_a_status_that_is_not_three_digits_is_refused(status: int) -> None:
    with pytest.raises(ValueError, match=f"invalid HTTP status {status}"):
        wire.status_line(status)


def test_the_header_check_caches_stay_bounded() -> None:
    # Every response header pair an app sends may be remembered, but never more than
    # _CHECKED_MAX of them (nor of names), whatever the app sends.
    saved = set(wire._CHECKED), set(wire._GOOD_NAMES)
    try:
        wire._CHECKED.clear()
        wire._GOOD_NAMES.clear()
        # A value is kept only up to 256 bytes (a pair is one set entry of at most that).
        wire.check_header(b"x-long", b"v-" * 128)
        wire.check_header(b"x-long", b"v-" * 128 + b"v")
        assert wire._CHECKED == {(b"x-long", b"v-" * 128)}
        for i in range(wire._CHECKED_MAX + 50):
            wire.check_header(b"x-n-%d" % i, b"v-%d" % i)  # not alnum: the slow path, cached
        assert len(wire._CHECKED) == wire._CHECKED_MAX
        assert len(wire._GOOD_NAMES) == wire._CHECKED_MAX
    finally:
        wire._CHECKED.clear()
        wire._GOOD_NAMES.clear()
        wire._CHECKED.update(saved[0])
        wire._GOOD_NAMES.update(saved[1])
