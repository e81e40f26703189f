"""Real `fleetgate serve` processes for the end-to-end fleet tests, and the guard that no
process a test started (a gateway, a replica it launched, a simulator) outlives the test.

Every process of a test carries ``FLEETGATE_TEST_TAG=<random>`` in its environment: the tests
set it on the gateways and simulators they start, and the ``local`` launcher passes the
gateway's environment on to the replicas it launches. So the guard finds a replica whatever
became of its gateway (a SIGKILLed gateway's replicas are re-parented to init, out of reach of
a parent/child walk). The ``fleet`` fixture (``conftest.py``) stops its gateways at teardown,
then kills and reports anything still tagged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import openai
from fleet_helpers import local_backend
from helpers import free_port

from fleetgate.auth import keys as keyfmt
from fleetgate.fleet.launchers.local import processes
from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine

FLEETGATE = [sys.executable, "-c", "from fleetgate.cli.main import main; main()"]
TAG_VAR = "FLEETGATE_TEST_TAG"
T = TypeVar("T")


def until(pred: Callable[[], T | None], timeout_s: float, what: str, every_s: float = 0.05) -> T:
    """Poll ``pred`` until it returns something truthy; that value. Fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        time.sleep(every_s)


def tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries this test's tag."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for pid, state, _, _ in processes():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if state != "Z" and needle in env.split(b"\0"):
            out.append(pid)
    return out


def sim_model(tmp: Path, name: str, *sim_args: str, **policy: Any) -> dict[str, Any]:
    """A model whose engine is `fleetgate sim` started by the local launcher."""
    backend = policy.pop("backend", {})
    return {"name": name, "backend": local_backend(tmp, *sim_args, **backend), **policy}


class Gateway:
    """One `fleetgate serve` process, with an admin key and a key for its models."""

    def __init__(self, tmp: Path, doc: dict[str, Any], env: dict[str, str], name: str) -> None:
        self.tmp = tmp
        self.doc = doc
        self.port = int(doc["server"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(json.dumps(doc))  # JSON is YAML
        self.log_path = tmp / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*FLEETGATE, "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=env,
            start_new_session=True,
        )
        self.admin_key = ""
        self.user_key = ""

    def wait_ready(self, timeout_s: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/ready", timeout=1).status_code == 200
            return False

        until(ready, timeout_s, "gateway /ready")

    def log(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # --- clients -----------------------------------------------------------------------------

    def client(self, key: str | None = None, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.user_key, **kw)

    def sse_lines(self, body: dict[str, Any]) -> list[tuple[float, str]]:
        """POST a streaming chat request as a raw client; every non-empty SSE line, with its
        arrival time (s since the request). Asserts the stream's 200 and content type."""
        t0 = time.monotonic()
        lines = []
        headers = {"authorization": f"Bearer {self.user_key}"}
        with httpx.stream(
            "POST", f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=30
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line:
                    lines.append((time.monotonic() - t0, line))
        return lines

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url + path, headers=headers, timeout=10)

    def status(self, model: str) -> dict[str, Any]:
        r = self.get(f"/v1/fleet/status?model={model}", self.admin_key)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()["models"][0]
        return doc

    def metrics(self) -> str:
        r = self.get("/metrics", self.admin_key)
        assert r.status_code == 200, r.text
        return r.text

    def replicas(self, model: str, state: str | None = None) -> list[dict[str, Any]]:
        reps: list[dict[str, Any]] = self.status(model)["replicas"]
        return [r for r in reps if state is None or r["state"] == state]

    # --- ending --------------------------------------------------------------------------------

    def terminate(self, timeout_s: float = 30) -> str:
        """SIGTERM (what a service manager sends) and wait: ``"clean"`` after a graceful
        shutdown, else what happened."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.exit_status(self.proc.wait(timeout=timeout_s))
        finally:
            self._log.close()

    def exit_status(self, rc: int) -> str:
        # uvicorn re-raises the SIGTERM it handled once its shutdown is complete.
        if rc in (0, -signal.SIGTERM) and "Application shutdown complete." in self.log(5):
            return "clean"
        return f"exit status {rc}:\n{self.log()}"

    def kill(self) -> None:
        """SIGKILL: the gateway dies without any clean-up, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


class Fleet:
    """Starts gateways and simulators for one test, all tagged for the leak guard."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = uuid.uuid4().hex
        self.env = {**os.environ, TAG_VAR: self.tag, "PYTHONUNBUFFERED": "1"}
        self.gateways: list[Gateway] = []
        self.sims: list[subprocess.Popen[bytes]] = []
        self.state_dir = tmp / "state"
        self.log_dir = tmp / "logs"
        self.db = tmp / "fg.db"
        self._keys: tuple[str, str] | None = None

    def config(self, models: list[dict[str, Any]], **sections: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": free_port(), "shutdown_grace_s": 10},
            "auth": {"mode": "keys"},
            "store": {"url": f"sqlite:///{self.db}"},
            "fleet": {"state_dir": str(self.state_dir), "control_interval_s": 0.2},
            "models": models,
        }
        for k, v in sections.items():
            doc[k] = {**doc.get(k, {}), **v}
        return doc

    def _make_keys(self) -> tuple[str, str]:
        """An admin key and a plain key allowed every model, in the store gateways share."""
        if self._keys is None:
            engine = open_engine(f"sqlite:///{self.db}")
            try:
                migrate(engine)
                made = []
                for name, admin in (("admin", True), ("user", False)):
                    k = keyfmt.generate()
                    repo.insert_key(
                        engine,
                        name=name,
                        prefix=keyfmt.display_prefix(k),
                        digest=keyfmt.digest(k),
                        models=None,
                        expires_at=None,
                        admin=admin,
                    )
                    made.append(k)
            finally:
                engine.dispose()
            self._keys = (made[0], made[1])
        return self._keys

    def gateway(self, doc: dict[str, Any], wait: bool = True) -> Gateway:
        gw = Gateway(self.tmp, doc, self.env, f"gateway-{len(self.gateways)}")
        gw.admin_key, gw.user_key = self._make_keys()
        self.gateways.append(gw)
        if wait:
            gw.wait_ready()
        return gw

    def sim(self, port: int, model: str, *args: str) -> subprocess.Popen[bytes]:
        """A simulator someone else runs (a static backend's URL)."""
        p = subprocess.Popen(
            [*FLEETGATE, "sim", "--port", str(port), "--model", model, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        self.sims.append(p)
        return p

    def close(self) -> list[str]:
        """Stop everything; return what had to be killed because it was left behind."""
        for gw in self.gateways:
            if gw.proc.poll() is None:
                try:
                    gw.terminate(timeout_s=30)
                except subprocess.TimeoutExpired:
                    gw.kill()
        for p in self.sims:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        leaked = []
        for pid in tagged_pids(self.tag):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            leaked.append(f"{pid}: {cmd[:200]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return leaked
