"""The paths under test, each started as its own process(es) in front of the same upstream.

- ``direct``: the upstream itself (nginx, or the simulator for streams);
- ``fleetgate``: ``fleetgate serve`` from this checkout, keys auth ON, usage accounting ON,
  SQLite store in the run's scratch directory;
- ``vllm-router``: the Rust router, ``--worker-urls UPSTREAM --policy round_robin`` (no auth);
- ``litellm``: the LiteLLM proxy, 1 worker, a master key, no database.

Peers run from their own virtualenvs under ``bench/.venvs/`` (made by ``bench/run``).
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from bench.procs import Proc, Procs, wait_http
from bench.upstream import MODEL
from fleetgate.localnet import free_port

VENVS = Path(__file__).resolve().parent / ".venvs"
ALL = ("direct", "fleetgate", "vllm-router", "litellm")
LITELLM_MASTER_KEY = "sk-bench-" + "m" * 24


@dataclass
class Running:
    name: str
    url: str  # base URL, no trailing slash
    key: str | None  # what goes after "Bearer "
    proc: Proc | None  # None for "direct"

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 80

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


# -- FleetGate ------------------------------------------------------------------------------------


def fleetgate_config(workdir: Path, upstream: str, *, upstream_max_connections: int = 1000,
                     db_name: str = "fleetgate.db") -> Path:
    # The server's connection cap (server.http.max_connections, 10,000 by default) must not be
    # what a many-streams scenario measures: keep it above the streams it opens.
    http = {"max_connections": max(10_000, upstream_max_connections + 1_000)}
    doc = {
        "server": {"host": "127.0.0.1", "upstream_max_connections": upstream_max_connections,
                   "http": http},
        "auth": {"mode": "keys"},
        "store": {"url": f"sqlite:///{workdir / db_name}"},
        "models": [{"name": MODEL, "backend": {"type": "static", "urls": [upstream]}}],
    }
    path = workdir / f"fleetgate-{db_name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def create_key(config: Path) -> str:
    """One key, through the same library calls as ``fleetgate keys create``."""
    from fleetgate import config as config_mod
    from fleetgate.cli.keys import create_key as _create

    return _create(config_mod.load(str(config)), name="bench", models=None, expires=None)


def bulk_keys(config: Path, n: int, key_file: Path, batch: int = 10_000) -> None:
    """Insert ``n`` keys in bulk (same digest and prefix as the CLI) and write them to a file."""
    import datetime as dt

    from sqlalchemy import insert

    from fleetgate import config as config_mod
    from fleetgate.auth import keys as keyfmt
    from fleetgate.store.db import migrate, open_engine
    from fleetgate.store.tables import api_keys

    engine = open_engine(config_mod.load(str(config)).store.url)
    migrate(engine)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with key_file.open("w") as f:
        for start in range(0, n, batch):
            rows, ks = [], []
            for i in range(start, min(n, start + batch)):
                k = keyfmt.generate()
                ks.append(k)
                rows.append({"name": f"bench-{i}", "prefix": keyfmt.display_prefix(k),
                             "digest": keyfmt.digest(k), "models": None, "admin": False,
                             "created_at": now, "expires_at": None, "updated_at": now})
            with engine.begin() as conn:
                conn.execute(insert(api_keys), rows)
            f.write("\n".join(ks) + "\n")
    engine.dispose()


def start_fleetgate(procs: Procs, config: Path, key: str | None, *, name: str = "fleetgate",
                    extra: list[str] | None = None) -> Running:
    port = free_port()
    argv = [sys.executable, "-c", "from fleetgate.cli.main import main; main()",
            "serve", "--config", str(config), "--port", str(port), *(extra or [])]
    p = procs.start(name, argv)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", 60, p)
    return Running("fleetgate", url, key, p)


# -- peers ----------------------------------------------------------------------------------------


def peer_binary(venv: str, exe: str) -> Path | None:
    p = VENVS / venv / "bin" / exe
    return p if p.exists() else None


def start_router(procs: Procs, upstream: str) -> Running:
    exe = peer_binary("router", "vllm-router")
    if exe is None:
        raise FileNotFoundError("vllm-router is not installed (run bench/run)")
    port = free_port()
    p = procs.start("vllm-router", [str(exe), "--host", "127.0.0.1", "--port", str(port),
                                    "--worker-urls", upstream, "--policy", "round_robin",
                                    "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", 90, p)
    return Running("vllm-router", url, None, p)


def start_litellm(procs: Procs, upstream: str, workdir: Path) -> Running:
    exe = peer_binary("litellm", "litellm")
    if exe is None:
        raise FileNotFoundError("litellm is not installed (run bench/run)")
    cfg = workdir / "litellm.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": upstream + "/v1",
            "api_key": "sk-upstream-" + secrets.token_hex(8)}}],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }))
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "NO_PROXY": "*",
           "PATH": f"{exe.parent}:{os.environ.get('PATH', '')}"}
    p = procs.start("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1",
                                "--port", str(port), "--num_workers", "1"], env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", 180, p)
    return Running("litellm", url, LITELLM_MASTER_KEY, p)


def start(name: str, procs: Procs, upstream: str, workdir: Path, *,
          fleetgate_extra: list[str] | None = None) -> Running:
    """Start path ``name`` in front of ``upstream`` (for FleetGate: a fresh store and key)."""
    if name == "direct":
        return Running("direct", upstream, None, None)
    if name == "fleetgate":
        cfg = fleetgate_config(workdir, upstream)
        return start_fleetgate(procs, cfg, create_key(cfg), extra=fleetgate_extra)
    if name == "vllm-router":
        return start_router(procs, upstream)
    if name == "litellm":
        return start_litellm(procs, upstream, workdir)
    raise ValueError(f"unknown path {name!r}; known: {', '.join(ALL)}")
