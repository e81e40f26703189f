"""FleetGate at two git revisions, same upstream, interleaved rounds: did a change cost speed?

    python -m bench.tree_ab --before b626ea1 --after HEAD
    python -m bench.tree_ab --before b626ea1 --after HEAD --after-args "--server uvicorn"
    python -m bench.tree_ab --before HEAD --after HEAD --after-limits   # what limits cost
    python -m bench.tree_ab --before HEAD --after HEAD --redis --limits-before issue \
        --limits-after issue --after-args "--workers 2"                 # workers on Redis

Each revision is checked out into a temporary git worktree and run from it (``PYTHONPATH``), with
its own fresh SQLite store and a key made by its own CLI, as ``fleetgate serve`` with one worker,
keys auth and usage accounting on. Every round runs, for each contender in turn (the order
swapped every round so neither always goes first):

* scenario 1: ``wrk -t1 -c32`` on the small chat request against nginx's fixed answer; the
  requests/s, latency, and the gateway's CPU per request (its process tree's user+system time
  over the run, divided by the requests);
* scenario 2: an open loop at ``--rate`` requests/s (1,000 by default) for ``--rate-duration``;
  the latency percentiles, the added latency against the same load sent to nginx directly in
  the same round, and the gateway's CPU per request at that rate (over the warm-up and the run,
  divided by every request sent): at a fixed rate each contender does the same work per turn of
  its event loop, so this is steadier than scenario 1's, and it counts the per-request wake-ups
  that a saturated loop amortises.

``--limits-before/--limits-after`` put limits on a contender's key (``issue``: issue 9's bar
set-up; ``everywhere``: the heaviest common set-up) and ``--redis`` starts a ``redis-server`` and
points both contenders' limits at it (each its own database).

Results go to ``bench/results/tree-ab-<time>.json``; the summary prints per-round ratios, so the
comparison is same-run. Needs Debian's wrk and nginx (``bench/run --setup-only`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import loadgen, paths, upstream, wrk
from bench.procs import (
    Procs,
    Sampler,
    fleetgate_argv,
    raise_nofile,
    wait_http,
    wait_listening,
)
from fleetgate.localnet import free_port

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev],
                   check=True)
    return where


def drop_worktree(where: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                   check=False, capture_output=True)


def fleetgate_cli(tree: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        fleetgate_argv(*args),
        env=env, check=True, capture_output=True, text=True, timeout=120,
    )
    return out.stdout


# Issue 9's bar set-up: "a key, a user in a group, an rpm/tpm limit, a quota": the key's user is
# in a group with an rpm/tpm limit, and the user has a quota. ``everywhere`` adds rpm/tpm on the
# user and the key, and a quota on the group too (three subjects, six buckets, two quotas). Set
# high enough that nothing is refused: what is measured is what checking and settling them costs.
LIMITS = ("--rpm", "100000000", "--tpm", "1000000000000")
QUOTA = ("--quota-tokens", "1000000000000000", "--quota-period", "month")
LIMIT_SETS = ("none", "user", "issue", "everywhere")


def make_key(tree: Path, cfg: Path, limits: str = "none") -> str:
    c = ("--config", str(cfg))
    if limits == "none":
        return fleetgate_cli(tree, "keys", "create", *c, "--name", "bench").strip().splitlines()[-1]
    more = limits == "everywhere"
    some = limits != "user"  # "user": the same user in the same group, with no limit at all
    fleetgate_cli(tree, "groups", "create", *c, "bench-group", "--models", "*",
                  *(LIMITS if some else ()), *(QUOTA if more else ()))
    fleetgate_cli(tree, "users", "create", *c, "bench-user", "--group", "bench-group",
                  *(LIMITS if more else ()), *(QUOTA if some else ()))
    out = fleetgate_cli(tree, "keys", "create", *c, "--name", "bench", "--user", "bench-user",
                        *(LIMITS if more else ()))
    return out.strip().splitlines()[-1]


def with_redis(cfg: Path, url: str) -> None:
    """Point a bench config's limits at Redis (``limits.backend: redis``)."""
    doc = yaml.safe_load(cfg.read_text())
    doc["limits"] = {"backend": "redis", "redis_url": url}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))


