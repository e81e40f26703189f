"""The simulator as a real process on a free port, driven by the official ``openai`` client.

Plus the in-process entry points (``running()``, ``SimApp`` under ``httpx.ASGITransport``)
and the CLI's help. Timing checks use generous bounds: they prove a delay exists, not its
precision.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from fleetgate.localnet import free_port
from fleetgate.sim.app import SimApp
from fleetgate.sim.options import SimOptions
from fleetgate.sim.server import running

REPO = Path(__file__).resolve().parents[2]
MODEL = "sim-test"



def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sim:
    """A simulator subprocess on a free port."""

    def __init__(self, *flags: str, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "fleetgate.cli.sim",
            "--port",
            str(self.port),
            "--model",
            MODEL,
        ]
        self.proc = subprocess.Popen(
            [*cmd, *flags],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if wait:
            self.wait_healthy(10.0)

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until /health answered 200."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"simulator not healthy after {timeout}s")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=10)

    def stats(self) -> dict[str, int]:
        return httpx.get(self.url + "/sim/stats").json()

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def fast() -> Iterator[Sim]:
    sim = Sim("--ttft-ms", "0", "--tokens-per-s", "0", "--embedding-dim", "8")
    yield sim
    sim.close()


@pytest.fixture(scope="module")
def paced() -> Iterator[Sim]:
    sim = Sim("--ttft-ms", "300", "--tokens-per-s", "20")
    yield sim
    sim.close()


# -- OpenAI surface ---------------------------------------------------------------------------


def test_health_and_models(fast: Sim) -> None:
    assert httpx.get(fast.url + "/health").json() == {"status": "ok"}
    models = fast.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion(fast: Sim) -> None:
    r = fast.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "three little words"}], max_tokens=5
    )
    assert r.object == "chat.completion" and r.model == MODEL and r.id
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)


def test_chat_defaults_and_max_completion_tokens(fast: Sim) -> None:
    c = fast.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}])
    assert r.usage is not None and r.usage.completion_tokens == 16 and r.usage.prompt_tokens == 1
    assert r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=2, n=2
    )
    assert [ch.message.content for ch in r.choices] == ["tok0 tok1", "tok0 tok1"]
    assert r.usage is not None and r.usage.completion_tokens == 4


def test_chat_stream_with_usage(fast: Sim) -> None:
    stream = fast.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "tok0 tok1 tok2 tok3"
    token_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(token_chunks) == 4
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 2
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_stream_wire_format(fast: Sim) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "stream": True,
    }
    with httpx.stream("POST", fast.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert b'"usage"' not in raw  # only with stream_options.include_usage


def test_completions(fast: Sim) -> None:
    c = fast.client()
    r = c.completions.create(model=MODEL, prompt="once upon a time", max_tokens=3)
    assert r.object == "text_completion"
    assert r.choices[0].text == "tok0 tok1 tok2" and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs is None
    assert r.usage is not None and r.usage.prompt_tokens == 4 and r.usage.total_tokens == 7
    batch = c.completions.create(model=MODEL, prompt=["a", "b c"], max_tokens=1)
    assert [ch.index for ch in batch.choices] == [0, 1]
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "tok0 tok1 tok2"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_embeddings(fast: Sim) -> None:
    c = fast.client()
    r = c.embeddings.create(model=MODEL, input=["hello world", "bye", "hello world"])  # base64 wire
    assert [d.index for d in r.data] == [0, 1, 2]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 8 for v in vecs)
    assert vecs[0] == vecs[2] and vecs[0] != vecs[1]
    assert math.isclose(math.sqrt(sum(x * x for x in vecs[0])), 1.0, rel_tol=1e-4)
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == 5
    f = c.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(vecs[0], rel=1e-5)
    raw = httpx.post(
        fast.url + "/v1/embeddings",
        json={"model": MODEL, "input": "hello world", "encoding_format": "base64", "dimensions": 4},
    ).json()
    assert len(struct.unpack("<4f", base64.b64decode(raw["data"][0]["embedding"]))) == 4


def test_errors(fast: Sim) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        fast.client().chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.status_code == 404
    body = httpx.post(fast.url + "/v1/chat/completions", json={"model": "nope"}).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(fast.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    bad = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
    assert httpx.post(fast.url + "/v1/chat/completions", json=bad).status_code == 400
    assert httpx.get(fast.url + "/v1/nowhere").status_code == 404
    assert httpx.get(fast.url + "/v1/chat/completions").status_code == 405


def test_last_request(fast: Sim) -> None:
    fast.client(api_key="client-key").chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=1,
        extra_headers={"X-Trace": "abc"},
    )
    last = httpx.get(fast.url + "/sim/last-request").json()
    assert last["headers"]["authorization"] == "Bearer client-key"
    assert last["headers"]["x-trace"] == "abc"
    assert last["body"]["max_tokens"] == 1 and last["path"] == "/v1/chat/completions"


# -- timing and disconnects -------------------------------------------------------------------


def test_ttft_and_pacing(paced: Sim) -> None:
    start = time.monotonic()
    stream = paced.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5, stream=True
    )
    first_token_at = None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content and first_token_at is None:
            first_token_at = time.monotonic() - start
    total = time.monotonic() - start
    assert first_token_at is not None and 0.25 <= first_token_at < 3.0
    assert total >= 0.25 + 4 / 20 * 0.8  # ttft, then 4 gaps at 20 tokens/s
    start = time.monotonic()
    paced.client().completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert time.monotonic() - start >= 0.25 + 2 / 20 * 0.8


def test_client_disconnect_stops_stream(paced: Sim) -> None:
    before = paced.stats()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 200,
        "stream": True,
    }
    with httpx.stream("POST", paced.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: {")
            if seen >= 3:
                break
        assert paced.stats()["active_streams"] >= 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = paced.stats()
        if now["disconnects_total"] > before["disconnects_total"] and now["active_streams"] == 0:
            break
        time.sleep(0.05)
    assert now["disconnects_total"] == before["disconnects_total"] + 1
    assert now["completed_total"] == before["completed_total"]
    assert now["active_streams"] == 0
    assert now["tokens_total"] - before["tokens_total"] < 50  # generation stopped early


# -- faults -----------------------------------------------------------------------------------


def test_startup_delay() -> None:
    sim = Sim("--startup-delay-s", "1.5", wait=False)
    try:
        time.sleep(0.5)
        assert sim.proc.poll() is None and not listening(sim.port)
        waited = sim.wait_healthy(10.0)
        assert waited >= 0.5  # 1.5 s in all, of which 0.5 s slept above
    finally:
        sim.close()


def test_hang_on_start() -> None:
    sim = Sim("--hang-on-start", wait=False)
    try:
        time.sleep(1.0)
        assert sim.proc.poll() is None and not listening(sim.port)
    finally:
        sim.close()


def test_crash_after_requests() -> None:
    sim = Sim("--crash-after-requests", "2", "--ttft-ms", "0", "--tokens-per-s", "0")
    try:
        c = sim.client()
        httpx.get(sim.url + "/health")  # control routes never count
        for _ in range(2):
            c.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert sim.proc.wait(timeout=5) == 3
    finally:
        sim.close()


def test_crash_probability() -> None:
    sim = Sim("--crash-probability", "1", "--seed", "7")
    try:
        with pytest.raises(openai.APIConnectionError):
            sim.client().completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert sim.proc.wait(timeout=5) == 3
    finally:
        sim.close()


def test_api_key_and_fail_mid_stream() -> None:
    sim = Sim(
        "--api-key",
        "upstream-secret",
        "--fail-mid-stream-after",
        "3",
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "0",
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            sim.client("wrong").models.list()
        assert httpx.get(sim.url + "/v1/models").status_code == 401
        assert httpx.get(sim.url + "/health").status_code == 200  # /health is open, as in vLLM
        good = sim.client("upstream-secret")
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text

        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10,
            "stream": True,
        }
        headers = {"Authorization": "Bearer upstream-secret"}
        events: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):  # incomplete chunked body
            with httpx.stream(
                "POST", sim.url + "/v1/chat/completions", json=body, headers=headers
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line:
                        events.append(line)
        assert len(events) == 1 + 3  # role chunk, 3 tokens, then the cut: no final, no [DONE]
        assert "[DONE]" not in "".join(events)
        assert sim.stats()["streams_cut_total"] == 1
        assert sim.proc.poll() is None  # a cut stream is not a crash
    finally:
        sim.close()


# -- in-process and CLI -----------------------------------------------------------------------


async def test_running_in_process() -> None:
    exits: list[int] = []
    exited = asyncio.Event()

    def fake_exit(code: int) -> None:
        exits.append(code)
        exited.set()

    opts = SimOptions(models=(MODEL,), port=0, ttft_ms=0, tokens_per_s=0, crash_after_requests=1)
    async with running(opts, exit_fn=fake_exit) as sim:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert r.choices[0].message.content == "tok0 tok1"
        assert sim.app.stats.completed_total == 1
        await client.close()
        await asyncio.wait_for(exited.wait(), 2)  # scheduled after the request finished
    assert exits == [3]


async def test_asgi_transport() -> None:
    app = SimApp(SimOptions(models=(MODEL,), ttft_ms=0, tokens_per_s=0))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "a b", "max_tokens": 2})
        assert r.json()["choices"][0]["text"] == "tok0 tok1"
        assert (await c.get("/sim/stats")).json()["requests_total"] == 1


def test_cli_help_and_validation() -> None:
    from fleetgate.cli.main import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["sim", "--help"])
    assert out.exit_code == 0 and "Examples:" in out.output and "SIMULATOR" in out.output
    bad = runner.invoke(cli, ["sim", "--crash-probability", "2"])
    assert bad.exit_code == 2 and "crash_probability" in bad.output


def test_docs_mention_every_flag() -> None:
    from fleetgate.cli.sim import sim

    doc = (REPO / "docs" / "simulator.md").read_text()
    flags = [o for p in sim.params for o in getattr(p, "opts", []) if o.startswith("--")]
    missing = [f for f in flags if f"`{f}" not in doc]
    assert not missing, f"docs/simulator.md does not mention {missing}"
    for route in ("/sim/stats", "/sim/last-request", "/sim/reset", "/health"):
        assert route in doc
