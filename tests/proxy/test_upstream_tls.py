"""``https://`` upstreams: verified by default (system CAs, or ``server.upstream_tls.ca_file``),
with SNI, through the official ``openai`` client in front of an in-process gateway, and the
simulator behind TLS with a CA this test makes."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import settings_for

from fleetgate.app import create_app
from fleetgate.localnet import free_port
from fleetgate.sim.app import SimApp
from fleetgate.sim.options import SimOptions

TOKEN = "tls-test-static-token-123"


def _pem(obj: object) -> bytes:
    if isinstance(obj, ec.EllipticCurvePrivateKey):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    assert isinstance(obj, x509.Certificate)
    return obj.public_bytes(serialization.Encoding.PEM)


def make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate it signed for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetgate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(_pem(ca))
    (d / "server.pem").write_bytes(_pem(cert))
    (d / "server.key").write_bytes(_pem(key))
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture(scope="module")
async def tls_sim(tmp_path_factory) -> AsyncIterator[tuple[int, Path, list[str]]]:
    """The simulator behind TLS on loopback; yields (port, CA file, SNI names it saw)."""
    d = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_server_cert(d)
    port = free_port()
    seen_sni: list[str] = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, c: seen_sni.append(name or "")  # type: ignore[assignment]
    app = SimApp(SimOptions(models=("upstream-name",), port=port, ttft_ms=0, tokens_per_s=0,
                            api_key="upstream-secret-key"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    server.config.load()
    server.config.ssl = ctx  # our own context, to see the SNI
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started
    yield port, ca, seen_sni
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def _gateway_client(tmp: Path, url: str, **tls: object):
    s = settings_for(tmp, url, auth={"mode": "static", "tokens": [TOKEN]},
                     server={"upstream_tls": tls} if tls else {})
    app = create_app(s)
    await app.startup()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=TOKEN, http_client=http,
                                max_retries=0)
    return app, http, client


async def _chat(client: openai.AsyncOpenAI) -> tuple[str, str]:
    r = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    stream = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hello"}], max_tokens=3, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    return r.choices[0].message.content or "", text


async def test_https_upstream_verified_against_the_configured_ca_with_sni(tmp_path, tls_sim):
    port, ca, seen_sni = tls_sim
    app, http, client = await _gateway_client(tmp_path, f"https://localhost:{port}",
                                              ca_file=str(ca))
    try:
        whole, streamed = await _chat(client)
        assert whole == streamed == "tok0 tok1 tok2"
        assert "localhost" in seen_sni  # the upstream's host name went out as SNI
    finally:
        await http.aclose()
        await app.shutdown()


async def test_https_upstream_with_an_unknown_ca_is_refused_by_default(tmp_path, tls_sim):
    port, _, _ = tls_sim
    app, http, client = await _gateway_client(tmp_path, f"https://127.0.0.1:{port}")
    try:
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
        assert e.value.status_code == 502
        assert "TLS" in str(e.value.body)
    finally:
        await http.aclose()
        await app.shutdown()


async def test_verification_can_be_turned_off_explicitly(tmp_path, tls_sim):
    port, _, _ = tls_sim
    app, http, client = await _gateway_client(tmp_path, f"https://127.0.0.1:{port}",
                                              verify=False)
    try:
        assert (await _chat(client))[0] == "tok0 tok1 tok2"
    finally:
        await http.aclose()
        await app.shutdown()
