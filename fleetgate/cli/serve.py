"""``fleetgate serve``, ``fleetgate check-config`` and ``fleetgate demo``."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import click

from fleetgate import config as config_mod
from fleetgate.errors import ConfigError
from fleetgate.localnet import wait_http
from fleetgate.server.options import ServerOptions, TlsOptions


def load_or_exit(path: str) -> config_mod.Settings:
    try:
        return config_mod.load(path)
    except ConfigError as e:
        where = f"{e.path}: " if e.path else ""
        lines = "\n".join(f"  - {p}" for p in e.problems)
        raise click.ClickException(f"invalid config {where}\n{lines}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_WORKER_ENV = "FLEETGATE_WORKER"
# Where this process imported FleetGate from (a site-packages, a checkout, the compiled build).
_HOME = str(Path(__file__).resolve().parents[2])


def self_python(code: str) -> list[str]:
    """``python -c code`` that imports the same FleetGate as this process (with
    :func:`self_env`), whatever its working directory holds: ``-P`` keeps the working directory
    off ``sys.path``, where a checkout's ``fleetgate/`` would otherwise win."""
    return [sys.executable, "-P", "-c", code]


def self_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this process's FleetGate first on the child's ``PYTHONPATH``."""
    before = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": _HOME + (os.pathsep + before if before else "")}


_WORKER_ARGV = self_python("from fleetgate.cli.serve import worker_main; worker_main()")
SERVERS = ("fleetgate", "uvicorn")


def server_options(
    settings: config_mod.Settings, host: str, port: int, *, access_log: bool,
    reuse_port: bool = False,
) -> ServerOptions:
    """``server.*`` settings as the HTTP server's own options."""
    s = settings.server
    h = s.http
    tls = TlsOptions(s.tls.cert_file, s.tls.key_file, s.tls.client_ca_file) if s.tls else None
    return ServerOptions(
        host=host,
        port=port,
        max_header_bytes=h.max_header_bytes,
        max_headers=h.max_headers,
        header_timeout_s=h.header_timeout_s,
        body_min_rate_bytes_s=h.body_min_rate_bytes_s,
        keepalive_timeout_s=h.keepalive_timeout_s,
        max_connections=h.max_connections,
        max_body_bytes=s.max_body_bytes,
        shutdown_grace_s=s.shutdown_grace_s,
        access_log=access_log,
        tls=tls,
        reuse_port=reuse_port,
    )


def worker_main() -> None:
    """One worker process of ``serve --workers N`` (started by :func:`run_server`).

    A worker loads the config file itself (it shares no memory with the parent), so what it
    runs is exactly what ``check-config`` validates.
    """
    from fleetgate.app import create_app
    from fleetgate.server import server as http_server
    from fleetgate.server.workers import die_with_parent

    die_with_parent()
    w = json.loads(os.environ[_WORKER_ENV])
    settings = config_mod.load(w["config"])
    _log_setup(settings, worker=True)
    opts = server_options(settings, w["host"], w["port"], access_log=w["access_log"],
                          reuse_port=True)
    sock = _bind(opts)
    app = create_app(settings)
    freeze_startup_objects()
    sys.exit(http_server.run(app, opts, sock))


def _log_setup(settings: config_mod.Settings, *, worker: bool = False) -> None:
    """Log lines to stderr, every one through the one redaction (fleetgate/redact.py).

    A worker of ``--workers N`` puts its process id in every line, to tell the workers apart.
    """
    from fleetgate import redact

    redact.install()
    redact.register_settings(settings)
    who = "[%(process)d]" if worker else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s"
    )


def _bind(opts: ServerOptions) -> socket.socket:
    from fleetgate.server.server import bind_socket

    try:
        return bind_socket(opts)
    except OSError as e:
        raise click.ClickException(
            f"can't listen on {opts.host}:{opts.port}: {e.strerror or e}"
        ) from None


