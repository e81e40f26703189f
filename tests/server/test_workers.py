"""``fleetgate serve --workers 2``: both workers serve on one port, and every way the parent
goes (SIGTERM, a worker dying, SIGKILL of the parent) leaves no worker behind. And a graceful
stop: a stream in flight at SIGTERM finishes, and its usage reaches the store."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import FLEETGATE, create_key, free_port, sim, stop, wait_http

import fleetgate


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def until(pred: object, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("workers")
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0") as sim_url:
        cfg = tmp / "gw.yaml"
        cfg.write_text(
            "auth: {mode: keys}\n"
            f"store: {{url: 'sqlite:///{tmp / 'fg.db'}'}}\n"
            "server: {shutdown_grace_s: 5}\n"
            "models:\n"
            "  - name: chat\n"
            "    served_name: upstream-name\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
        )
        yield cfg, create_key(cfg, "alice")


@contextlib.contextmanager
def workers(cfg: Path, cwd: Path | None = None,
            ) -> Iterator[tuple[subprocess.Popen[bytes], int, list[int]]]:
    port = free_port()
    argv, env = FLEETGATE, None
    if cwd is not None:  # this FleetGate, started from another directory
        argv = [sys.executable, "-P", *FLEETGATE[1:]]
        env = {**os.environ, "PYTHONPATH": str(Path(fleetgate.__file__).resolve().parents[1])}
    p = subprocess.Popen([*argv, "serve", "--config", str(cfg), "--port", str(port),
                          "--workers", "2"], start_new_session=True, cwd=cwd, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60, p)
        assert until(lambda: len(children(p.pid)) == 2, 10)
        kids = children(p.pid)
        yield p, port, kids
    finally:
        stop(p)
        for k in children(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)


def _chat(port: int, key: str) -> int:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": "chat", "messages": [{"role": "user", "content": "x"}],
                         "max_tokens": 2})
    return r.status_code


def test_two_workers_serve_and_sigterm_to_the_parent_stops_them(config: tuple[Path, str]) -> None:
    cfg, key = config
    with workers(cfg) as (p, port, kids):
        assert all(_chat(port, key) == 200 for _ in range(20))
        p.send_signal(signal.SIGTERM)  # the parent only, as a service manager would
        assert p.wait(timeout=20) == 0
        assert until(lambda: not any(alive(k) for k in kids), 10), "a worker outlived its parent"


def test_workers_run_the_parents_fleetgate_whatever_the_working_directory_holds(
        config: tuple[Path, str], tmp_path: Path) -> None:
    # A directory with another `fleetgate/` in it (a checkout, while the installed or compiled
    # build runs): `python -c` in the workers would import that one, not their parent's.
    fake = tmp_path / "fleetgate"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('the wrong fleetgate was imported')\n")
    cfg, key = config
    with workers(cfg, cwd=tmp_path) as (_, port, _kids):
        assert all(_chat(port, key) == 200 for _ in range(10))


def test_a_worker_dying_stops_the_others_and_the_parent(config: tuple[Path, str]) -> None:
    cfg, _ = config
    with workers(cfg) as (p, _, kids):
        os.kill(kids[0], signal.SIGKILL)
        assert p.wait(timeout=20) == 1
        assert until(lambda: not alive(kids[1]), 10)


def test_a_killed_parent_takes_its_workers_with_it(config: tuple[Path, str]) -> None:
    cfg, _ = config
    with workers(cfg) as (p, _, kids):
        p.kill()
        p.wait(timeout=10)
        assert until(lambda: not any(alive(k) for k in kids), 20), "orphaned workers"


def test_sigterm_lets_a_stream_in_flight_finish_and_keeps_its_usage(tmp_path: Path) -> None:
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "20") as sim_url:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(
            f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\n"
            "server: {shutdown_grace_s: 10}\n"
            "models:\n"
            "  - name: chat\n"
            "    served_name: upstream-name\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
        )
        key = create_key(cfg, "alice")
        _stream_through_a_sigterm(tmp_path, cfg, key)


def _stream_through_a_sigterm(tmp_path: Path, cfg: Path, key: str) -> None:
    import openai

    port = free_port()
    p = subprocess.Popen([*FLEETGATE, "serve", "--config", str(cfg), "--port", str(port)],
                         stdout=(tmp_path / "gw.log").open("wb"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60, p)
        before = subprocess.run([*FLEETGATE, "usage", "--config", str(cfg)], check=True,
                                capture_output=True, text=True).stdout
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        stream = c.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=40,
            stream=True, extra_body={"stream_options": {"include_usage": True}})
        chunks = iter(stream)
        next(chunks)
        p.send_signal(signal.SIGTERM)  # mid-stream
        rest = list(chunks)
        assert rest and rest[-1].usage is not None and rest[-1].usage.completion_tokens == 40
        assert p.wait(timeout=20) == 0
    finally:
        stop(p)
    log = (tmp_path / "gw.log").read_text()
    assert log.rstrip().endswith("Application shutdown complete.")
    after = subprocess.run([*FLEETGATE, "usage", "--config", str(cfg)], check=True,
                           capture_output=True, text=True).stdout
    assert after != before  # the stream's usage row was flushed at shutdown
