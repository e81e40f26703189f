"""The request parser and the upstream body: tables of cases, pure functions."""

from __future__ import annotations

import orjson
import pytest

from fleetgate.dataplane.request import CHAT, COMPLETIONS, EMBEDDINGS, parse, upstream_body
from fleetgate.errors import InvalidRequest


def body(**fields: object) -> bytes:
    return orjson.dumps({"model": "m", **fields})


@pytest.mark.parametrize(
    ("fields", "stream", "include_usage"),
    [
        ({}, False, False),
        ({"stream": True}, True, False),
        ({"stream": None}, False, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
        # vLLM's pydantic reads these strings as false: so must the gateway.
        ({"stream": True, "stream_options": {"include_usage": "false"}}, True, False),
        ({"stream": True, "stream_options": {"include_usage": "no"}}, True, False),
        ({"stream": True, "stream_options": {"include_usage": "0"}}, True, False),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, True, True),
        ({"stream": True, "stream_options": {"include_usage": None}}, True, False),
        ({"stream": True, "stream_options": {}}, True, False),
    ],
)
def test_stream_and_usage_read_as_vllm_reads_them(
    fields: dict[str, object], stream: bool, include_usage: bool
) -> None:
    req = parse(body(**fields), CHAT)
    assert (req.stream, req.include_usage) == (stream, include_usage)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "maybe"}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"stream": 0}, "stream"),
        ({"stream": [True]}, "stream"),
        ({"stream_options": "x"}, "stream_options"),
        ({"stream_options": {"include_usage": "sometimes"}}, "stream_options.include_usage"),
        ({"stream_options": {"continuous_usage_stats": 5}}, "stream_options.continuous_usage_stats"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"n": False}, "n"),
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_fields_are_400_naming_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(body(**fields), CHAT)
    assert e.value.param == param and e.value.status == 400


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[1,2]", b'"model"', b"null", b'{"model": "m"'],
)
def test_bodies_that_are_not_objects_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse(raw, CHAT)


def test_smallest_legal_values_are_accepted() -> None:
    req = parse(body(n=1, max_tokens=0), COMPLETIONS)
    assert (req.n, req.max_tokens) == (1, 0)
    assert parse(body(max_tokens=5, max_completion_tokens=7), CHAT).max_tokens == 7
    assert parse(body(), CHAT).max_tokens is None and parse(body(), CHAT).n == 1


def test_embeddings_cannot_stream() -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(body(stream=True), EMBEDDINGS)
    assert e.value.param == "stream"
    assert parse(body(stream=False), EMBEDDINGS).stream is False


def test_body_forwarded_byte_for_byte_when_nothing_changes() -> None:
    raw = b'{ "model" : "m",  "prompt": "x", "unknown": {"kept": [1, 2]} }'
    up = upstream_body(raw, parse(raw, COMPLETIONS), "m")
    assert up.body is raw and not up.hide_usage_event and not up.strip_chunk_usage


def test_rename_rewrites_only_the_model() -> None:
    raw = body(prompt="x", extra={"a": 1})
    up = upstream_body(raw, parse(raw, COMPLETIONS), "internal-name")
    doc = orjson.loads(up.body)
    assert doc == {"model": "internal-name", "prompt": "x", "extra": {"a": 1}}


@pytest.mark.parametrize(
    ("opts", "hide_final", "strip_chunks"),
    [
        (None, True, True),
        ({"include_usage": "false"}, True, True),
        ({"include_usage": True}, False, True),
        ({"include_usage": True, "continuous_usage_stats": True}, False, False),
        ({"include_usage": "true", "continuous_usage_stats": "1"}, False, False),
    ],
)
def test_streams_always_ask_for_literal_usage(
    opts: dict[str, object] | None, hide_final: bool, strip_chunks: bool
) -> None:
    fields: dict[str, object] = {"stream": True, "prompt": "x"}
    if opts is not None:
        fields["stream_options"] = opts
    raw = body(**fields)
    up = upstream_body(raw, parse(raw, COMPLETIONS), "m")
    sent = orjson.loads(up.body)["stream_options"]
    assert sent["include_usage"] is True and sent["continuous_usage_stats"] is True
    assert (up.hide_usage_event, up.strip_chunk_usage) == (hide_final, strip_chunks)


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    deep = b'{"model": "m", "stream": true, "prompt": ' + b"[" * 600 + b"]" * 600 + b"}"
    req = parse(deep, COMPLETIONS)
    with pytest.raises(InvalidRequest) as e:
        upstream_body(deep, req, "m")
    assert e.value.error_code == "invalid_json"


def test_keepalive_comments_carry_the_launchers_note_on_one_line() -> None:
    from fleetgate.dataplane.waiting import KEEPALIVE, keepalive_comment

    assert keepalive_comment("") == KEEPALIVE
    c = keepalive_comment("queued in SLURM: Resources\r\ndata: {\"fake\": 1}")
    assert c.startswith(b": waiting for the model to start (queued in SLURM: Resources")
    assert c.endswith(b"\n\n") and c.count(b"\n") == 2  # an injected line stays in the comment
