"""The gateway in front of a real vLLM server, driven with the official ``openai`` client.

The gateway holds the only copy of vLLM's ``--api-key``; clients hold gateway keys made with
``fleetgate keys create``. So every successful call here also proves that the gateway swapped
the client's key for the upstream one, and every ``model`` field proves the public name was
mapped to vLLM's served name and back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

if TYPE_CHECKING:
    from conftest import Gateway

pytestmark = pytest.mark.real

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the fleet."}]
EXACT: dict[str, Any] = {"ignore_eos": True}  # forwarded untouched to vLLM: run to max_tokens


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=60)
    yield c
    c.close()


def test_chat(client: openai.OpenAI, gateway: Gateway) -> None:
    r = client.chat.completions.create(
        model=gateway.model,
        messages=HI,
        max_tokens=4,
        extra_body=EXACT,
    )
    assert r.model == gateway.model
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 4


def test_streamed_chat_with_usage(client: openai.OpenAI, gateway: Gateway) -> None:
    chunks = list(
        client.chat.completions.create(
            model=gateway.model,
            messages=HI,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    *body, last = chunks
    assert all(c.model == gateway.model for c in chunks)
    assert sum(1 for c in body if c.choices and c.choices[0].delta.content) >= 2
    assert all(c.usage is None for c in body)
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6


def test_streamed_chat_without_usage_shows_none(client: openai.OpenAI, gateway: Gateway) -> None:
    # Whatever the gateway asks upstream for its own accounting, a client that didn't ask for
    # usage doesn't get a usage chunk.
    chunks = list(
        client.chat.completions.create(
            model=gateway.model,
            messages=HI,
            max_tokens=3,
            stream=True,
            extra_body=EXACT,
        )
    )
    assert len(chunks) >= 2
    assert all(c.model == gateway.model for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_completions(client: openai.OpenAI, gateway: Gateway) -> None:
    r = client.completions.create(
        model=gateway.model, prompt="hello world", max_tokens=4, extra_body=EXACT
    )
    assert r.model == gateway.model
    assert isinstance(r.choices[0].text, str)
    assert r.usage is not None
    assert r.usage.completion_tokens == 4


def test_models_list_shows_the_public_name(client: openai.OpenAI, gateway: Gateway) -> None:
    ids = [m.id for m in client.models.list()]
    assert gateway.model in ids
    assert gateway.upstream.model not in ids


def test_no_key_is_rejected(gateway: Gateway) -> None:
    c = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(
            model=gateway.model,
            messages=HI,
            max_tokens=1,
            extra_headers={"Authorization": openai.Omit()},  # send no Authorization header
        )
    c.close()
    _assert_envelope(e.value)


def test_wrong_key_is_rejected(gateway: Gateway) -> None:
    c = openai.OpenAI(base_url=gateway.v1, api_key="fg-wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model=gateway.model, messages=HI, max_tokens=1)
    c.close()
    _assert_envelope(e.value)


def test_upstream_key_is_not_a_gateway_key(gateway: Gateway) -> None:
    # vLLM's own key must not open the gateway, and the client's key must not open vLLM.
    c = openai.OpenAI(
        base_url=gateway.v1, api_key=gateway.upstream.api_key, max_retries=0, timeout=30
    )
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=gateway.model, messages=HI, max_tokens=1)
    c.close()
    r = httpx.post(
        f"{gateway.upstream.v1}/completions",
        json={"model": gateway.upstream.model, "prompt": "x", "max_tokens": 1},
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=30,
    )
    assert r.status_code == 401


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HI, max_tokens=1)
    _assert_envelope(e.value)


def test_upstream_served_name_is_not_a_public_name(client: openai.OpenAI, gateway: Gateway) -> None:
    # Only the public name routes; vLLM's served name is an internal detail.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=gateway.upstream.model, prompt="x", max_tokens=1)


def _assert_envelope(err: openai.APIStatusError) -> None:
    """The gateway's errors use OpenAI's envelope, not vLLM's bare ``{"error": "Unauthorized"}``."""
    body = err.body
    assert isinstance(body, dict), body
    assert isinstance(body.get("message"), str) and body["message"], body