def start(procs: Procs, tree: Path, cfg: Path, name: str, extra: list[str]) -> paths.Running:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = procs.start(name, fleetgate_argv("serve", "--config", str(cfg), "--port", str(port), *extra),
                    env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", 60, p)
    if "--workers" in extra:
        wait_listening(port, int(extra[extra.index("--workers") + 1]), 60)
    return paths.Running("fleetgate", url, None, p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tree_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision, e.g. b626ea1")
    ap.add_argument("--after", default="HEAD", help="git revision (default HEAD)")
    ap.add_argument("--before-args", default="", help="extra `serve` arguments for before")
    ap.add_argument("--after-args", default="", help="extra `serve` arguments for after")
    ap.add_argument("--after-limits", action="store_true",
                    help="shorthand for --limits-after issue")
    ap.add_argument("--limits-before", choices=LIMIT_SETS, default="none",
                    help="limits on before's key: none (a plain key), user (a user in a group, "
                         "no limits), issue (that user and group with an rpm/tpm limit on the "
                         "group and a quota on the user: issue 9's bar set-up) or everywhere "
                         "(rpm/tpm on group, user and key, quotas on group and user)")
    ap.add_argument("--limits-after", choices=LIMIT_SETS, default="none",
                    help="limits on after's key (as --limits-before)")
    ap.add_argument("--redis", action="store_true",
                    help="both with limits.backend: redis, on a redis-server this run starts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="scenario 1 seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="scenario 2 requests/s")
    ap.add_argument("--rate-duration", type=float, default=8.0)
    a = ap.parse_args(argv)
    if a.after_limits:
        a.limits_after = "issue"
    limit_sets = {"before": a.limits_before, "after": a.limits_after}
    raise_nofile()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fg-tree-ab-") as tmp:
        work = Path(tmp)
        trees = {"before": worktree(a.before, work / "before"),
                 "after": worktree(a.after, work / "after")}
        extra = {"before": a.before_args.split(), "after": a.after_args.split()}
        try:
            with Procs(work) as procs:
                up, _ = paths.start_nginx(procs, work)
                redis = paths.Redis(procs) if a.redis else None
                cfgs, keys = {}, {}
                for name, tree in trees.items():
                    (work / name / "run").mkdir(exist_ok=True)
                    cfgs[name] = paths.fleetgate_config(work / name / "run", up)
                    if redis is not None:  # each its own Redis database
                        with_redis(cfgs[name], redis.fresh_url())
                    keys[name] = make_key(tree, cfgs[name], limit_sets[name])
                direct = paths.Running("direct", up, None, None)
                for rnd in range(a.rounds):
                    order = ("before", "after") if rnd % 2 == 0 else ("after", "before")
                    tgt = loadgen.Target(direct.host, direct.port, CHAT, upstream.REQUEST, {})
                    d2 = _open_loop(tgt, a)  # the same load to nginx directly, this round
                    for name in order:
                        run = start(procs, trees[name], cfgs[name], f"{name}-{rnd}", extra[name])
                        assert run.proc is not None
                        script = wrk.lua_script(work / f"{name}.lua", url_path=CHAT,
                                                body=upstream.REQUEST, key=keys[name])
                        wrk.run(run.url, script, duration_s=a.warmup)
                        with Sampler(run.proc.pid) as smp:
                            r = wrk.run(run.url, script, duration_s=a.duration)
                        h = {"Authorization": f"Bearer {keys[name]}"}
                        tgt = loadgen.Target(run.host, run.port, CHAT, upstream.REQUEST, h)
                        with Sampler(run.proc.pid) as smp2:
                            r2 = _open_loop(tgt, a)
                        procs.stop(run.proc)
                        r.update(
                            contender=name, round=rnd,
                            cpu_us_per_req=1e6 * smp.cpu_s / max(1, r["requests"]),
                            s2_p50_ms=r2["p50_ms"], s2_p99_ms=r2["p99_ms"],
                            s2_added_p50_ms=r2["p50_ms"] - d2["p50_ms"],
                            s2_added_p99_ms=r2["p99_ms"] - d2["p99_ms"],
                            # over the warm-up and the measured part: every request sent
                            s2_cpu_us_per_req=1e6 * smp2.cpu_s / max(
                                1, round(a.rate * (a.warmup + a.rate_duration))),
                        )
                        runs.append(r)
                        print(f"round {rnd} {name:6s} s1 {r['rps']:8,.0f} req/s "
                              f"{r['cpu_us_per_req']:5.0f} us/req p99 {r['p99_ms']:.2f} ms | "
                              f"s2 added p50 {r['s2_added_p50_ms']:+.3f} ms "
                              f"p99 {r['s2_added_p99_ms']:+.3f} ms "
                              f"{r['s2_cpu_us_per_req']:4.0f} us/req", flush=True)
        finally:
            for tree in trees.values():
                drop_worktree(tree)
    summary: dict[str, Any] = {}
    for name in ("before", "after"):
        mine = [r for r in runs if r["contender"] == name]
        summary[name] = {
            k: statistics.median(r[k] for r in mine)
            for k in ("rps", "cpu_us_per_req", "s2_added_p50_ms", "s2_added_p99_ms",
                      "s2_cpu_us_per_req")
        }
    ratios = [
        next(r for r in runs if r["round"] == i and r["contender"] == "after")["rps"]
        / next(r for r in runs if r["round"] == i and r["contender"] == "before")["rps"]
        for i in range(a.rounds)
    ]
    summary["after_over_before_rps"] = ratios
    out = results / f"tree-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "summary": summary}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"results: {out}")
    return 0


def _open_loop(tgt: loadgen.Target, a: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    r = asyncio.run(loadgen.open_loop(tgt, a.rate, a.rate_duration, warmup_s=a.warmup))
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