def _check_tls(opts: ServerOptions) -> None:
    """Load the certificate once here, so a bad server.tls fails with a clear message."""
    if opts.tls is None:
        return
    from fleetgate.server.server import ssl_context

    try:
        ssl_context(opts.tls)
    except (OSError, ssl.SSLError) as e:
        raise click.ClickException(f"server.tls: {e}") from None
    with contextlib.suppress(OSError):
        if os.stat(opts.tls.key_file).st_mode & 0o077:
            logging.getLogger("fleetgate.server").warning(
                "server.tls.key_file %s is readable by other users: chmod 600 it",
                opts.tls.key_file)


def freeze_startup_objects() -> None:
    """Move everything allocated so far (modules, settings, SQLAlchemy, pydantic) out of the
    garbage collector's reach.

    Without this, every full collection walks those objects while the event loop waits: under
    load that showed as 30-80 ms stalls and a p99 of ~30 ms at 1,000 req/s; with it, ~2-3 ms
    (docs/benchmarks.md). Objects created later are collected as usual.
    """
    gc.collect()
    gc.freeze()


def check_workers(settings: config_mod.Settings, workers: int) -> None:
    """Several workers are only safe where no worker's control plane launches anything.

    Each worker runs its own lifespan: a key cache, a usage writer (every worker writes its own
    events, so accounting stays exact) and a pool. A pool with a launcher other than ``static``
    would start replicas once per worker, so that is refused. So are limits counted in memory
    (``limits.backend: memory``), set in the config or on any user, group or key in the store.
    """
    if workers < 1:
        raise click.ClickException("--workers must be at least 1")
    if workers == 1:
        return
    launching = [m.name for m in settings.models if m.backend.lifecycle().owns_replicas]
    launching += [f"templates[{t.name}]" for t in settings.templates]
    if launching:
        raise click.ClickException(
            f"--workers {workers} needs static backends only; these models launch replicas, "
            f"which every worker would do again: {', '.join(launching)}. Use --workers 1."
        )
    if settings.limits.backend == "memory":
        limited = [
            m.name for m in settings.models
            if any(v is not None for v in m.limits.model_dump().values())
            or m.admission.max_inflight_per_replica is not None
        ]
        if limited:
            raise click.ClickException(
                f"--workers {workers} with limits.backend 'memory' would count limits once per "
                f"worker (models {', '.join(limited)} have limits or an admission queue), so "
                "each worker "
                "would let through its own full share. Set limits.backend: redis (with "
                "limits.redis_url), or use --workers 1."
            )
        if settings.auth.mode == "keys" and _store_has_limits(settings):
            raise click.ClickException(
                f"--workers {workers} with limits.backend 'memory' would count limits once per "
                "worker (users, groups or keys in the store have limits or quotas), so each "
                "worker would let through its own full share. Set limits.backend: redis (with "
                "limits.redis_url), or use --workers 1."
            )


def _store_has_limits(settings: config_mod.Settings) -> bool:
    """Whether the store sets any limit or quota (brings its schema to head first)."""
    from sqlalchemy.exc import SQLAlchemyError

    from fleetgate.store import repo
    from fleetgate.store.db import migrate, open_engine

    try:
        engine = open_engine(settings.store.url)
        try:
            migrate(engine)
            return repo.any_limits(engine)
        finally:
            engine.dispose()
    except (SQLAlchemyError, OSError) as e:
        reason = getattr(e, "orig", None) or e
        raise click.ClickException(
            f"can't read the store to check for limits before starting workers: {reason}"
        ) from None



