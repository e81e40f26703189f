"""Native TLS on a real ``fleetgate serve``, through the official ``openai`` client with
``httpx.Client(verify=...)`` and a CA the test makes; and mutual TLS, where a client without a
certificate is refused."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from certs import CA
from helpers import FLEETGATE, create_key, free_port, sim, stop

MSG = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def tls_gateway(tmp: Path, sim_url: str, tls: str, ctx: ssl.SSLContext) -> Iterator[str]:
    cfg = tmp / "gw.yaml"
    cfg.write_text(
        "auth: {mode: keys}\n"
        f"store: {{url: 'sqlite:///{tmp / 'fg.db'}'}}\n"
        f"server: {{tls: {tls}}}\n"
        "models:\n"
        "  - name: chat\n"
        "    served_name: upstream-name\n"
        f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
    )
    port = free_port()
    log = (tmp / "gw.log").open("wb")
    p = subprocess.Popen([*FLEETGATE, "serve", "--config", str(cfg), "--port", str(port)],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert p.poll() is None, (tmp / "gw.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", verify=ctx, timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the TLS gateway did not come up"
            time.sleep(0.1)
        yield url
    finally:
        stop(p)
        log.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d)
    client_ca = CA(d, "client CA")
    return {"dir": d, "ca": ca, "server": ca.issue("gateway", server=True),
            "client_ca": client_ca, "client": client_ca.issue("alice", server=False),
            "stranger": CA(d, "other CA").issue("mallory", server=False)}


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0") as url:
        yield url


def test_native_tls_with_the_openai_client(tmp_path: Path, pki: dict, sim_url: str) -> None:
    ca, srv = pki["ca"], pki["server"]
    ctx = ssl.create_default_context(cafile=str(ca.pem))
    tls = f"{{cert_file: '{srv.cert}', key_file: '{srv.key}'}}"
    with tls_gateway(tmp_path, sim_url, tls, ctx) as url:
        key = create_key(tmp_path / "gw.yaml", "alice")
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                          http_client=httpx.Client(verify=ctx))
        r = c.chat.completions.create(model="chat", messages=MSG, max_tokens=3)
        assert r.choices[0].message.content
        chunks = list(c.chat.completions.create(model="chat", messages=MSG, max_tokens=4,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        # Plain HTTP on the TLS port gets nothing useful, and no answer in the clear.
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http") + "/health", timeout=3)
        # A client that doesn't trust the CA refuses the gateway.
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()


def test_mutual_tls_refuses_a_client_without_a_good_certificate(
        tmp_path: Path, pki: dict, sim_url: str) -> None:
    ca, srv, client = pki["ca"], pki["server"], pki["client"]
    tls = (f"{{cert_file: '{srv.cert}', key_file: '{srv.key}', "
           f"client_ca_file: '{pki['client_ca'].pem}'}}")
    with_cert = ssl.create_default_context(cafile=str(ca.pem))
    with_cert.load_cert_chain(str(client.cert), str(client.key))
    with tls_gateway(tmp_path, sim_url, tls, with_cert) as url:
        key = create_key(tmp_path / "gw.yaml", "alice")
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                          http_client=httpx.Client(verify=with_cert))
        assert c.chat.completions.create(model="chat", messages=MSG, max_tokens=2).choices
        without = ssl.create_default_context(cafile=str(ca.pem))
        nobody = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                               http_client=httpx.Client(verify=without))
        with pytest.raises(openai.APIConnectionError):
            nobody.chat.completions.create(model="chat", messages=MSG, max_tokens=2)
        stranger = ssl.create_default_context(cafile=str(ca.pem))
        stranger.load_cert_chain(str(pki["stranger"].cert), str(pki["stranger"].key))
        bad = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                            http_client=httpx.Client(verify=stranger))
        with pytest.raises(openai.APIConnectionError):
            bad.chat.completions.create(model="chat", messages=MSG, max_tokens=2)


def test_a_bad_certificate_file_stops_serve_with_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\n"
                   f"server: {{tls: {{cert_file: '{tmp_path / 'nope.pem'}', "
                   f"key_file: '{tmp_path / 'nope.key'}'}}}}\n")
    r = subprocess.run([*FLEETGATE, "serve", "--config", str(cfg), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "server.tls" in r.stderr
