"""The benchmark run: start the upstreams and each path in turn, run the scenarios, report.

Scenarios (the issue's numbering; bars in :mod:`bench.report`):

1. throughput: ``wrk -t1 -c32 -d10s``, a small chat request, nginx upstream, every path, with
   each path's CPU per request (its process tree's user+system time over the run / requests);
2. added latency: an open-loop generator at a fixed 1,000 req/s (:func:`bench.loadgen.open_loop`)
   against every path but LiteLLM (it saturates near 200 req/s, so a fixed 1,000 req/s would
   only measure its queue);
3. streaming: the simulator at 50 tokens/s with a 100 ms TTFT, 100 concurrent streams;
4. 10,000 concurrent streams through one FleetGate process from a slow simulator;
5. soak: 1,000,000 requests (wrk in 10 s slices), RSS at 100k and at the end;
6. keys at scale: 100,000 keys in the store, a random valid key per request.

The paths are :data:`bench.paths.SPECS`: FleetGate runs with issue 11's bar set-up (a key of a
user in a group, an rpm/tpm limit, a quota, accounting on) on one worker, and beside it without
limits, on Redis, and at ``--workers N`` on Redis; the peers run at N workers too (N = cores).
Scenarios 1 and 2 run in ``--rounds`` interleaved rounds (the path order reversed every other
round), so a ratio between two paths can be taken within one round. One path runs at a time,
each a fresh process, and every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import loadgen, paths, report, upstream, wrk
from bench.procs import (
    Proc,
    Procs,
    Sampler,
    fleetgate_argv,
    raise_nofile,
    rss_bytes,
    wait_http,
)
from fleetgate.localnet import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PNG = ROOT / "docs" / "benchmarks.png"
CHAT = "/v1/chat/completions"
MB = 1024 * 1024
S3_PATHS = ("direct", "fleetgate", "fleetgate-nolimits", "vllm-router")  # the floor can't stream


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short runs for development: 3 s loads, 1 round, 500 streams, 50k soak, "
                    "10k keys")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="scenarios to run, e.g. 1,2")
    ap.add_argument("--paths", default=",".join(paths.ALL),
                    help=f"paths for scenarios 1-3 (default all: {', '.join(paths.ALL)})")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="N for the N-worker paths (fleetgate-workers, litellm); default: cores")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds of scenarios 1 and 2 (3; --quick 1)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per wrk run (10)")
    ap.add_argument("--soak-requests", type=int, default=None, help="scenario 5 count (1,000,000)")
    ap.add_argument("--keys", type=int, default=None, help="scenario 6 key count (100,000)")
    ap.add_argument("--streams", type=int, default=None, help="scenario 4 streams (10,000)")
    ap.add_argument("--rate", type=float, default=1000.0, help="scenario 2 rate, req/s")
    ap.add_argument("--fleetgate-args", default="",
                    help="extra `fleetgate serve` arguments for every FleetGate path (workers "
                    "come from the path: use --workers for the N-worker path)")
    ap.add_argument("--build", choices=("compiled", "pure"), default="compiled",
                    help="which FleetGate build the FleetGate paths run (fleetgate-pure is "
                    "always pure): compiled, the mypyc build bench/run makes at "
                    "bench/.venvs/compiled (the default); pure, this checkout as Python")
    ap.add_argument("--profile", action="store_true",
                    help="record a py-spy flame graph of FleetGate (path fleetgate) in scenario 1")
    ap.add_argument("--no-docs", action="store_true", help="don't rewrite docs/benchmarks.md")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="run nothing: print the table of a saved run and rewrite the docs "
                    "section and plot from it (e.g. bench/results/latest.json)")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (3.0 if q else 10.0)
    a.rounds = a.rounds or (1 if q else 3)
    a.warmup = 1.0 if q else 2.0
    a.rate_duration = 3.0 if q else 10.0
    a.stream_duration = 3.0 if q else 10.0
    a.soak_requests = a.soak_requests or (50_000 if q else 1_000_000)
    a.soak_checkpoint = min(100_000, a.soak_requests // 10)
    a.soak_slice = 2.0 if q else 10.0
    a.keys = a.keys or (10_000 if q else 100_000)
    a.streams = a.streams or (500 if q else 10_000)
    a.scenarios = {int(s) for s in a.only.split(",") if s.strip()}
    a.path_list = [p.strip() for p in a.paths.split(",") if p.strip()]
    for p in a.path_list:
        if p not in paths.ALL:
            ap.error(f"unknown path {p!r}; known: {', '.join(paths.ALL)}")
    if a.workers < 1 or a.rounds < 1:
        ap.error("--workers and --rounds must be at least 1")
    return a


# -- helpers ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                  if x.startswith("MemTotal"))

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"

    git = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": git,
        "wrk": version([shutil.which("wrk") or "wrk", "-v"]).split(" [")[0].removeprefix("wrk "),
        "nginx": version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]).split("/")[-1],
    }


def start_sim(procs: Procs, name: str, *args: str) -> str:
    port = free_port()
    p = procs.start(name, fleetgate_argv("sim", "--port", str(port), "--model", upstream.MODEL,
                                         *args))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", 60, p)
    return url


def stream_body(max_tokens: int) -> bytes:
    return json.dumps({"model": upstream.MODEL, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Tell me a story."}]},
                      separators=(",", ":")).encode()


def run_async(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


# -- scenarios ----------------------------------------------------------------------------------


def one_process(args: str) -> list[str]:
    """``fleetgate serve`` arguments with any ``--workers N`` taken out (one process)."""
    out, it = [], iter(args.split())
    for x in it:
        if x == "--workers":
            next(it, None)
        elif not x.startswith("--workers="):
            out.append(x)
    return out


def _s1(a: argparse.Namespace, name: str, run: paths.Running, script: Path, work: Path,
        cost: list[tuple[str, int]]) -> dict[str, Any]:
    """One scenario 1 run, with the CPU of each process tree in ``cost`` ((prefix, pid) pairs)."""
    wrk.run(run.url, script, duration_s=a.warmup)
    prof = None
    if a.profile and name == "fleetgate" and run.proc is not None:
        prof = subprocess.Popen(
            [str(paths.VENVS / "bench" / "bin" / "py-spy"), "record", "-p", str(run.proc.pid),
             "-d", str(int(a.duration)), "-o", str(work / "profile-s1.svg"),
             "--nonblocking", "--subprocesses"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    with contextlib.ExitStack() as stack:
        samplers = [(f, stack.enter_context(Sampler(pid))) for f, pid in cost]
        r: dict[str, Any] = wrk.run(run.url, script, duration_s=a.duration)
    if prof is not None:
        prof.wait(timeout=60)
    n = r["requests"]
    for prefix, smp in samplers:
        r[f"{prefix}cpu_pct"] = 100 * smp.cpu_s / smp.wall_s
        r[f"{prefix}cpu_us_per_req"] = 1e6 * smp.cpu_s / n if n else None  # none answered
        r[f"{prefix}rss_mb"] = smp.peak_rss / MB
    return r


def _median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field over the rounds, with the rounds kept beside it."""
    out: dict[str, Any] = {}
    for k in rounds[0]:
        if k == "round":
            continue
        vals = [r[k] for r in rounds if isinstance(r.get(k), int | float)]
        if vals and len(vals) == len(rounds):
            out[k] = statistics.median(vals)
    out["rounds"] = rounds
    return out