def run_server(
    settings: config_mod.Settings,
    host: str,
    port: int,
    *,
    access_log: bool,
    workers: int = 1,
    config_path: str | None = None,
    server: str = "fleetgate",
) -> None:
    """Serve the gateway in this process (``workers == 1``) or in N worker processes."""
    from fleetgate.app import create_app
    from fleetgate.server import server as http_server
    from fleetgate.server.workers import supervise

    _log_setup(settings)
    if server == "uvicorn":
        _run_uvicorn(settings, host, port, access_log=access_log, workers=workers,
                     config_path=config_path)
        return
    opts = server_options(settings, host, port, access_log=access_log, reuse_port=workers > 1)
    _check_tls(opts)
    if workers == 1:
        sock = _bind(opts)
        app = create_app(settings)
        freeze_startup_objects()
        code = http_server.run(app, opts, sock)
        if code:
            raise SystemExit(code)
        return
    assert config_path is not None, "several workers load the config from its file"
    check_workers(settings, workers)
    # Hold the port (bound, not listening) while the workers run, so it can't be taken.
    hold = _bind(opts)
    _migrate_once(settings)
    env = self_env({**os.environ, _WORKER_ENV: json.dumps({
        "config": str(Path(config_path).resolve()), "host": host, "port": port,
        "access_log": access_log})})
    try:
        code = supervise(_WORKER_ARGV, env, workers, settings.server.shutdown_grace_s)
    finally:
        hold.close()
    if code:
        raise SystemExit(code)


def _migrate_once(settings: config_mod.Settings) -> None:
    """Bring the schema to head once, in the parent, rather than racing N workers to it."""
    from fleetgate.store.db import migrate, open_engine

    engine = open_engine(settings.store.url)
    migrate(engine)
    engine.dispose()


_UVICORN_CONFIG_ENV = "FLEETGATE_WORKER_CONFIG"


def uvicorn_worker_app() -> object:
    """The app factory of ``serve --server uvicorn --workers N`` (kept for comparison)."""
    from fleetgate.app import create_app

    app = create_app(config_mod.load(os.environ[_UVICORN_CONFIG_ENV]))
    freeze_startup_objects()
    return app


def _run_uvicorn(
    settings: config_mod.Settings, host: str, port: int, *, access_log: bool, workers: int,
    config_path: str | None,
) -> None:
    """The previous front, uvicorn: no header bounds, slowloris timeouts or native TLS here.

    Kept for comparison in bench/ and as a fallback; ``server.http`` and ``server.tls`` are
    ignored by it.
    """
    import uvicorn

    from fleetgate.app import create_app

    common = dict(
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=access_log,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.server.shutdown_grace_s) or None,
        log_level="info",
    )
    if workers == 1:
        app = create_app(settings)
        freeze_startup_objects()
        uvicorn.run(app, **common)  # type: ignore[arg-type]
        return
    assert config_path is not None, "several workers load the config from its file"
    _migrate_once(settings)
    os.environ[_UVICORN_CONFIG_ENV] = str(Path(config_path).resolve())
    uvicorn.run(
        "fleetgate.cli.serve:uvicorn_worker_app",
        factory=True,
        workers=workers,
        **common,  # type: ignore[arg-type]
    )


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The YAML config file.",
)
@click.option("--host", default=None, help="Bind address (default: server.host, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default: server.port, 8000).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback bind with auth.mode 'none'.")
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log one line per request (paths and statuses, never keys).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=int,
    help="Worker processes sharing the port (static backends only). On an N-core machine, "
    "N workers roughly multiply throughput; see docs/benchmarks.md.",
)
@click.option(
    "--server",
    "server_impl",
    default="fleetgate",
    show_default=True,
    type=click.Choice(SERVERS),
    help="The HTTP server. 'uvicorn' is the previous one, kept for comparison: it ignores "
    "server.http and server.tls.",
)
def serve(
    config_path: str,
    host: str | None,
    port: int | None,
    insecure: bool,
    access_log: bool,
    workers: int,
    server_impl: str,
) -> None:
    """Run the gateway.

    \b
    Examples:
      fleetgate serve --config examples/static.yaml
      fleetgate serve --config fleet.yaml --host 0.0.0.0 --port 8080
      fleetgate serve --config fleet.yaml --workers 2     # static backends, 2 cores
    """
    settings = load_or_exit(config_path)
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    if settings.auth.mode == "none" and not is_loopback(host) and not insecure:
        raise click.ClickException(
            f"refusing to bind {host} with auth.mode 'none': anyone who can reach it would "
            "reach your GPUs. Bind 127.0.0.1, turn auth on, or pass --insecure."
        )
    check_workers(settings, workers)
    run_server(
        settings, host, port, access_log=access_log, workers=workers, config_path=config_path,
        server=server_impl,
    )


