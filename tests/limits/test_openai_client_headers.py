"""The refusals and headers as the official ``openai`` client sees them, over real HTTP.

A tiny stdlib HTTP server admits each request through the memory backend and answers with the
refusal's envelope and headers, or a minimal chat completion with the grant's headers. It checks
what the gateway relies on: ``RateLimitError`` carries the headers, the client's own retry waits
``retry-after-ms`` and then succeeds, and ``insufficient_quota`` is not retried.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import orjson
import pytest
from helpers import free_port

from fleetgate.errors import GatewayError
from fleetgate.limits.backend import admit
from fleetgate.limits.memory import MemoryBackend
from fleetgate.limits.spec import Checks, Limits, Quota, Subject

KEY, TEAM = Subject("key", "k1"), Subject("group", "team")
COMPLETION = {
    "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class Server:
    def __init__(self) -> None:
        self.backend = MemoryBackend()
        self.checks = Checks()
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        self.drain_first = False  # empty the buckets just before the first request is admitted


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["content-length"]))
            doc = orjson.loads(body)
            with state.lock:  # the memory backend runs on one event loop; here, one lock
                if state.drain_first and not state.statuses:
                    with contextlib.suppress(GatewayError):
                        for _ in range(10_000):
                            state.backend.admit(state.checks, 1)
                try:
                    g = admit(state.backend, state.checks, body_bytes=len(body),
                              max_tokens=doc.get("max_tokens"))
                    status, out, headers = 200, orjson.dumps(COMPLETION), g.headers
                    g.settle(1, 1)  # type: ignore[union-attr]
                except GatewayError as e:
                    status, out, headers = e.status, e.to_bytes(), e.headers
                state.statuses.append(status)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=10)


def chat(client: openai.OpenAI) -> object:
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)


def test_rate_limit_error_carries_the_headers(server: tuple[Server, str]) -> None:
    state, url = server
    state.checks = Checks.of([(KEY, Limits(rpm=2, tpm=10_000))])
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    ok = chat(client)
    assert ok.headers["x-ratelimit-limit-requests"] == "2"  # type: ignore[attr-defined]
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"  # type: ignore[attr-defined]
    assert ok.headers["x-ratelimit-limit-tokens"] == "10000"  # type: ignore[attr-defined]
    chat(client)
    with pytest.raises(openai.RateLimitError) as e:
        chat(client)
    h = e.value.response.headers
    assert e.value.code == "rate_limit_exceeded"
    assert int(h["retry-after"]) >= 1 and int(h["retry-after-ms"]) > 0
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in h and f"x-ratelimit-{name}-tokens" in h
    assert h["x-ratelimit-remaining-requests"] == "0"


def test_the_clients_own_retry_waits_and_succeeds(server: tuple[Server, str]) -> None:
    state, url = server
    state.checks = Checks.of([(KEY, Limits(rpm=300))])  # one request every 0.2 s
    state.drain_first = True  # the first request finds the bucket empty: 429, wait 0.2 s
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=3)
    chat(client)
    assert state.statuses[0] == 429 and state.statuses[-1] == 200
    assert len(state.statuses) <= 3  # it waited what retry-after-ms said, not less


def test_insufficient_quota_is_not_retried(server: tuple[Server, str]) -> None:
    state, url = server
    state.checks = Checks.of([], [(TEAM, Quota(10, "day"))])
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=3)
    with pytest.raises(openai.RateLimitError) as e:
        chat(client)
    assert e.value.code == "insufficient_quota"
    assert "tokens left" in e.value.message and "resets at" in e.value.message
    assert state.statuses == [429]  # x-should-retry: false
