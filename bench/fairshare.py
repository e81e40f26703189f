"""The fair-share benchmark: a light user's latency beside a heavy user, FIFO against fair share.

Real processes, no gateway: one ``fleetgate sim`` upstream, and in this process a harness that
puts every request through :class:`fleetgate.limits.fairshare.FairGate` (the scheduler the
gateway uses) before sending it over HTTP. ``slots`` stands for ready replicas x
``max_inflight_per_replica``: when all are busy, requests queue in the gate.

The issue's scenario: the heavy user keeps ``--heavy`` requests in flight or queued (a closed
loop: each one that ends is replaced at once); the light user sends one request every
``--light-every`` seconds. The heavy user's requests vary in length (``--heavy-spread``, from a
fixed seed), as real ones do; requests all alike would free every slot at the same moment, and
the light user would wait for the next burst. Three runs:

* uncontended: the light user alone;
* fifo: both users, dispatched in arrival order (weights off);
* fair: both users, start-time fair queueing.

Prints a table and, with ``--json PATH``, writes the numbers. The bar: fair mean within 1.5x of
uncontended. This benchmark is the scheduler's; the end-to-end one (through ``fleetgate serve``
with ``models[].admission``) comes with the gateway's integration.

    python -m bench.fairshare                 # about a minute
    python -m bench.fairshare --quick         # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import Procs, fleetgate_argv, wait_http
from fleetgate.limits.fairshare import FairGate, Policy
from fleetgate.localnet import free_port

FLEETGATE = fleetgate_argv()


async def _one(session: aiohttp.ClientSession, url: str, user: str, max_tokens: int) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": f"hello from {user}"}],
            "max_tokens": max_tokens}
    async with session.post(url, json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"the simulator answered {r.status}")


async def run_mode(
    url: str, *, policy: Policy, contended: bool, slots: int, heavy: int, light_every: float,
    light_n: int, max_tokens: int, warmup_s: float, spread: float,
) -> list[float]:
    gate = FairGate(slots=slots, policy=policy, max_queue=10 * heavy + 100)
    stop = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def through_gate(user: str, tokens: int) -> None:
            slot = await gate.acquire(user)
            try:
                await _one(session, url, user, tokens)
            finally:
                slot.release()

        async def heavy_worker(rng: random.Random) -> None:
            while not stop.is_set():
                lo, hi = max(1, round(max_tokens * (1 - spread))), round(max_tokens * (1 + spread))
                await through_gate("heavy", rng.randint(lo, hi))

        workers = [asyncio.create_task(heavy_worker(random.Random(i)))
                   for i in range(heavy if contended else 0)]
        try:
            if contended:
                await asyncio.sleep(warmup_s)  # let the heavy user's backlog build
            latencies: list[float] = []
            for _ in range(light_n):
                t0 = time.perf_counter()
                await through_gate("light", max_tokens)
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(max(0.0, light_every - latencies[-1]))
            return latencies
        finally:
            stop.set()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


def summary(lat: list[float]) -> dict[str, float]:
    return {"mean_s": statistics.mean(lat), "p50_s": statistics.median(lat), "max_s": max(lat)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.fairshare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=4,
                    help="ready replicas x max_inflight_per_replica (default 4)")
    ap.add_argument("--heavy", type=int, default=50, help="the heavy user's outstanding requests")
    ap.add_argument("--light-every", type=float, default=3.0, help="seconds between light requests")
    ap.add_argument("--light-n", type=int, default=8, help="light requests per run")
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="the simulator's pace")
    ap.add_argument("--ttft-ms", type=float, default=100.0)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--heavy-spread", type=float, default=0.5,
                    help="heavy requests ask for max_tokens x (1 +- spread), seeded; 0 makes "
                         "them all alike, so slots free up in bursts")
    ap.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.slots, a.heavy, a.light_every, a.light_n = 2, 6, 0.2, 2
        a.max_tokens, a.tokens_per_s, a.ttft_ms, a.warmup_s = 5, 200.0, 10.0, 0.3
    results: dict[str, Any] = {"params": {k: v for k, v in vars(a).items() if k != "json"}}
    with tempfile.TemporaryDirectory(prefix="fg-fairshare-") as tmp, Procs(Path(tmp)) as procs:
        port = free_port()
        simp = procs.start("sim", [*FLEETGATE, "sim", "--port", str(port), "--model", "sim",
                                   "--ttft-ms", str(a.ttft_ms), "--tokens-per-s",
                                   str(a.tokens_per_s)])
        wait_http(f"http://127.0.0.1:{port}/health", 30, simp)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        runs: list[tuple[str, Policy, bool]] = [
            ("uncontended", "fair", False), ("fifo", "fifo", True), ("fair", "fair", True)]
        for name, policy, contended in runs:
            lat = asyncio.run(run_mode(
                url, policy=policy, contended=contended, slots=a.slots, heavy=a.heavy,
                light_every=a.light_every, light_n=a.light_n, max_tokens=a.max_tokens,
                warmup_s=a.warmup_s, spread=a.heavy_spread))
            results[name] = summary(lat) | {"latencies_s": lat}
    base = results["uncontended"]["mean_s"]
    print(f"light user's latency, heavy user holding {a.heavy} requests, {a.slots} slots")
    print(f"{'run':<12} {'mean s':>8} {'p50 s':>8} {'max s':>8} {'x uncontended':>14}")
    for name in ("uncontended", "fifo", "fair"):
        r = results[name]
        r["ratio"] = r["mean_s"] / base
        print(f"{name:<12} {r['mean_s']:>8.2f} {r['p50_s']:>8.2f} {r['max_s']:>8.2f} "
              f"{r['ratio']:>14.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
