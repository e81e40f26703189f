"""Process helpers shared by the test tiers: free ports, waiting for HTTP, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from fleetgate import config
from fleetgate.app import Gateway
from fleetgate.localnet import free_port, wait_http  # noqa: F401  (re-exported for tests)

FLEETGATE = [sys.executable, "-c", "from fleetgate.cli.main import main; main()"]


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def sim(model: str = "sim", *args: str, port: int | None = None) -> Iterator[str]:
    """A `fleetgate sim` process; yields its base URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [*FLEETGATE, "sim", "--port", str(port), "--model", model, *args],
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextlib.contextmanager
def gateway(config: Path, port: int, *args: str) -> Iterator[str]:
    """A `fleetgate serve` process (``args`` appended, e.g. ``--workers 2``); yields its base URL.

    Its stdout and stderr go to ``gateway-PORT.log`` beside the config.
    """
    log = open(config.parent / f"gateway-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*FLEETGATE, "serve", "--config", str(config), "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def create_key(config: Path, name: str, *extra: str) -> str:
    out = subprocess.run(
        [*FLEETGATE, "keys", "create", "--config", str(config), "--name", name, *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def settings_for(tmp: Path, upstream: str, **over: Any) -> config.Settings:
    doc: dict[str, Any] = {
        "auth": {"mode": "keys", "revocation_poll_s": 0.2},
        "store": {"url": f"sqlite:///{tmp / 'fg.db'}"},
        "server": {"max_body_bytes": 64 * 1024},
        "models": [
            {"name": "sim", "served_name": "upstream-name", "api_key": "upstream-secret-key",
             "backend": {"type": "static", "urls": [upstream]}},
            {"name": "other", "served_name": "upstream-name", "api_key": "upstream-secret-key",
             "backend": {"type": "static", "urls": [upstream]}},
        ],
    }
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return config.parse(doc)


class GW:
    """An in-process gateway with its lifespan run, plus an httpx client on ASGITransport."""

    def __init__(self, app: Gateway, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    def key(self, name: str = "k", models: list[str] | None = None, **kw: Any) -> str:
        """A key made by the same service as ``fleetgate keys create``."""
        from sqlalchemy import update

        from fleetgate.services import Context
        from fleetgate.services.keys import create_key
        from fleetgate.store.tables import api_keys

        assert self.app.engine is not None
        k, rec = create_key(Context(self.app.engine, self.app.settings), name=name, models=models,
                            admin=kw.get("admin", False), user=kw.get("user"))
        if kw.get("expires_at") is not None:  # the service refuses a key expired already
            with self.app.engine.begin() as c:
                c.execute(update(api_keys).where(api_keys.c.id == rec.id)
                          .values(expires_at=kw["expires_at"]))
        return k


def cli(cfg: Path, *args: str) -> str:
    """A ``fleetgate`` command against ``cfg`` (``--config`` appended); its stdout."""
    out = subprocess.run([*FLEETGATE, *args, "--config", str(cfg)], check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout


def new_key(cfg: Path, name: str, *extra: str) -> str:
    """``fleetgate keys create``: the key, alone on stdout's last line."""
    return cli(cfg, "keys", "create", "--name", name, *extra).strip().splitlines()[-1]


def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` every 0.1 s; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def asgi(send: Any) -> Any:
    """A relay's responder over an ASGI ``send`` that records messages (no request side)."""
    from fleetgate.api.exchange import AsgiExchange

    async def no_receive() -> dict[str, Any]:
        raise AssertionError("the relay never reads the request")

    return AsgiExchange({"type": "http", "headers": []}, no_receive, send)