def s1_s2(a: argparse.Namespace, procs: Procs, work: Path, up: str, nginx: Proc,
          res: dict[str, Any]) -> None:
    """Scenarios 1 and 2 over every path, in interleaved rounds (order reversed each round)."""
    redis = paths.Redis(procs)
    per: dict[str, dict[str, list[dict[str, Any]]]] = {"s1": {}, "s2": {}}
    for rnd in range(a.rounds):
        order = a.path_list if rnd % 2 == 0 else a.path_list[::-1]
        (work / f"r{rnd}").mkdir(exist_ok=True)
        for name in order:
            if name in res.get("skipped", {}):
                continue
            log(f"scenario 1/2, round {rnd + 1}/{a.rounds}: starting {name}")
            try:
                run = paths.start(name, procs, up, work / f"r{rnd}", workers=a.workers,
                                  fleetgate_extra=one_process(a.fleetgate_args), redis=redis)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                log(f"  {name} unavailable: {e}")
                res.setdefault("skipped", {})[name] = (str(e) or type(e).__name__).splitlines()[0]
                continue
            try:
                _s1_s2_one(a, name, run, rnd, work, nginx, redis, per)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                # One path failing mid-run (wrk printing nothing, a refused connection) costs
                # that path's round, not the whole run; the report lists it.
                log(f"  {name} failed in round {rnd + 1}: {e}")
                res.setdefault("skipped", {})[f"{name} round {rnd + 1}"] = (str(e) or type(e).__name__).splitlines()[0]
            finally:
                if run.proc is not None:
                    procs.stop(run.proc)
    # Added latency: against direct in the same round.
    direct = {d["round"]: d for d in per["s2"].get("direct", [])}
    for rounds in per["s2"].values():
        for x in rounds:
            if x["round"] in direct:
                x["added_p50_ms"] = x["p50_ms"] - direct[x["round"]]["p50_ms"]
                x["added_p99_ms"] = x["p99_ms"] - direct[x["round"]]["p99_ms"]
    for scen, by_path in per.items():
        for name, rounds in by_path.items():
            res.setdefault(scen, {})[name] = _median_of(rounds)


