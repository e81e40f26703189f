"""Property-based fuzzing of request parsing and the upstream body (hypothesis, bounded).

For any bytes, :func:`~fleetgate.dataplane.request.parse` and
:func:`~fleetgate.dataplane.request.upstream_body` either succeed or raise ``InvalidRequest``
(a 400 in OpenAI's shape), nothing else. When they succeed, the body sent upstream is valid JSON
whose members other than ``model`` and ``stream_options`` are the client's; a stream always asks
the engine for literal ``true`` usage flags; and a body that needs no change is forwarded byte
for byte. :func:`~fleetgate.dataplane.request.lax_bool` never disagrees with pydantic's lax
booleans, which vLLM reads the same fields with.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from fleetgate.dataplane.request import (
    ENDPOINTS,
    Endpoint,
    ParsedRequest,
    UpstreamBody,
    lax_bool,
    parse,
    upstream_body,
)
from fleetgate.errors import GatewayError, InvalidRequest

# Bounded: a few hundred examples a property, no example database written into the checkout.
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# What a client might send as a boolean: vLLM's lax spellings, near misses, other types.
LAX = st.sampled_from([
    True, False, 0, 1, 2, -1, 1.0, 0.0, "true", "false", "True", "FALSE", "yes", "no", " yes ",
    "0", "1", "on", "off", "t", "f", "y", "n", "maybe", "", "tru", None, [], {}, [True],
]) | SCALARS
STREAM_OPTIONS = st.dictionaries(
    st.sampled_from(["include_usage", "continuous_usage_stats", "other"]), LAX, max_size=3
) | JSON
FIELDS = {
    "stream": st.booleans() | LAX,
    "stream_options": STREAM_OPTIONS,
    "max_tokens": st.integers(-2, 10**6) | JSON,
    "max_completion_tokens": st.integers(-2, 10**6) | JSON,
    "n": st.integers(-1, 8) | JSON,
    "messages": JSON,
    "temperature": st.floats(0, 2),
}
DOCS = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=16) | JSON},
        optional=FIELDS,  # type: ignore[arg-type]
    ),
    st.dictionaries(st.text(max_size=10), JSON, max_size=3),
)


def _encode(doc: dict[str, Any], style: int) -> bytes:
    """The same document as different clients write it: compact, spaced, indented, escaped."""
    if style == 0:
        return orjson.dumps(doc)
    if style == 1:
        return json.dumps(doc).encode()
    if style == 2:
        return json.dumps(doc, indent=2, ensure_ascii=True).encode()
    return (" \n" + json.dumps(doc, separators=(" , ", " : ")) + "\n").encode()


def _deep(depth: int, stream: bool) -> bytes:
    """JSON nested ``depth`` levels inside a request (orjson reads 1024, writes 254)."""
    head = b'{"model":"m","stream":' + (b"true" if stream else b"false") + b',"x":'
    return head + b"[" * depth + b"]" * depth + b"}"


def _mutate(raw: bytes, at: int, junk: bytes) -> bytes:
    at %= len(raw) + 1
    return raw[:at] + junk + raw[at + len(junk):]


BODIES = st.one_of(
    st.builds(_encode, DOCS, st.integers(0, 3)),
    st.builds(_mutate, st.builds(_encode, DOCS, st.integers(0, 3)), st.integers(0, 400),
              st.binary(min_size=1, max_size=4)),
    st.builds(_deep, st.integers(0, 1100), st.booleans()),
    st.binary(max_size=200),
    st.sampled_from([b'{"model":"a","model":"b","stream":true,"stream":false}',
                     b'{"model":"m","stream":true,"stream_options":{"include_usage":"no"}}',
                     b'{"model":"m","n":99999999999999999999999}',
                     b'{"model":"m","x":"\\ud800"}', b'{"model":"\\u0000"}']),
)
UPSTREAM_NAMES = st.sampled_from(["", "same"]) | st.text(min_size=1, max_size=12)


def _attempt(raw: bytes, endpoint: Endpoint, name: str) -> tuple[ParsedRequest, UpstreamBody] | None:
    """Parse and rewrite; ``None`` for a refusal, which must be a 400 ``InvalidRequest``."""
    try:
        req = parse(raw, endpoint)
        up_name = req.model if name == "same" else (name or req.model + "-upstream")
        return req, upstream_body(raw, req, up_name)
    except InvalidRequest as e:
        assert isinstance(e, GatewayError) and e.status == 400
        assert e.message and e.type == "invalid_request_error"
        return None


def check(raw: bytes, endpoint: Endpoint, name: str) -> bool:
    """Every property of one attempt; whether the gateway accepted the body."""
    out = _attempt(raw, endpoint, name)  # anything but InvalidRequest propagates and fails
    if out is None:
        return False
    req, up = out
    client = orjson.loads(raw)
    sent = orjson.loads(up.body)
    assert isinstance(sent, dict)
    # Every member but model and stream_options is the client's, unchanged.
    keep = set(client) - {"model", "stream_options"}
    assert set(sent) - {"model", "stream_options"} == keep
    assert {k: sent[k] for k in keep} == {k: client[k] for k in keep}
    assert sent["model"] == (req.model if name == "same" else (name or req.model + "-upstream"))
    opts = client.get("stream_options")
    if req.stream:
        # Literal true, whatever the client wrote: the engine reads exactly what we count on.
        so = sent["stream_options"]
        assert so["include_usage"] is True and so["continuous_usage_stats"] is True
        ours = ("include_usage", "continuous_usage_stats")
        assert {k: v for k, v in so.items() if k not in ours} == {
            k: v for k, v in (opts or {}).items() if k not in ours}
        # What the client didn't ask for is hidden from it.
        assert up.hide_usage_event == (not req.include_usage)
        assert up.strip_chunk_usage == (not (req.include_usage and req.continuous_usage))
    else:
        assert ("stream_options" in sent) == ("stream_options" in client)
        assert sent.get("stream_options") == opts
        assert not up.hide_usage_event and not up.strip_chunk_usage
    # Nothing to change (same name; not a stream, or one that already asks for literal true
    # usage): the client's bytes go upstream as they came, spacing and key order included.
    literal_true = (isinstance(opts, dict) and opts.get("include_usage") is True
                    and opts.get("continuous_usage_stats") is True)
    if name == "same" and (not req.stream or literal_true):
        assert up.body == raw
    return True


@FUZZ
@given(raw=BODIES, endpoint=st.sampled_from(ENDPOINTS), name=UPSTREAM_NAMES)
def test_any_bytes_are_accepted_soundly_or_refused_with_a_400(raw: bytes, endpoint: Endpoint,
                                                               name: str) -> None:
    check(raw, endpoint, name)


# Requests a client would plausibly send, so that most are accepted and the properties of what
# goes upstream get exercised (random bytes are almost always refused).
PLAUSIBLE = st.builds(
    lambda base, extra, style: _encode({**extra, **base}, style),
    st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=16)},
        optional={  # type: ignore[arg-type]
            "stream": st.booleans() | st.none(),
            "stream_options": st.dictionaries(
                st.sampled_from(["include_usage", "continuous_usage_stats", "other"]),
                st.sampled_from([True, False, None, "true", "no", 1, 0, "x"]), max_size=3),
            "max_tokens": st.integers(0, 10**6),
            "n": st.integers(1, 8),
            "messages": JSON,
        },
    ),
    st.dictionaries(st.text(max_size=10), JSON, max_size=3),
    st.integers(0, 3),
)


@FUZZ
@given(raw=PLAUSIBLE, endpoint=st.sampled_from(ENDPOINTS), name=UPSTREAM_NAMES)
def test_plausible_requests_go_upstream_with_only_model_and_usage_changed(
    raw: bytes, endpoint: Endpoint, name: str
) -> None:
    check(raw, endpoint, name)


def test_the_plausible_strategy_mostly_reaches_the_accepting_path() -> None:
    """Guard against the property test above silently testing only refusals."""
    accepted = 0

    @settings(max_examples=100, deadline=None, database=None)
    @given(raw=PLAUSIBLE)
    def count(raw: bytes) -> None:
        nonlocal accepted
        accepted += check(raw, ENDPOINTS[0], "same")

    count()
    assert accepted >= 30


_PYDANTIC_BOOL = TypeAdapter(bool)


@FUZZ
@given(value=LAX | JSON)
def test_lax_bool_never_disagrees_with_pydantic(value: Any) -> None:
    """vLLM's request models read these flags with pydantic. Where both read a value they must
    read it alike; the gateway may refuse more (floats), or accept surrounding whitespace,
    because for streams it sends the engine its own literal ``true`` anyway."""
    try:
        theirs: bool | None = _PYDANTIC_BOOL.validate_json(orjson.dumps(value))
    except ValidationError:
        theirs = None
    try:
        ours: bool | None = lax_bool(value, "flag")
    except InvalidRequest as e:
        assert e.param == "flag" and e.status == 400
        ours = None
    if ours is not None and theirs is not None:
        assert ours == theirs
    if theirs is not None and not isinstance(value, float):
        assert ours == theirs, f"pydantic reads {value!r} as {theirs}; the gateway refused it"


@pytest.mark.parametrize("depth", [253, 254, 255, 1022, 1023, 1024, 1025])
def test_nesting_at_the_encoders_limits_is_a_400_or_accepted(depth: int) -> None:
    """The edges the random depths may miss: orjson writes 254 levels and reads 1024."""
    for stream in (True, False):
        out = _attempt(_deep(depth, stream), ENDPOINTS[0], "same")
        if out is not None:
            assert orjson.loads(out[1].body)["model"] == "m"
