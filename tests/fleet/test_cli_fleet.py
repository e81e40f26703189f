"""`fleetgate up/down/status` against the fleet API served by a small stand-in HTTP server
that mounts fleetgate.fleet.api_handlers over a real pool (the simulator as the engine)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner
from fleet_helpers import (
    fleet_dict,
    local_backend,
    make_settings,
    no_leaked_replicas,  # noqa: F401  (autouse: no process outlives a test)
)

from fleetgate.auth.principals import Principal
from fleetgate.cli.fleet import down, status, table, up
from fleetgate.errors import AuthError, GatewayError
from fleetgate.fleet import api_handlers
from fleetgate.fleet.pool import Pool

KEYS = {
    "admin-key": Principal(name="root", admin=True),
    "user-key": Principal(name="alice", models=frozenset({"m"})),
}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[str]:
    settings = make_settings(
        [{"name": "m", "backend": local_backend(tmp_path, "--startup-delay-s", "0.5")}],
        fleet_dict(tmp_path),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def make() -> Pool:
        p = Pool(settings)
        await p.start()
        return p

    pool = run(make())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            try:
                auth = self.headers.get("authorization", "")
                principal = KEYS.get(auth.removeprefix("Bearer "))
                if principal is None:
                    raise AuthError("Invalid API key.")
                url = urlsplit(self.path)
                if self.command == "GET" and url.path == "/v1/fleet/status":
                    model = parse_qs(url.query).get("model", [None])[0]
                    code, doc = run(api_handlers.fleet_status(pool, principal, model))
                else:
                    body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                    h = {
                        "/v1/fleet/up": api_handlers.fleet_up,
                        "/v1/fleet/down": api_handlers.fleet_down,
                    }[url.path]
                    code, doc = run(h(pool, principal, body))
            except GatewayError as e:
                code, doc = e.status, e.body()
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        run(pool.stop(timeout_s=10))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_up_wait_status_down(gateway: str) -> None:
    r = CliRunner()
    env = {"FLEETGATE_API_KEY": "admin-key"}
    res = r.invoke(up, ["m", "--wait", "--timeout", "30", "--url", gateway], env=env)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "m: pending"
    assert "m: healthy (replicas: ready)" in lines[-1]
    res = r.invoke(status, ["--url", gateway], env=env)
    assert res.exit_code == 0, res.output
    head, row = res.output.splitlines()[:2]
    assert head.split()[:6] == ["MODEL", "STATUS", "REPLICA", "STATE", "INFLIGHT", "IDLE"]
    assert row.split()[:2] == ["m", "healthy"] and row.split()[3] == "ready"
    res = r.invoke(status, ["--json", "--model", "m", "--url", gateway], env=env)
    assert json.loads(res.output)["models"][0]["replicas"][0]["state"] == "ready"
    res = r.invoke(down, ["m", "--url", gateway], env={"FLEETGATE_API_KEY": "user-key"})
    assert res.exit_code == 1 and "403: Only an admin key may stop a model." in res.output
    res = r.invoke(down, ["m", "--url", gateway, "--key", "admin-key"])
    assert res.exit_code == 0 and res.output.startswith("m: ")


def test_errors_are_reported_plainly(gateway: str) -> None:
    r = CliRunner()
    res = r.invoke(up, ["nope", "--url", gateway, "--key", "admin-key"])
    assert res.exit_code == 1 and "404: The model 'nope' does not exist." in res.output
    res = r.invoke(status, ["--url", gateway, "--key", "wrong"])
    assert res.exit_code == 1 and "401: Invalid API key." in res.output
    res = r.invoke(status, ["--url", "http://127.0.0.1:9", "--key", "k"])
    assert res.exit_code == 1 and "cannot reach http://127.0.0.1:9" in res.output


def test_table_of_an_idle_fleet() -> None:
    doc = {"models": [{"model": "big", "status": "stopped", "replicas": [], "idle_s": 4000}]}
    assert table(doc).splitlines()[1].split() == ["big", "stopped", "-", "-", "0", "67m", "-"]