def _s1_s2_one(a: argparse.Namespace, name: str, run: paths.Running, rnd: int, work: Path,
               nginx: Proc, redis: paths.Redis, per: dict[str, dict[str, list[dict[str, Any]]]]
               ) -> None:
    """Scenario 1 then 2 on one started path; the round's results go into ``per``."""
    if 1 in a.scenarios:
        script = wrk.lua_script(work / f"{name}.lua", url_path=CHAT, body=upstream.REQUEST,
                                key=run.key)
        # The path's own process tree (for direct: the upstream's own cost); a Redis path's
        # Redis is counted beside it, not in it, so "gateway CPU" stays the gateway's.
        cost = [("", run.proc.pid if run.proc is not None else nginx.pid)]
        if paths.SPECS[name].redis and redis.proc is not None:
            cost.append(("redis_", redis.proc.pid))
        r = _s1(a, name, run, script, work, cost)
        r["round"] = rnd
        per["s1"].setdefault(name, []).append(r)
        log(f"  s1 {name}: {r['rps']:,.0f} req/s p50 {r['p50_ms']:.2f} ms "
            f"p99 {r['p99_ms']:.2f} ms, {r['cpu_us_per_req'] or 0:.0f} us CPU/req, "
            f"errors {r['errors']}")
    if 2 in a.scenarios and name != "litellm":
        tgt = loadgen.Target(run.host, run.port, CHAT, upstream.REQUEST, run.headers())
        r2 = run_async(loadgen.open_loop(tgt, a.rate, a.rate_duration, warmup_s=a.warmup))
        s = {**r2.summary(), "round": rnd}
        per["s2"].setdefault(name, []).append(s)
        log(f"  s2 {name}: p50 {s['p50_ms']:.2f} ms p99 {s['p99_ms']:.2f} ms "
            f"at {s['achieved_rps']:.0f} req/s")


def s3(a: argparse.Namespace, procs: Procs, work: Path, res: dict[str, Any]) -> None:
    # A realistic decode rate for one stream: 100 ms to the first token, then 50 tokens/s.
    sim = start_sim(procs, "sim-s3", "--ttft-ms", "100", "--tokens-per-s", "50")
    body = stream_body(50)
    for name in [p for p in a.path_list if p in S3_PATHS]:
        log(f"scenario 3: {name}")
        try:
            run = paths.start(name, procs, sim, work / "s3", fleetgate_extra=one_process(
                a.fleetgate_args))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            log(f"  {name} unavailable: {e}")
            continue
        tgt = loadgen.Target(run.host, run.port, CHAT, body, run.headers())
        run_async(loadgen.stream_load(tgt, 20, duration_s=1.0))  # warm-up
        # Workers start spread over one stream's length (ramp), so requests arrive steadily
        # rather than in bursts of 100 that would measure queueing instead of the path.
        r = run_async(loadgen.stream_load(tgt, 100, duration_s=a.stream_duration, ramp_s=1.0))
        res.setdefault("s3", {})[name] = s = r.summary()
        log(f"  s3 {name}: {s['completed']} streams, TTFT p50 {s['ttft_p50_ms']:.2f} ms, "
            f"gap p50 {s['gap_p50_ms']:.2f} p99 {s['gap_p99_ms']:.2f} ms, failed {s['failed']}")
        if run.proc is not None:
            procs.stop(run.proc)
    d = res.get("s3", {}).get("direct")
    if d:
        for r in res["s3"].values():
            r["added_ttft_p50_ms"] = r["ttft_p50_ms"] - d["ttft_p50_ms"]
    procs.stop(next(p for p in procs.items if p.name == "sim-s3"))


