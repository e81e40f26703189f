"""Pure parts of the simulator: request parsing, generated text, embeddings, options."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fleetgate.sim import synth
from fleetgate.sim.options import SimOptions
from fleetgate.sim.shapes import SimError, StreamShapes, parse_embedding, parse_generation

MSG = [{"role": "user", "content": "one two three"}]


@pytest.mark.parametrize(
    ("body", "tokens", "finish", "choices", "prompt_tokens", "usage"),
    [
        ({"messages": MSG}, 16, "stop", 1, 3, False),
        ({"messages": MSG, "max_tokens": 4}, 4, "length", 1, 3, False),
        ({"messages": MSG, "max_tokens": 4, "max_completion_tokens": 2}, 2, "length", 1, 3, False),
        ({"messages": MSG, "max_tokens": 10**6}, 4096, "length", 1, 3, False),
        ({"messages": MSG, "n": 3}, 16, "stop", 3, 3, False),
        (
            {"messages": MSG, "stream": True, "stream_options": {"include_usage": True}},
            16,
            "stop",
            1,
            3,
            True,
        ),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, 16, "stop", 1, 3, False),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a b"}, {"type": "image_url"}],
                    }
                ]
            },
            16,
            "stop",
            1,
            2,
            False,
        ),
        ({"messages": [{"role": "user", "content": ""}]}, 16, "stop", 1, 1, False),
    ],
)
def test_parse_chat(
    body: dict[str, Any], tokens: int, finish: str, choices: int, prompt_tokens: int, usage: bool
) -> None:
    req = parse_generation("chat", {"model": "m", **body})
    assert (req.tokens, req.finish_reason, req.choices, req.prompt_tokens, req.include_usage) == (
        tokens,
        finish,
        choices,
        prompt_tokens,
        usage,
    )


@pytest.mark.parametrize(
    ("prompt", "choices", "prompt_tokens"),
    [("a b c", 1, 3), (["a", "b c"], 2, 3), ([1, 2, 3, 4], 1, 4), ([[1, 2], [3]], 2, 3)],
)
def test_parse_completion_prompts(prompt: Any, choices: int, prompt_tokens: int) -> None:
    req = parse_generation("completion", {"model": "m", "prompt": prompt})
    assert (req.choices, req.prompt_tokens) == (choices, prompt_tokens)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {}, "messages"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": MSG, "max_tokens": 0}, "max_tokens"),
        ("chat", {"messages": MSG, "max_tokens": "5"}, "max_tokens"),
        ("chat", {"messages": MSG, "max_tokens": True}, "max_tokens"),
        ("chat", {"messages": MSG, "n": 0}, "n"),
        ("completion", {}, "prompt"),
        ("completion", {"prompt": [1, "a"]}, "prompt"),
    ],
)
def test_parse_rejects(kind: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(SimError) as e:
        parse_generation(kind, {"model": "m", **body})
    assert e.value.status == 400 and e.value.param == param


def test_stream_events_are_json() -> None:
    req = parse_generation("chat", {"model": "m", "messages": MSG, "max_tokens": 2, "stream": True})
    ev = StreamShapes(req, 123)
    events = [ev.role(0), ev.token(0, 0), ev.token(0, 1), ev.final(0), ev.usage()]
    parsed = [orjson.loads(e.removeprefix(b"data: ").removesuffix(b"\n\n")) for e in events]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["delta"]["content"] for p in parsed[1:3]] == ["tok0", " tok1"]
    assert parsed[3]["choices"][0]["finish_reason"] == "length"
    assert parsed[4]["choices"] == [] and parsed[4]["usage"]["total_tokens"] == 5
    assert len({p["id"] for p in parsed}) == 1


def test_text_and_embeddings() -> None:
    assert synth.completion_text(0) == "" and synth.completion_text(3) == "tok0 tok1 tok2"
    assert len(synth.completion_text(4096).split()) == 4096
    assert synth.embed("a", 5) == synth.embed("a", 5) != synth.embed("b", 5)
    items, dim, b64 = parse_embedding({"input": "x", "dimensions": 3}, 16)
    assert (items, dim, b64) == (["x"], 3, False)
    with pytest.raises(SimError):
        parse_embedding({"input": "x", "encoding_format": "int8"}, 16)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"models": ()},
        {"crash_probability": 1.5},
        {"crash_after_requests": 0},
        {"ttft_ms": -1},
        {"embedding_dim": 0},
        {"api_key": ""},
        {"port": 70000},
    ],
)
def test_options_reject(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimOptions(**kwargs)
