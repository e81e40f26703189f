"""uvicorn against FleetGate's own server, same gateway, same upstream, interleaved rounds.

    python -m bench.server_ab                      # 3 rounds x 2 servers, 8 s each, 1 worker
    python -m bench.server_ab --rounds 5 --duration 10 --workers 2
    python -m bench.server_ab --bare               # the servers alone, with a trivial ASGI app
    python -m bench.server_ab --floor              # plus bench/bare_proxy.py, the floor

Scenario 1's load (``wrk -t1 -c32``, the small chat request with a key, nginx's fixed answer
upstream) against ``fleetgate serve --server uvicorn`` and ``--server fleetgate`` in turn, each a
fresh process, the order swapped every round so neither always runs first. It reports each run's
requests/s, latency and the gateway's CPU per request (its process tree's user+system time over
the run, divided by the requests), and the per-round ratio, so the comparison is same-run.
Results go to ``bench/results/server-ab-<time>.json``. Runs from the current Python (FleetGate
installed), needs Debian's wrk and nginx.

``--bare`` measures the two servers alone: a trivial ASGI app (read the body, answer a fixed
JSON with ``Content-Length``) instead of the gateway, no upstream. ``--floor`` adds a third
contender to every round: ``bench/bare_proxy.py``, the gateway's essential work and nothing
else (issue 11's calibration), the floor for Python on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import paths, upstream, wrk
from bench.procs import Procs, Sampler, raise_nofile, wait_http
from fleetgate.localnet import free_port

SERVERS = ("uvicorn", "fleetgate")
BARE_BODY = b'{"object":"chat.completion","choices":[]}'


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            await send({"type": m["type"] + ".complete"})
            if m["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(BARE_BODY)).encode())]})
    await send({"type": "http.response.body", "body": BARE_BODY})


def serve_bare(server: str, port: int) -> None:
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(bare_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                    lifespan="on", access_log=False, log_level="warning")
    else:
        from fleetgate.server import ServerOptions, run

        run(bare_app, ServerOptions(port=port))


def start_floor(procs: Procs, up: str, key: str, name: str) -> paths.Running:
    port = free_port()
    p = procs.start(name, [sys.executable, "-m", "bench.bare_proxy", "--port", str(port),
                           "--upstream", up, "--key", key])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", 30, p, ok=401)  # it answers nothing without the key
    return paths.Running("floor", url, key, p)


def start_bare(procs: Procs, server: str, name: str) -> paths.Running:
    port = free_port()
    p = procs.start(name, [sys.executable, "-m", "bench.server_ab", "--serve-bare", server,
                           "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", 30, p)
    return paths.Running(server, url, None, p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.server_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--bare", action="store_true", help="the servers alone, a trivial app")
    ap.add_argument("--floor", action="store_true", help="add bench/bare_proxy.py to each round")
    ap.add_argument("--serve-bare", choices=SERVERS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve_bare:
        serve_bare(a.serve_bare, a.port)
        return 0
    raise_nofile()
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fg-ab-") as tmp, Procs(Path(tmp)) as procs:
        work = Path(tmp)
        up, _ = paths.start_nginx(procs, work)
        cfg = paths.fleetgate_config(work, up)
        key = paths.create_key(cfg)
        script = wrk.lua_script(work / "ab.lua", url_path="/v1/chat/completions",
                                body=upstream.REQUEST, key=key)
        contenders = SERVERS + (("floor",) if a.floor else ())
        for rnd in range(a.rounds):
            order = contenders if rnd % 2 == 0 else contenders[::-1]
            for server in order:
                if server == "floor":
                    run = start_floor(procs, up, key, f"floor-{rnd}")
                elif a.bare:
                    run = start_bare(procs, server, f"bare-{server}-{rnd}")
                else:
                    run = paths.start_fleetgate(procs, cfg, key, name=f"fg-{server}-{rnd}",
                                                extra=["--server", server,
                                                       "--workers", str(a.workers)])
                assert run.proc is not None
                wrk.run(run.url, script, duration_s=a.warmup)
                with Sampler(run.proc.pid) as smp:
                    r = wrk.run(run.url, script, duration_s=a.duration)
                procs.stop(run.proc)
                r.update(server=server, round=rnd, cpu_pct=100 * smp.cpu_s / smp.wall_s,
                         cpu_us_per_req=1e6 * smp.cpu_s / max(1, r["requests"]))
                runs.append(r)
                print(f"round {rnd} {server:9s} {r['rps']:9,.0f} req/s  p50 {r['p50_ms']:.2f} ms"
                      f"  p99 {r['p99_ms']:.2f} ms  CPU {r['cpu_pct']:.0f}%  "
                      f"{r['cpu_us_per_req']:.0f} us/req  errors {r['errors']}", flush=True)
    ratios = []
    for rnd in range(a.rounds):
        by = {r["server"]: r for r in runs if r["round"] == rnd}
        ratios.append(by["fleetgate"]["rps"] / by["uvicorn"]["rps"])
    for s in contenders:
        mine = [r for r in runs if r["server"] == s]
        print(f"{s:9s} median {statistics.median(r['rps'] for r in mine):9,.0f} req/s, "
              f"{statistics.median(r['cpu_us_per_req'] for r in mine):.0f} us CPU/req")
    print("fleetgate/uvicorn per round: " + ", ".join(f"{x:.2f}x" for x in ratios))
    out = results / f"server-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "ratios": ratios}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