def s4(a: argparse.Namespace, procs: Procs, work: Path, res: dict[str, Any]) -> None:
    n = a.streams
    log(f"scenario 4: {n:,} concurrent streams through one FleetGate process")
    sim = start_sim(procs, "sim-s4", "--ttft-ms", "2000", "--tokens-per-s", "1")
    # The bar set-up (path fleetgate, one process); the upstream pool is raised above the
    # streams (at its default of 1,000, streams beyond it would wait for a connection), and
    # paths.fleetgate_config keeps server.http.max_connections above that.
    run = paths.start_fleetgate_path("fleetgate", procs, sim, work / "s4",
                                     upstream_max_connections=n + 100,
                                     extra=one_process(a.fleetgate_args), proc_name="fleetgate-s4")
    tgt = loadgen.Target(run.host, run.port, CHAT, stream_body(12), run.headers())
    ramp = 5.0 if n >= 2000 else 1.0
    assert run.proc is not None
    with Sampler(run.proc.pid) as smp:
        r = run_async(loadgen.stream_load(tgt, n, streams_per_worker=1, ramp_s=ramp,
                                          timeout_s=120))
    s = r.summary()
    res["s4"] = {"streams": n, "completed": r.completed, "failed": r.failed,
                 "errors": r.errors, "peak_in_flight": r.peak_in_flight,
                 "peak_rss_mb": smp.peak_rss / MB, "cpu_s": smp.cpu_s, "wall_s": smp.wall_s,
                 "cpu_pct": 100 * smp.cpu_s / smp.wall_s, "ttft_p50_ms": s["ttft_p50_ms"],
                 "duration_p50_ms": s["duration_p50_ms"], "nofile": raise_nofile()}
    log(f"  s4: {r.completed}/{n} completed, peak {r.peak_in_flight} in flight, "
        f"peak RSS {smp.peak_rss / MB:.0f} MB, CPU {res['s4']['cpu_pct']:.0f}% "
        f"({r.errors or 'no errors'})")
    procs.stop(run.proc)
    procs.stop(next(p for p in procs.items if p.name == "sim-s4"))


def s5(a: argparse.Namespace, procs: Procs, work: Path, up: str, res: dict[str, Any]) -> None:
    total, checkpoint = a.soak_requests, a.soak_checkpoint
    log(f"scenario 5: soak of {total:,} requests through FleetGate (RSS at {checkpoint:,})")
    run = paths.start_fleetgate_path("fleetgate", procs, up, work / "s5",
                                     extra=one_process(a.fleetgate_args), proc_name="fleetgate-s5")
    assert run.proc is not None
    script = wrk.lua_script(work / "s5.lua", url_path=CHAT, body=upstream.REQUEST, key=run.key)
    done = errors = 0
    rss_cp: float | None = None
    series: list[tuple[int, float]] = [(0, rss_bytes(run.proc.pid) / MB)]
    t0 = time.monotonic()
    # Bound in time as well as count: at 500 req/s even a slow path finishes its slices.
    deadline = t0 + max(120.0, total / 500)
    rate = 0.0
    while done < total and time.monotonic() < deadline:
        slice_s = a.soak_slice
        if rss_cp is None:  # land close to the checkpoint rather than far past it
            slice_s = min(slice_s, max(1.0, (checkpoint - done) / rate) if rate else 1.0)
        r = wrk.run(run.url, script, duration_s=slice_s)
        rate = r["rps"]
        done += r["requests"]
        errors += r["non_2xx"] + r["socket_errors"]
        rss = rss_bytes(run.proc.pid) / MB
        series.append((done, rss))
        if rss_cp is None and done >= checkpoint:
            rss_cp, cp_done = rss, done
        if len(series) % 10 == 0:
            log(f"  s5: {done:,} requests, RSS {rss:.0f} MB")
    wall = time.monotonic() - t0
    end = series[-1][1]
    res["s5"] = {"requests": done, "errors": errors, "rps": done / wall,
                 "checkpoint_requests": cp_done if rss_cp else checkpoint,
                 "rss_checkpoint_mb": rss_cp, "rss_end_mb": end,
                 "rss_ratio": end / rss_cp if rss_cp else float("nan"),
                 "series": series, "complete": done >= total}
    log(f"  s5: {done:,} requests in {wall:.0f} s, RSS {rss_cp:.1f} -> {end:.1f} MB")
    procs.stop(run.proc)


