"""Request parsing and the upstream body, pinned down where the mutation run found the module
tests silent: the error code of each refusal, the lenient booleans vLLM accepts, the smallest
legal values, what is forwarded untouched, and a model's upstream name."""

from __future__ import annotations

import orjson
import pytest

from fleetgate import config
from fleetgate.dataplane.request import CHAT, COMPLETIONS, parse, upstream_body
from fleetgate.dataplane.routes import ModelRoute
from fleetgate.errors import InvalidRequest


def body(**fields: object) -> bytes:
    return orjson.dumps({"model": "m", **fields})


@pytest.mark.parametrize(("raw", "code"), [
    (b"", "invalid_request"),
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b"null", "invalid_json"),
    (b"{}", "missing_model"),
    (b'{"model": ""}', "missing_model"),
    (b'{"model": "m", "stream": "yes"}', "invalid_request"),
])
def test_each_refusal_has_its_code_and_a_message(raw: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(raw, CHAT)
    assert e.value.error_code == code and e.value.status == 400
    assert isinstance(e.value.message, str) and e.value.message


@pytest.mark.parametrize(("value", "want"), [
    (0, False), (1, True), (False, False), (True, True), (" TRUE ", True), ("off", False),
])
def test_usage_flags_accept_what_vllm_accepts(value: object, want: bool) -> None:
    req = parse(body(stream=True, stream_options={"include_usage": value,
                                                  "continuous_usage_stats": value}), CHAT)
    assert (req.include_usage, req.continuous_usage) == (want, want)


@pytest.mark.parametrize("value", [2, -1, "2", 0.5, [], {}])
def test_usage_flags_refuse_what_vllm_refuses(value: object) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(body(stream=True, stream_options={"include_usage": value}), CHAT)
    assert e.value.param == "stream_options.include_usage"
    assert "include_usage" in e.value.message


@pytest.mark.parametrize(("fields", "max_tokens", "n"), [
    ({"n": 1, "max_tokens": 0}, 0, 1),
    ({"max_completion_tokens": 0}, 0, 1),
    ({"max_completion_tokens": 0, "max_tokens": 9}, 0, 1),
    ({"n": 3, "max_tokens": 16}, 16, 3),
    ({"n": None, "max_tokens": None}, None, 1),
])
def test_the_smallest_legal_values_and_larger_ones_are_read_as_sent(
    fields: dict[str, object], max_tokens: int | None, n: int
) -> None:
    req = parse(body(**fields), CHAT)
    assert (req.max_tokens, req.n) == (max_tokens, n)


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 0}, "n"), ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"), ({"n": "2"}, "n"),
])
def test_a_refused_number_names_the_field_and_the_minimum(
    fields: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(body(**fields), CHAT)
    assert e.value.param == param and param in e.value.message


def test_size_is_the_body_length() -> None:
    raw = body(prompt="x" * 100)
    assert parse(raw, COMPLETIONS).size == len(raw)


def test_a_stream_that_already_asks_for_literal_usage_is_forwarded_byte_for_byte() -> None:
    raw = (b'{"model": "m", "stream": true, '
           b'"stream_options": {"include_usage": true, "continuous_usage_stats": true}}')
    up = upstream_body(raw, parse(raw, CHAT), "m")
    assert up.body is raw
    assert not up.hide_usage_event and not up.strip_chunk_usage


@pytest.mark.parametrize("opts", [
    {"include_usage": True},
    {"continuous_usage_stats": True},
    {"include_usage": "true", "continuous_usage_stats": True},
    {"include_usage": True, "continuous_usage_stats": False},
])
def test_a_stream_missing_either_literal_is_rewritten_keeping_the_clients_options(
    opts: dict[str, object]
) -> None:
    raw = body(stream=True, stream_options={**opts, "vendor_option": [1, 2]})
    up = upstream_body(raw, parse(raw, CHAT), "m")
    assert up.body != raw
    assert orjson.loads(up.body)["stream_options"] == {
        "include_usage": True, "continuous_usage_stats": True, "vendor_option": [1, 2]}


def models(*entries: dict[str, object]) -> tuple[config.ModelSettings, ...]:
    return config.parse({"models": [
        {**e, "backend": {"type": "static", "urls": ["http://127.0.0.1:9"]}} for e in entries
    ]}).models


def test_a_model_without_served_name_is_forwarded_under_its_own_name() -> None:
    plain, renamed = models({"name": "demo"}, {"name": "pub", "served_name": "internal"})
    for m, upstream in ((plain, "demo"), (renamed, "internal")):
        route = ModelRoute.build(m)
        assert route.upstream_name == upstream
        raw = orjson.dumps({"model": m.name, "stream": True, "prompt": "x"})
        sent = orjson.loads(upstream_body(raw, parse(raw, COMPLETIONS), route.upstream_name).body)
        assert sent["model"] == upstream
    assert ModelRoute.build(plain).rewrite is None
