"""How ``fleetgate serve --workers N`` spreads connections over its workers (``SO_REUSEPORT``).

    python -m bench.spread                         # 2 workers, 32 and 1,000 connections, 3 rounds
    python -m bench.spread --workers 2 --connections 32,256,1000 --rounds 5

The kernel picks a worker for each new connection by a hash of the client's address and port, so
the split is random, not round-robin. Each round opens C keep-alive connections to a fresh
gateway (one request on each, so every one is accepted and served), then reads from
``/proc/<worker>/fd`` and ``/proc/net/tcp`` which worker holds which connection, and reports the
count per worker and the largest worker's share. ``wrk -c32`` (scenario 1) opens 32 connections,
so the 32 row is what the throughput numbers ran on. Needs Debian's nginx (the upstream).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import paths, upstream
from bench.procs import Procs, raise_nofile, sockets_on, tree


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def one_round(procs: Procs, cfg: Path, key: str, workers: int, conns: int, rnd: int) -> list[int]:
    run = paths.start_fleetgate(procs, cfg, key, name=f"spread-{conns}-{rnd}",
                                extra=["--workers", str(workers)])
    assert run.proc is not None
    kids = [p for p in tree(run.proc.pid) if p != run.proc.pid]
    body = upstream.REQUEST
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
           % (key.encode(), len(body), body))
    socks = []
    try:
        for _ in range(conns):
            s = socket.create_connection((run.host, run.port), timeout=10)
            s.sendall(req)
            socks.append(s)
        for s in socks:  # every connection answered: accepted and served by some worker
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the gateway closed a connection")
                got += chunk
        live = sockets_on(run.port, "01")
        counts = [len(socket_inodes(k) & live) for k in kids]
    finally:
        for s in socks:
            s.close()
        procs.stop(run.proc)
    if sum(counts) != conns:
        raise RuntimeError(f"found {sum(counts)} of {conns} connections on the workers")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", default="32,1000", help="comma-separated counts")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    raise_nofile()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fg-spread-") as tmp, Procs(Path(tmp)) as procs:
        work = Path(tmp)
        up, _ = paths.start_nginx(procs, work)
        cfg = paths.fleetgate_config(work, up)
        key = paths.create_key(cfg)
        for conns in (int(c) for c in a.connections.split(",")):
            shares = []
            for rnd in range(a.rounds):
                counts = one_round(procs, cfg, key, a.workers, conns, rnd)
                share = max(counts) / conns
                shares.append(share)
                results.append({"connections": conns, "round": rnd, "per_worker": counts})
                print(f"{conns:6d} connections, round {rnd}: per worker {counts}, "
                      f"largest share {share:.0%}", flush=True)
            print(f"{conns:6d} connections: largest worker's share median "
                  f"{statistics.median(shares):.0%}, worst {max(shares):.0%} "
                  f"(even: {1 / a.workers:.0%})", flush=True)
    out = Path(__file__).resolve().parent / "results" / f"spread-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "runs": results}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
