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
