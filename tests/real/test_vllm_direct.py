"""The real vLLM server, spoken to directly: what the gateway can rely on from its upstream.

These pin down vLLM's own behaviour (status codes, error bodies, streaming and usage shape) so
that a vLLM upgrade that changes it fails here, next to the fact, instead of somewhere deep in
the gateway tests. ``ignore_eos`` keeps generation lengths exact despite random weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

if TYPE_CHECKING:
    from conftest import VLLMServer

pytestmark = pytest.mark.real

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the fleet."}]
EXACT: dict[str, Any] = {"ignore_eos": True}  # vLLM sampling extension: run to max_tokens


@pytest.fixture
def client(vllm_server: VLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(
        base_url=vllm_server.v1, api_key=vllm_server.api_key, max_retries=0, timeout=60
    )
    yield c
    c.close()


def test_chat(client: openai.OpenAI, vllm_server: VLLMServer) -> None:
    r = client.chat.completions.create(
        model=vllm_server.model,
        messages=HI,
        max_tokens=4,
        extra_body=EXACT,
    )
    assert r.model == vllm_server.model
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4


def test_streamed_chat_ends_with_a_usage_chunk_when_asked(
    client: openai.OpenAI, vllm_server: VLLMServer
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=vllm_server.model,
            messages=HI,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    *body, last = chunks
    assert all(c.model == vllm_server.model for c in chunks)
    assert sum(1 for c in body if c.choices and c.choices[0].delta.content) >= 2
    assert all(c.usage is None for c in body)
    assert [c.choices[0].finish_reason for c in body if c.choices][-1] == "length"
    # The usage chunk is separate and has no choices.
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6


def test_streamed_chat_has_no_usage_unless_asked(
    client: openai.OpenAI, vllm_server: VLLMServer
) -> None:
    # So a gateway that counts tokens must ask for usage itself, and then must not show the
    # extra chunk to a client that didn't ask.
    chunks = list(
        client.chat.completions.create(
            model=vllm_server.model,
            messages=HI,
            max_tokens=3,
            stream=True,
            extra_body=EXACT,
        )
    )
    assert len(chunks) >= 2
    assert all(c.usage is None for c in chunks)


def test_completions(client: openai.OpenAI, vllm_server: VLLMServer) -> None:
    r = client.completions.create(
        model=vllm_server.model, prompt="hello world", max_tokens=4, extra_body=EXACT
    )
    assert r.model == vllm_server.model
    assert r.object == "text_completion"
    assert isinstance(r.choices[0].text, str)
    assert r.usage is not None
    assert r.usage.completion_tokens == 4


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key"], ids=["no-key", "wrong-key"])
def test_rejects_a_missing_or_wrong_key_with_a_bare_401(
    vllm_server: VLLMServer, auth: str | None, record_property: Any
) -> None:
    headers = {"Authorization": auth} if auth else {}
    body = {"model": vllm_server.model, "messages": HI, "max_tokens": 1}
    r = httpx.post(f"{vllm_server.v1}/chat/completions", json=body, headers=headers, timeout=30)
    record_property("status", r.status_code)
    record_property("body", r.text)
    # Not OpenAI's {"error": {"message", "type", ...}} envelope: the gateway must never pass
    # this through to a client as if it were the client's fault.
    assert r.status_code == 401
    assert r.json() == {"error": "Unauthorized"}


def test_openai_client_sees_401_as_authentication_error(vllm_server: VLLMServer) -> None:
    c = openai.OpenAI(base_url=vllm_server.v1, api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(
            model=vllm_server.model,
            messages=HI,
            max_tokens=1,
            extra_headers={"Authorization": openai.Omit()},  # send no key at all
        )
    c.close()


def test_health_needs_no_key_but_models_does(vllm_server: VLLMServer) -> None:
    assert httpx.get(f"{vllm_server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{vllm_server.v1}/models", timeout=10).status_code == 401
    r = httpx.get(
        f"{vllm_server.v1}/models",
        headers={"Authorization": f"Bearer {vllm_server.api_key}"},
        timeout=10,
    )
    assert [m["id"] for m in r.json()["data"]] == [vllm_server.model]


def test_unknown_model_is_404_in_openai_envelope(
    client: openai.OpenAI, vllm_server: VLLMServer
) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert isinstance(e.value.body, dict)
    assert e.value.body["param"] == "model"
    assert "no-such-model" in e.value.body["message"]


def test_footprint(vllm_server: VLLMServer, record_property: Any) -> None:
    mem = vllm_server.memory_kib()
    record_property("startup_s", round(vllm_server.startup_s, 1))
    record_property("rss_mib", mem["rss"] // 1024)
    record_property("pss_mib", mem["pss"] // 1024)
    print(
        f"\nvLLM tiny server: up in {vllm_server.startup_s:.1f} s; "
        f"{mem['processes']} processes, RSS {mem['rss'] // 1024} MiB, PSS {mem['pss'] // 1024} MiB"
    )
    # CI has 24 GB for everything; a tiny model that needs more than this is a regression.
    assert mem["pss"] < 6 * 1024 * 1024
