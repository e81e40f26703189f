"""Session fixtures for the real-vLLM tier: a real vLLM OpenAI server on the CPU, and the gateway
in front of it, each a real process on a free loopback port.

Fixtures (all session-scoped, built once and shared by every test in ``tests/real``):

- ``vllm_python``: path to the vLLM virtualenv's interpreter (``scripts/install-vllm.sh``).
- ``tiny_model_dir``: a tiny random-weight Llama built locally (``tiny_model.py``), cached.
- ``vllm_server``: a running ``vllm.entrypoints.openai.api_server`` serving it -> ``VLLMServer``.
- ``gateway``: ``fleetgate serve`` routing a public model name to that server -> ``Gateway``.

A missing vLLM virtualenv is an error, not a skip: a tier that silently skips is a tier that
never runs. ``FLEETGATE_SKIP_REAL=1`` (or ``-m "not real"``) leaves the tier out on purpose.

Every process is started in its own session (process group), and teardown signals the whole
group: vLLM forks an engine core and a worker that must not outlive the test run. A failed
start-up reports the tail of the process's log, and the log stays on disk (its path is in the
failure message and on the yielded object).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NoReturn

import pytest
from vllm_offline import OFFLINE_ENV

from fleetgate.localnet import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SERVED_NAME = "tiny"  # vLLM's --served-model-name
PUBLIC_NAME = "tiny-public"  # what the gateway calls it
UPSTREAM_KEY = "fg-real-upstream-key-not-a-secret"  # vLLM's --api-key; only the gateway knows it

INSTALL_HINT = "scripts/install-vllm.sh"


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _env_on("FLEETGATE_SKIP_REAL"):
        return
    skip = pytest.mark.skip(reason="FLEETGATE_SKIP_REAL=1: real-vLLM tier left out on purpose")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


# -- processes -------------------------------------------------------------------------------



def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it if the pytest process dies first."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


class Proc:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, **popen: Any) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            **popen,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def fail(self, why: str) -> NoReturn:
        pytest.fail(
            f"{self.name} {why}\n--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}",
            pytrace=False,
        )

    def wait_http_ok(self, url: str, timeout_s: float) -> float:
        """Poll ``url`` until it answers 200; return seconds since spawn. Fails on exit/timeout."""
        deadline = self.started + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self.popen.poll()
            if code is not None:
                self.fail(f"exited with status {code} before {url} answered 200")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (OSError, urllib.error.URLError) as e:
                last = str(e)
            time.sleep(0.5)
        self.fail(f"did not answer 200 on {url} within {timeout_s:.0f} s (last: {last})")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after ``grace_s``."""
        try:
            if self.popen.poll() is None or _group_alive(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and _group_alive(self.pid):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout=0.2)
                if _group_alive(self.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=10)
        finally:
            self._log.close()


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(_group_pids(pgid))


def group_memory_kib(pgid: int) -> dict[str, int]:
    """Sum of ``Rss`` and ``Pss`` (KiB) over a process group, from ``/proc/PID/smaps_rollup``.

    RSS counts pages shared between vLLM's processes once per process; PSS splits them, so
    PSS is the better estimate of what the group costs the machine.
    """
    total = {"rss": 0, "pss": 0, "processes": 0}
    for pid in _group_pids(pgid):
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total["processes"] += 1
        for line in lines:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                total[key.lower()] += int(rest.split()[0])
    return total


# -- vLLM --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLLMServer:
    base_url: str  # http://127.0.0.1:PORT, without /v1
    model: str  # the served model name
    api_key: str  # what vLLM's --api-key demands
    log_path: Path
    pid: int  # also the process group id
    startup_s: float  # spawn to first /health 200

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def memory_kib(self) -> dict[str, int]:
        return group_memory_kib(self.pid)


