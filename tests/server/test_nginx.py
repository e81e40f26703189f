"""The documented nginx front (``examples/nginx.conf``), run for real: Debian's nginx with that
file (ports and paths changed, nothing else), a CA made by the test, and the official ``openai``
client streaming through it to a real ``fleetgate serve``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from certs import CA
from helpers import create_key, free_port, gateway, sim

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
MSG = [{"role": "user", "content": "hi"}]

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (scripts/test.sh installs Debian's nginx)")


def local_config(text: str, prefix: Path, port: int, gw_port: int, cert: Path, key: Path) -> str:
    """The example with only its listen port, upstream, certificate and file paths changed."""
    subs = [
        (r"listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;"),
        (r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{gw_port};"),
        (r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};"),
        (r"pid \S+;", f"pid {prefix / 'nginx.pid'};"),
        (r"error_log \S+ warn;", f"error_log {prefix / 'error.log'} warn;"),
    ]
    for pattern, new in subs:
        text, n = re.subn(pattern, new, text)
        assert n == 1, f"examples/nginx.conf no longer has {pattern!r}"
    temp = "".join(f"    {d}_temp_path {prefix / d};\n"
                   for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return text.replace("http {\n", "http {\n" + temp, 1)


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, object]]:
    # Not under pytest's 0700 temp dir: nginx's workers (user nobody) need to reach their
    # temp paths.
    prefix = Path(tempfile.mkdtemp(prefix="fg-nginx-"))
    os.chmod(prefix, 0o755)
    try:
        ca = CA(prefix)
        cert = ca.issue("localhost", server=True)
        with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "20") as sim_url:
            cfg = prefix / "gw.yaml"
            cfg.write_text(
                "auth: {mode: keys}\n"
                f"store: {{url: 'sqlite:///{prefix / 'fg.db'}'}}\n"
                "models:\n"
                "  - name: chat\n"
                "    served_name: upstream-name\n"
                f"    backend: {{type: static, urls: ['{sim_url}']}}\n")
            key = create_key(cfg, "alice")
            gw_port, port = free_port(), free_port()
            with gateway(cfg, gw_port):
                conf = prefix / "nginx.conf"
                conf.write_text(local_config(EXAMPLE.read_text(), prefix, port, gw_port,
                                             cert.cert, cert.key))
                argv = [str(NGINX), "-p", str(prefix), "-c", str(conf)]
                check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
                assert check.returncode == 0, check.stderr
                p = subprocess.Popen([*argv, "-g", "daemon off;"], start_new_session=True)
                ctx = ssl.create_default_context(cafile=str(ca.pem))
                url = f"https://localhost:{port}"
                try:
                    deadline = time.monotonic() + 20
                    while True:
                        assert p.poll() is None, (prefix / "error.log").read_text()
                        with contextlib.suppress(httpx.HTTPError):
                            if httpx.get(url + "/ready", verify=ctx, timeout=1).is_success:
                                break
                        assert time.monotonic() < deadline, "nginx did not come up"
                        time.sleep(0.1)
                    yield {"url": url, "key": key, "ctx": ctx, "ca": ca.pem}
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGQUIT)  # graceful stop, workers included
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait(timeout=5)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def client(stack: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=stack["key"], max_retries=0,
                         http_client=httpx.Client(verify=stack["ctx"]), timeout=30)


def test_streams_through_nginx_event_by_event(stack: dict) -> None:
    c = client(stack)
    arrivals: list[float] = []
    text = ""
    for chunk in c.chat.completions.create(model="chat", messages=MSG, max_tokens=10,
                                           stream=True):
        arrivals.append(time.monotonic())
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text
    # 10 tokens at 20 tokens/s: ~0.5 s. Buffered by nginx, they would all arrive at the end.
    assert arrivals[-1] - arrivals[0] > 0.2, "the stream was buffered"
    r = c.chat.completions.create(model="chat", messages=MSG, max_tokens=2)
    assert r.choices[0].message.content


def test_nginx_speaks_http2_to_clients(stack: dict) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [curl, "-sS", "--http2", "--cacert", str(stack["ca"]), "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", f"{stack['url']}/health"],
        capture_output=True, text=True, timeout=30)
    assert out.stdout == "2 200", out.stderr


def test_nginx_refuses_a_body_over_client_max_body_size(stack: dict) -> None:
    r = httpx.post(f"{stack['url']}/v1/chat/completions", verify=stack["ctx"], timeout=30,
                   headers={"Authorization": f"Bearer {stack['key']}"},
                   content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413