@click.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file and print a summary; exit 1 with every problem if it's bad.

    \b
    Example:
      fleetgate check-config examples/static.yaml
    """
    s = load_or_exit(path)
    click.echo(f"ok: {path}")
    click.echo(f"  auth: {s.auth.mode}; store: {_safe_url(s.store.url)}")
    for m in s.models:
        click.echo(f"  model {m.name}: backend {m.backend.type}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@click.command()
@click.option("--port", default=8000, show_default=True, help="Gateway port.")
@click.option("--sim-port", default=8001, show_default=True, help="Simulator port.")
@click.option(
    "--dir",
    "state_dir",
    default=".fleetgate-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo's SQLite file lives.",
)
def demo(port: int, sim_port: int, state_dir: str) -> None:
    """Run a self-contained demo: the simulator as model 'demo', the gateway, and a new key.

    The 'demo' model is FleetGate's engine simulator, not a language model: it answers with
    placeholder tokens at a realistic pace. Stop with Ctrl-C.

    \b
    Example:
      fleetgate demo && curl -H "Authorization: Bearer $KEY" localhost:8000/v1/models
    """
    from fleetgate.cli.keys import create_key

    d = Path(state_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    settings = config_mod.parse(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "auth": {"mode": "keys"},
            "store": {"url": f"sqlite:///{d / 'fleetgate.db'}"},
            "models": [
                {
                    "name": "demo",
                    "label": "SIMULATOR - FleetGate's engine simulator, not a real model",
                    "backend": {"type": "static", "urls": [f"http://127.0.0.1:{sim_port}"]},
                }
            ],
        }
    )
    # The simulator must not outlive the demo, however the demo ends: normal exit and
    # exceptions (the finally below), SIGTERM/SIGINT (the server returns, then the finally),
    # and a crash or SIGKILL (the kernel's parent-death signal, set in the child).
    sim = subprocess.Popen(
        [
            *self_python("from fleetgate.cli.main import main; main()"),
            "sim",
            "--port",
            str(sim_port),
            "--model",
            "demo",
            "--ttft-ms",
            "150",
            "--tokens-per-s",
            "40",
        ],
        env=self_env(os.environ),
        start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()),
    )
    try:
        try:
            wait_http(f"http://127.0.0.1:{sim_port}/health", 30, sim)
        except (RuntimeError, TimeoutError) as e:
            raise click.ClickException(f"the simulator didn't start: {e}") from None
        key = create_key(settings, name="demo", models=["demo"], expires=None)
        click.echo(
            "\nFleetGate demo. The model 'demo' is the engine SIMULATOR, not a real model.\n"
            f"  URL: http://127.0.0.1:{port}/v1\n"
            f"  Try: curl http://127.0.0.1:{port}/v1/chat/completions "
            '-H "Authorization: Bearer $KEY" -H "Content-Type: application/json" '
            '-d \'{"model":"demo","messages":[{"role":"user","content":"hi"}]}\'\n'
            "  Your key (shown once) is on the next line:"
        )
        click.echo(key)
        run_server(settings, "127.0.0.1", port, access_log=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sim.pid, signal.SIGTERM)
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sim.pid, signal.SIGKILL)
            sim.wait(timeout=5)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies (Linux), even by SIGKILL."""

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above took effect
            os._exit(1)

    return setup