def _load_tiny_model() -> ModuleType:
    # Imported by path: tests/real is not a package, and the module's top level is stdlib only,
    # so the test process can check the marker without torch.
    spec = importlib.util.spec_from_file_location("fleetgate_tiny_model", HERE / "tiny_model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cache_dir() -> Path:
    return Path(os.environ.get("FLEETGATE_CACHE") or "~/.cache/fleetgate").expanduser()


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    venv = Path(os.environ.get("FLEETGATE_VLLM_VENV") or "/opt/fg-vllm")
    python = venv / "bin" / "python"
    env = "" if venv == Path("/opt/fg-vllm") else f"FLEETGATE_VLLM_VENV={venv} "
    how = (
        f"Install it with:  {env}{INSTALL_HINT}\n"
        "or leave this tier out on purpose with FLEETGATE_SKIP_REAL=1 (or -m 'not real')."
    )
    if not python.exists():
        pytest.fail(
            f"the real-vLLM tier needs a vLLM virtualenv at {venv}: none there.\n{how}",
            pytrace=False,
        )
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, sys; "
            "sys.exit(0 if u.find_spec('vllm') and u.find_spec('transformers') else 1)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.fail(
            f"{python} cannot find vllm and transformers (rc={probe.returncode}).\n"
            f"{probe.stderr[-2000:]}\n{how}",
            pytrace=False,
        )
    return python


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_python: Path) -> Path:
    out = cache_dir() / "tiny-llama"
    if _load_tiny_model().is_built(out):
        return out
    r = subprocess.run(
        [str(vllm_python), str(HERE / "tiny_model.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if r.returncode != 0:
        pytest.fail(
            f"building the tiny model failed (rc={r.returncode}):\n{r.stderr[-4000:]}",
            pytrace=False,
        )
    return out


def vllm_argv(python: Path, model_dir: Path, port: int) -> list[str]:
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",  # the `vllm` console script can't find its dist
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        # Skips torch.compile warm-up (~25 s of a cold ~50 s start on 2 cores); the HTTP surface
        # the gateway talks to is the same either way.
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        UPSTREAM_KEY,
    ]


def vllm_env() -> dict[str, str]:
    return {
        **os.environ,
        **OFFLINE_ENV,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def vllm_server(
    vllm_python: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    timeout_s = float(os.environ.get("FLEETGATE_VLLM_START_TIMEOUT", "300"))
    proc = Proc("vLLM", vllm_argv(vllm_python, tiny_model_dir, port), log_path, env=vllm_env())
    started = False
    try:
        base = f"http://127.0.0.1:{port}"
        startup_s = proc.wait_http_ok(f"{base}/health", timeout_s)
        started = True
        yield VLLMServer(base, SERVED_NAME, UPSTREAM_KEY, log_path, proc.pid, startup_s)
    finally:
        # A server still starting up ignores SIGTERM until its engine is up; don't wait for it.
        proc.stop(grace_s=30 if started else 3)


# -- the gateway in front of it -----------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    base_url: str  # http://127.0.0.1:PORT, without /v1
    model: str  # the public model name clients ask for
    api_key: str  # a client key made with `fleetgate keys create`
    config_path: Path
    log_path: Path
    upstream: VLLMServer

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


FLEETGATE = [sys.executable, "-c", "from fleetgate.cli.main import main; main()"]


def gateway_config(upstream: VLLMServer, port: int, db: Path) -> str:
    q = json.dumps  # a JSON string is a valid YAML scalar, whatever it contains
    return (
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        "auth: {mode: keys}\n"
        f"store: {{url: {q('sqlite:///' + str(db))}}}\n"
        "models:\n"
        f"  - name: {q(PUBLIC_NAME)}\n"
        f"    served_name: {q(upstream.model)}\n"
        f"    api_key: {q(upstream.api_key)}\n"
        f"    backend: {{type: static, urls: [{q(upstream.base_url)}]}}\n"
    )


@pytest.fixture(scope="session")
def gateway(vllm_server: VLLMServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("gateway")
    port = free_port()
    cfg = work / "fleetgate.yaml"
    cfg.write_text(gateway_config(vllm_server, port, work / "fg.db"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }

    made = subprocess.run(
        [*FLEETGATE, "keys", "create", "--config", str(cfg), "--name", "real-tier"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env=env,
    )
    lines = made.stdout.strip().splitlines()
    if made.returncode != 0 or not lines:
        pytest.fail(
            f"`fleetgate keys create` failed (rc={made.returncode}):\n"
            f"stdout:\n{made.stdout[-2000:]}\nstderr:\n{made.stderr[-4000:]}",
            pytrace=False,
        )
    key = lines[-1].strip()

    proc = Proc(
        "fleetgate serve",
        [*FLEETGATE, "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
        work / "gateway.log",
        cwd=work,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        proc.wait_http_ok(f"{base}/health", 60)
        yield Gateway(base, PUBLIC_NAME, key, cfg, proc.log_path, vllm_server)
    finally:
        proc.stop(grace_s=15)
