"""Conformance: the official `openai` client against real gateway and simulator processes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from helpers import create_key, free_port, gateway, sim

from fleetgate.store import repo
from fleetgate.store.db import open_engine


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("conformance")
    with sim("upstream-name", "--ttft-ms", "20", "--tokens-per-s", "200",
             "--api-key", "up-key-123") as sim_url:
        cfg = tmp / "gw.yaml"
        cfg.write_text(
            "auth: {mode: keys, revocation_poll_s: 0.2}\n"
            f"store: {{url: 'sqlite:///{tmp / 'fg.db'}'}}\n"
            "models:\n"
            "  - name: chat\n"
            "    served_name: upstream-name\n"
            "    api_key: ${UP_KEY}\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
            "  - name: locked\n"
            "    served_name: upstream-name\n"
            "    api_key: up-key-123\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
        )
        (tmp / ".env").write_text("UP_KEY=up-key-123\n")
        key = create_key(cfg, "alice", "--models", "chat")
        port = free_port()
        with gateway(cfg, port) as url:
            yield {"url": url, "key": key, "sim": sim_url, "cfg": cfg, "tmp": tmp}


def client(stack: dict, key: str | None = None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=key or stack["key"], **kw)


def test_chat(stack):
    r = client(stack).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert r.model == "chat"
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_streamed_chat_with_usage(stack):
    chunks = list(client(stack).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.model == "chat" for c in chunks)


def test_streamed_chat_without_usage_sees_no_usage_chunk(stack):
    chunks = list(client(stack).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
    ))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_completions_and_embeddings(stack):
    c = client(stack)
    r = c.completions.create(model="chat", prompt="once upon", max_tokens=3)
    assert r.choices[0].text and r.usage.completion_tokens == 3
    e = c.embeddings.create(model="chat", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) > 0


def test_error_classes(stack):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.AuthenticationError):
        client(stack, key="fg-" + "x" * 43).chat.completions.create(model="chat", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        client(stack, key="sk-not-a-fleetgate-key").chat.completions.create(
            model="chat", messages=msgs)
    r = httpx.post(stack["url"] + "/v1/chat/completions", json={"model": "chat", "messages": msgs})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.NotFoundError) as nf:
        client(stack).chat.completions.create(model="no-such-model", messages=msgs)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client(stack).chat.completions.create(model="locked", messages=msgs)
    with pytest.raises(openai.BadRequestError):
        client(stack).chat.completions.create(model="chat", messages=msgs, max_tokens=-3)


def test_models_list(stack):
    ids = [m.id for m in client(stack).models.list()]
    assert ids == ["chat"]  # filtered by the key's allow-list


def test_usage_is_accounted_per_key(stack):
    c = client(stack)
    for _ in range(3):
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a b c"}],
                                  max_tokens=7)
    list(c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a"}],
                                   max_tokens=9, stream=True))
    engine = open_engine(f"sqlite:///{stack['tmp'] / 'fg.db'}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = repo.usage_totals(engine)
        if rows and sum(r["completion_tokens"] for r in rows) >= 3 * 7 + 9:
            break
        time.sleep(0.2)
    assert rows and all(r["key_id"] is not None for r in rows)
    # the streamed request didn't ask for usage, yet its 9 tokens are counted
    assert sum(r["completion_tokens"] for r in rows) >= 3 * 7 + 9
    keys = repo.list_keys(engine)
    assert keys[0].last_used_at is not None


def test_client_disconnect_aborts_the_upstream(stack):
    before = httpx.get(stack["sim"] + "/sim/stats").json()["disconnects_total"]
    slow = client(stack)
    stream = slow.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "go"}], max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(stack["sim"] + "/sim/stats").json()["disconnects_total"] > before:
            break
        time.sleep(0.05)
    assert httpx.get(stack["sim"] + "/sim/stats").json()["disconnects_total"] > before


def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request)
        out = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            out += part
            if b"\r\n\r\n" in out and b"content-length: " in out.lower():
                head, _, body = out.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    return out


@pytest.mark.parametrize(
    "path",
    [
        b"//v1/chat/completions",
        b"/v1/../v1/chat/completions",
        b"/v1/./chat/completions",
        b"/v1/chat%2Fcompletions",
        b"/v1/chat/completions%2F..%2F..%2Fadmin",
        b"/%2e%2e/v1/chat/completions",
        b"http://evil/v1/chat/completions",
        b"/v1/chat/completions?x=/../../admin",
        b"/tokenize",
        b"/metrics",
    ],
)
def test_raw_path_tricks_without_a_key_never_reach_upstream(stack, path):
    before = httpx.get(stack["sim"] + "/sim/stats").json()["requests_total"]
    body = b'{"model":"chat","messages":[{"role":"user","content":"x"}]}'
    req = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    out = _raw(stack["url"], req)
    status = int(out.split(b" ", 2)[1])
    assert status in (400, 401, 404, 405), out[:300]
    assert httpx.get(stack["sim"] + "/sim/stats").json()["requests_total"] == before


def test_revoked_key_refused_by_running_gateway(stack):
    from click.testing import CliRunner

    from fleetgate.cli.main import cli

    key = create_key(stack["cfg"], "bob")
    c = client(stack, key=key)
    c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    listing = CliRunner().invoke(cli, ["keys", "list", "--config", str(stack["cfg"])]).output
    assert key not in listing
    bob_id = [ln.split()[0] for ln in listing.splitlines() if " bob " in ln][0]
    res = CliRunner().invoke(cli, ["keys", "revoke", "--config", str(stack["cfg"]), bob_id])
    assert res.exit_code == 0
    time.sleep(1.5)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])


def test_gateway_log_holds_no_secret(stack):
    log = next(Path(stack["tmp"]).glob("gateway-*.log")).read_text()
    assert stack["key"] not in log
    assert "up-key-123" not in log
