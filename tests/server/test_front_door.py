"""Hostile clients against a real ``fleetgate serve`` (FleetGate's server, uvloop), each followed
by a normal request through the official ``openai`` client that must still be answered. The
normal request's latency is printed beside a baseline (``-s`` shows it); no timing is asserted.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from helpers import create_key, free_port, gateway, sim

HEADER_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("front")
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0") as sim_url:
        cfg = tmp / "gw.yaml"
        cfg.write_text(
            "auth: {mode: keys}\n"
            f"store: {{url: 'sqlite:///{tmp / 'fg.db'}'}}\n"
            f"server: {{http: {{header_timeout_s: {HEADER_TIMEOUT_S}}}}}\n"
            "models:\n"
            "  - name: chat\n"
            "    served_name: upstream-name\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
        )
        key = create_key(cfg, "alice")
        with gateway(cfg, free_port()) as url:
            yield {"url": url, "key": key}


def normal_request(front: dict[str, str]) -> float:
    """One chat completion through the official client; its latency in ms."""
    c = openai.OpenAI(base_url=front["url"] + "/v1", api_key=front["key"], max_retries=0,
                      timeout=10)
    t0 = time.perf_counter()
    r = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=3)
    ms = (time.perf_counter() - t0) * 1000
    assert r.choices[0].message.content
    c.close()
    return ms


def baseline(front: dict[str, str]) -> float:
    return min(normal_request(front) for _ in range(5))


def _port(front: dict[str, str]) -> int:
    return int(front["url"].rsplit(":", 1)[1])


def _read_all(s: socket.socket, within_s: float = 5) -> bytes:
    s.settimeout(within_s)
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_slowloris_heads_are_cut_with_408_and_others_are_served(front: dict[str, str]) -> None:
    base = baseline(front)
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", _port(front)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        during = normal_request(front)
        print(f"\nslowloris (300 half-sent heads): a normal request took {during:.1f} ms "
              f"(baseline {base:.1f} ms)")
        time.sleep(HEADER_TIMEOUT_S + 1.5)
        answers = [_read_all(s, 2) for s in socks[:20]]
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:2]
    finally:
        for s in socks:
            s.close()
    assert normal_request(front) > 0


def test_a_1mb_header_gets_431_and_others_are_served(front: dict[str, str]) -> None:
    base = baseline(front)
    s = socket.create_connection(("127.0.0.1", _port(front)))
    try:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: "
                + b"a" * (1024 * 1024) + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            s.sendall(head)
        answer = _read_all(s)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b'"code":"request_headers_too_large"' in answer
    after = normal_request(front)
    print(f"\n1 MB header: answered 431; a normal request then took {after:.1f} ms "
          f"(baseline {base:.1f} ms)")


def test_2000_idle_connections_leave_the_gateway_answering(front: dict[str, str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2000 + 512
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-file hard limit ({hard}) is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    base = baseline(front)
    socks = []
    try:
        for _ in range(2000):
            socks.append(socket.create_connection(("127.0.0.1", _port(front))))
        during = normal_request(front)
        print(f"\n2,000 idle connections: a normal request took {during:.1f} ms "
              f"(baseline {base:.1f} ms)")
        # None of them was refused (a 503 would be waiting to be read).
        for s in socks[::100]:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        # And the idle ones are closed after header_timeout_s, without an answer.
        time.sleep(HEADER_TIMEOUT_S + 1.5)
        assert all(_read_all(s, 2) == b"" for s in socks[:20])
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_access_log_goes_through_logging_without_the_query_string(tmp_path: Path) -> None:
    import subprocess

    from helpers import FLEETGATE, stop, wait_http

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("auth: {mode: none}\n"
                   f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\n")
    port = free_port()
    log = tmp_path / "gw.log"
    with log.open("wb") as out:
        p = subprocess.Popen([*FLEETGATE, "serve", "--config", str(cfg), "--port", str(port),
                              "--access-log"], stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health?api_key=fg-secretsecretsecret", 30, p)
        finally:
            stop(p)
    text = log.read_text()
    assert '"GET /health HTTP/1.1" 200' in text
    assert "fleetgate.access" in text and "secretsecret" not in text
