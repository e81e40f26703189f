"""The paths under test, each started as its own process(es) in front of the same upstream.

Every path has a name (``--paths``), a label the report prints, and a line saying how it runs
(:data:`SPECS`). The FleetGate paths differ only in their set-up:

- ``fleetgate``: issue 11's bar set-up, one process: the key belongs to a user in a group, the
  group has an rpm/tpm limit and the user a token quota (set so high that nothing is refused,
  so what is measured is checking and settling them), usage accounting on, keys auth,
  ``limits.backend: memory``;
- ``fleetgate-nolimits``: the same user in the same group with no limit and no quota, so the
  cost of limits (and only of limits) shows in the same run;
- ``fleetgate-nolimits-workers``: a plain key, ``--workers N``: issue 4's set-up (keys and
  accounting, no limits), for its bar;
- ``fleetgate-redis``: the bar set-up, one process, limits counted in Redis;
- ``fleetgate-workers``: the bar set-up, ``--workers N`` (N = cores by default), limits in
  Redis (``--workers`` above 1 is refused with the memory backend when limits exist);
- ``fleetgate-pure``: the bar set-up on the pure-Python build.

Every FleetGate path but ``fleetgate-pure`` runs the build that :data:`tree` names: the compiled
build (``scripts/compiled.sh``'s copy of this checkout, which ``bench/run`` makes at
:data:`COMPILED`) unless the harness runs with ``--build pure``; None, this checkout as Python.

The others: ``direct`` (the upstream itself), ``floor`` (``bench/bare_proxy.py``, the floor for
Python on this box, not a product), ``vllm-router`` (the Rust router, no auth; its own thread
pool uses every core) and ``litellm`` (``--num_workers N``, a master key, no database).

Every FleetGate path start gets a fresh SQLite store, key and, for Redis, its own Redis
database; Redis itself is one ``redis-server`` per run (:class:`Redis`). Peers run from their
own virtualenvs under ``bench/.venvs/`` (made by ``bench/run``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from bench import upstream as upstream_mod
from bench.procs import Proc, Procs, fleetgate_argv, wait_http, wait_listening, wait_tcp
from bench.upstream import MODEL
from fleetgate.localnet import free_port

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / ".venvs"
COMPILED = VENVS / "compiled"  # scripts/compiled.sh's copy of this checkout, made by bench/run
tree: Path | None = None  # where the FleetGate paths import FleetGate from (the harness sets it)


@dataclass(frozen=True)
class Spec:
    name: str
    label: str  # the report's name for it
    how: str  # how it runs, one line ({n}: the worker count)
    limits: str = "none"  # tree_ab.make_key's set-up: "none", "user" or "issue"
    redis: bool = False  # limits.backend: redis
    many: bool = False  # N workers (--workers N / --num_workers N)
    pure: bool = False  # the pure-Python build, whatever the run's --build


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("direct", "direct (upstream alone)",
         "the upstream itself, no gateway (its CPU per request is the upstream's own)"),
    Spec("floor", "floor: Python on this box, bare proxy, not a product",
         "bench/bare_proxy.py, 1 process: uvloop + httptools protocols, key digest in a dict, "
         "`model` parsed, pooled keep-alive upstream, usage counted in memory"),
    Spec("fleetgate", "FleetGate 1 worker, limits (memory)",
         "`fleetgate serve`, 1 process; key of a user in a group with rpm/tpm limits, a quota "
         "on the user, usage accounting on, limits.backend memory", limits="issue"),
    Spec("fleetgate-nolimits", "FleetGate 1 worker, no limits",
         "`fleetgate serve`, 1 process; the same user in the same group, with no limit and no "
         "quota, usage accounting on", limits="user"),
    Spec("fleetgate-nolimits-workers", "FleetGate {n} workers, no limits",
         "`fleetgate serve --workers {n}`; a plain key, usage accounting on (issue 4's set-up)",
         many=True),
    Spec("fleetgate-redis", "FleetGate 1 worker, limits (Redis)",
         "as `fleetgate`, limits.backend redis", limits="issue", redis=True),
    Spec("fleetgate-workers", "FleetGate {n} workers, limits (Redis)",
         "as `fleetgate`, `--workers {n}`, limits.backend redis", limits="issue", redis=True,
         many=True),
    Spec("fleetgate-pure", "FleetGate 1 worker, limits (memory), pure Python",
         "as `fleetgate`, on the pure-Python build (installed without FLEETGATE_USE_MYPYC=1)",
         limits="issue", pure=True),
    Spec("vllm-router", "vllm-router (Rust, no auth)",
         "`vllm-router --policy round_robin`, no auth (its runtime uses every core)"),
    Spec("litellm", "LiteLLM {n} workers", "`litellm --num_workers {n}`, a master key, no "
         "database", many=True),
)}
ALL = tuple(SPECS)
FLEETGATE = tuple(n for n in ALL if n.startswith("fleetgate"))
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
                    extra: list[str] | None = None, pure: bool = False) -> Running:
    """``fleetgate serve`` from :data:`tree` (this checkout as Python when ``pure``)."""
    port = free_port()
    argv = fleetgate_argv("serve", "--config", str(config), "--port", str(port), *(extra or []))
    env = None if pure or tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    p = procs.start(name, argv, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", 60, p)
    argv_extra = list(extra or [])
    if "--workers" in argv_extra:
        wait_listening(port, int(argv_extra[argv_extra.index("--workers") + 1]), 60)
    return Running(name, url, key, p)


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


def start_litellm(procs: Procs, upstream: str, workdir: Path, workers: int = 1) -> Running:
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
    argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", str(workers)]
    if workers > 1:
        # uvicorn's supervisor kills a worker that doesn't answer its health check within 5 s;
        # on a busy 2-core box LiteLLM's workers take longer than that to import, so they were
        # killed and restarted in a loop and served nothing. Patience costs nothing per request.
        argv += ["--timeout_worker_healthcheck", "120"]
    p = procs.start("litellm", argv, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", 180, p)
    return Running("litellm", url, LITELLM_MASTER_KEY, p)


# -- Redis and the FleetGate variants ---------------------------------------------------------------


def start_nginx(procs: Procs, workdir: Path, timeout_s: float = 30) -> tuple[str, Proc]:
    """The fixed-answer upstream (Debian's nginx) on a free port: its URL and process."""
    port = free_port()
    proc = procs.start("nginx", upstream_mod.nginx_argv(workdir / "nginx", port))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", timeout_s, proc)
    return url, proc


class Redis:
    """One ``redis-server`` for a run's Redis paths (Debian's, loopback, nothing on disk).

    Started on first use and stopped with the run's :class:`Procs`. Each path start gets a
    database of its own (:meth:`fresh_url`), so one path's counters never meet another's.
    """

    DATABASES = 1024

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.proc: Proc | None = None
        self.port = 0
        self._db = 0

    def fresh_url(self) -> str:
        if self.proc is None:
            self.port = free_port()
            self.proc = self.procs.start("redis", [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--databases", str(self.DATABASES)])
            wait_tcp(self.port, 20)
        if self._db >= self.DATABASES - 1:
            raise RuntimeError(f"more than {self.DATABASES} Redis path starts in one run")
        self._db += 1
        return f"redis://127.0.0.1:{self.port}/{self._db}"


def start_fleetgate_path(name: str, procs: Procs, upstream: str, workdir: Path, *,
                         workers: int = 1, extra: list[str] | None = None,
                         redis: Redis | None = None, upstream_max_connections: int = 1000,
                         proc_name: str | None = None) -> Running:
    """A FleetGate path (:data:`SPECS`): its own store, key, limits set-up and workers.

    The limits are made through the CLI (``tree_ab.make_key``), the same calls an admin makes.
    """
    from bench.tree_ab import make_key, with_redis

    spec = SPECS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = fleetgate_config(workdir, upstream, upstream_max_connections=upstream_max_connections)
    if spec.redis:
        if redis is None:
            raise ValueError(f"path {name} needs a Redis")
        with_redis(cfg, redis.fresh_url())
    key = create_key(cfg) if spec.limits == "none" else make_key(ROOT, cfg, spec.limits)
    more = ["--workers", str(workers)] if spec.many and workers > 1 else []
    run = start_fleetgate(procs, cfg, key, name=proc_name or name, extra=[*more, *(extra or [])],
                          pure=spec.pure)
    return Running(name, run.url, key, run.proc)


def start(name: str, procs: Procs, upstream: str, workdir: Path, *,
          fleetgate_extra: list[str] | None = None, workers: int = 1,
          redis: Redis | None = None) -> Running:
    """Start path ``name`` in front of ``upstream``; ``workers`` is N for the N-worker paths."""
    if name == "direct":
        return Running("direct", upstream, None, None)
    if name == "floor":
        from bench.server_ab import start_floor

        return start_floor(procs, upstream, "sk-floor-" + secrets.token_hex(16), "floor")
    if name in FLEETGATE:
        return start_fleetgate_path(name, procs, upstream, workdir / name, workers=workers,
                                    extra=fleetgate_extra, redis=redis)
    if name == "vllm-router":
        return start_router(procs, upstream)
    if name == "litellm":
        return start_litellm(procs, upstream, workdir, workers)
    raise ValueError(f"unknown path {name!r}; known: {', '.join(ALL)}")
