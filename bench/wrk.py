"""wrk: the closed-loop load generator for throughput (scenarios 1, 5, 6).

wrk posts the same small chat request on ``-c`` keep-alive connections from one thread
(``-t1``: the other core belongs to the path under test). A generated Lua script sets the body
and the ``Authorization`` header, or picks a random key per request from a key file, and prints
its summary as one ``WRKJSON`` line that :func:`run` parses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""


def _lua_str(s: str) -> str:
    eq = "=" * 4
    assert f"]{eq}]" not in s
    return f"[{eq}[{s}]{eq}]"


def lua_script(path: Path, *, url_path: str, body: bytes, key: str | None = None,
               key_file: Path | None = None) -> Path:
    """Write the Lua script: one fixed key, a random key from ``key_file`` per request, or none."""
    lines = [
        'wrk.method = "POST"',
        f"wrk.path = {_lua_str(url_path)}",
        f"wrk.body = {_lua_str(body.decode())}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if key is not None:
        lines.append(f'wrk.headers["Authorization"] = {_lua_str("Bearer " + key)}')
    if key_file is not None:
        lines += [
            "local keys = {}",
            "init = function(args)",
            f"  for line in io.lines({_lua_str(str(key_file))}) do",
            '    keys[#keys + 1] = "Bearer " .. line',
            "  end",
            "  math.randomseed(os.time())",
            "end",
            "request = function()",
            '  wrk.headers["Authorization"] = keys[math.random(#keys)]',
            "  return wrk.format()",
            "end",
        ]
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


def binary() -> str | None:
    return shutil.which("wrk")


def run(url: str, script: Path, *, duration_s: float, connections: int = 32,
        threads: int = 1, timeout_s: float = 10) -> dict[str, Any]:
    """Run wrk and return requests/s, latency percentiles (ms) and error counts."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("wrk is not installed (bench/run installs Debian's wrk)")
    argv = [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            f"--timeout={int(timeout_s)}s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=duration_s + timeout_s + 30)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[8:])
            break
    else:
        raise RuntimeError(f"wrk printed no summary (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")
    secs = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "requests": raw["requests"],
        "duration_s": round(secs, 3),
        "rps": raw["requests"] / secs if secs else 0.0,
        "mean_ms": raw["mean_us"] / 1000,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non_2xx": raw["status"],
        "socket_errors": errors,
        "errors": raw["status"] + errors,
    }