def s6(a: argparse.Namespace, procs: Procs, work: Path, up: str, res: dict[str, Any]) -> None:
    log(f"scenario 6: {a.keys:,} keys, a random one per request")
    (work / "s6").mkdir(exist_ok=True)
    cfg = paths.fleetgate_config(work / "s6", up)
    key_file = work / "s6" / "keys.txt"
    t = time.monotonic()
    paths.bulk_keys(cfg, a.keys, key_file)
    log(f"  inserted {a.keys:,} keys in {time.monotonic() - t:.1f} s")
    run = paths.start_fleetgate(procs, cfg, None, name="fleetgate-s6",
                                extra=one_process(a.fleetgate_args))
    script = wrk.lua_script(work / "s6.lua", url_path=CHAT, body=upstream.REQUEST,
                            key_file=key_file)
    cold = wrk.run(run.url, script, duration_s=a.duration)
    warm = wrk.run(run.url, script, duration_s=a.duration)
    # Against scenario 1's path with the same set-up: plain keys, one process.
    s1 = res.get("s1", {}).get("fleetgate-nolimits", {}).get("rps")
    res["s6"] = {"keys": a.keys, "rps": cold["rps"], "p50_ms": cold["p50_ms"],
                 "p99_ms": cold["p99_ms"], "errors": cold["non_2xx"] + cold["socket_errors"],
                 "warm_rps": warm["rps"], "ratio_to_s1": cold["rps"] / s1 if s1 else None}
    log(f"  s6: cold {cold['rps']:,.0f} req/s (p99 {cold['p99_ms']:.1f} ms), "
        f"warm {warm['rps']:,.0f} req/s, errors {res['s6']['errors']}")
    assert run.proc is not None
    procs.stop(run.proc)


# -- main ------------------------------------------------------------------------------------------


def render(path: str, docs: bool) -> None:
    res = json.loads(Path(path).read_text())
    print(report.text_table(res))
    if docs:
        png = report.plot(res, PNG)
        report.write_docs(res, DOC, PNG.name if png else None)
        log(f"wrote {DOC.relative_to(ROOT)}" + (f" and {PNG.relative_to(ROOT)}" if png else ""))


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.render:
        render(a.render, docs=not a.no_docs)
        return
    # Scenario 4's gateway holds two sockets per stream (client, upstream); its server asks for
    # 2 x server.http.max_connections + 256, which paths.fleetgate_config sets to streams + 1,100.
    nofile = raise_nofile(2 * (a.streams + 1_100) + 256 if 4 in a.scenarios else 0)
    if 4 in a.scenarios and nofile < 2 * a.streams:
        log(f"WARNING: the open-file limit is {nofile} and can't be raised here (the hard limit; "
            f"raising it needs CAP_SYS_RESOURCE): {a.streams:,} streams hold about "
            f"{2 * a.streams:,} sockets in the gateway, so scenario 4 will likely fall short. "
            "Raise the hard limit (ulimit -Hn, systemd's LimitNOFILE=) before bench/run.")
    if a.build == "compiled":
        if not any(paths.COMPILED.glob("fleetgate/server/protocol.*.so")):
            sys.exit(f"bench: no compiled build at {paths.COMPILED}: bench/run makes it "
                     "(scripts/compiled.sh); or run with --build pure")
        paths.tree = paths.COMPILED
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RESULTS / f"run-{stamp}"
    for sub in ("", "s3", "s4", "s5", "s6"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"meta": {
        **machine(), "argv": sys.argv[1:] if argv is None else argv,
        "fleetgate_args": a.fleetgate_args, "workers": a.workers, "rounds": a.rounds,
        "build": a.build,
        "nofile": nofile, "durations_s": {"s1": a.duration, "s2": a.rate_duration},
        "paths": {p: {"label": paths.SPECS[p].label.format(n=a.workers),
                      "how": paths.SPECS[p].how.format(n=a.workers)} for p in a.path_list}}}
    log(f"logs and results in {work}")

    procs = Procs(work)

    def on_signal(signum: int, _frame: Any) -> None:
        procs.close()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        up, ng = "", None
        if a.scenarios & {1, 2, 5, 6}:
            up, ng = paths.start_nginx(procs, work)
        if a.scenarios & {1, 2}:
            assert ng is not None
            s1_s2(a, procs, work, up, ng, res)
        if 3 in a.scenarios:
            s3(a, procs, work, res)
        if 4 in a.scenarios:
            s4(a, procs, work, res)
        if 5 in a.scenarios:
            s5(a, procs, work, up, res)
        if 6 in a.scenarios:
            s6(a, procs, work, up, res)
    finally:
        procs.close()
        (work / "results.json").write_text(json.dumps(res, indent=1, default=str))
        shutil.copy(work / "results.json", RESULTS / "latest.json")

    render(str(work / "results.json"), docs=not a.quick and not a.no_docs)
