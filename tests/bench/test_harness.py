"""The benchmark harness's pieces, in a tiny mode, so bench/run can't silently rot.

Nothing here measures speed: it checks that the load generators, the table, the docs writer
and the store seeding work end to end on a few requests. wrk and nginx are only exercised
where they are installed (bench/run installs them); everything else runs everywhere.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import free_port, sim, wait_http  # noqa: E402

from bench import harness, loadgen, paths, report, upstream, wrk  # noqa: E402
from bench.procs import Procs, Sampler, rss_bytes  # noqa: E402

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fast_sim() -> str:
    with sim("demo", "--ttft-ms", "20", "--tokens-per-s", "200") as url:
        yield url


def _target(url: str, body: bytes) -> loadgen.Target:
    port = int(url.rsplit(":", 1)[1])
    return loadgen.Target("127.0.0.1", port, CHAT, body)


async def test_open_loop_holds_its_rate_for_one_second(fast_sim: str) -> None:
    body = json.dumps({"model": "demo", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = await loadgen.open_loop(_target(fast_sim, body), 1000, 1.0, warmup_s=0.1)
    s = r.summary()
    assert s["errors"] == 0 and s["ok"] == s["sent"] == 1000
    assert s["achieved_rps"] > 500  # a loaded CI box may lag, but not by half
    assert 20 <= s["p50_ms"] < 1000  # the simulator's 20 ms TTFT is a floor


async def test_stream_load_times_first_token_and_gaps(fast_sim: str) -> None:
    body = harness.stream_body(5)
    r = await loadgen.stream_load(_target(fast_sim, body), 5, streams_per_worker=2, ramp_s=0.05)
    s = r.summary()
    assert r.failed == 0 and r.completed == 10 and s["peak_in_flight"] >= 2
    assert 20 <= s["ttft_p50_ms"] < 1000
    assert 2 <= s["gap_p50_ms"] < 100  # 200 tokens/s: ~5 ms apart


def test_percentile_is_nearest_rank() -> None:
    assert loadgen.percentile([3, 1, 2, 4], 50) == 2
    assert loadgen.percentile(list(range(1, 101)), 99) == 99
    assert loadgen.percentile([], 50) != loadgen.percentile([], 50)  # NaN


def _results() -> dict:
    s1 = {"direct": {"rps": 50000.0, "p50_ms": 0.3, "p99_ms": 1.0},
          "fleetgate": {"rps": 12000.0, "p50_ms": 2.0, "p99_ms": 9.0, "cpu_pct": 150.0},
          "fleetgate-1w": {"rps": 9000.0},
          "vllm-router": {"rps": 18000.0, "p50_ms": 1.5, "p99_ms": 4.0},
          "litellm": {"rps": 200.0, "p50_ms": 150.0, "p99_ms": 400.0}}
    return {
        "meta": {"date": "2026-01-01 00:00 UTC", "argv": ["--quick"], "nproc": 2},
        "s1": s1,
        "s2": {"direct": {"p50_ms": 0.1, "p99_ms": 1.0, "added_p50_ms": 0.0, "added_p99_ms": 0.0},
               "fleetgate": {"p50_ms": 0.4, "p99_ms": 7.0, "added_p50_ms": 0.3,
                             "added_p99_ms": 6.0}},
        "s4": {"streams": 5000, "completed": 5000, "peak_in_flight": 5000,
               "peak_rss_mb": 300.0, "cpu_pct": 40.0},
        "s5": {"requests": 1000000, "checkpoint_requests": 100000, "rss_checkpoint_mb": 80.0,
               "rss_end_mb": 84.0, "rss_ratio": 1.05, "rps": 9000.0, "errors": 0,
               "series": [[0, 60.0], [100000, 80.0], [1000000, 84.0]]},
    }


def test_table_has_ratios_and_verdicts() -> None:
    text = report.text_table(_results())
    assert "0.67x" in text  # 12,000 / 18,000
    assert "60x" in text  # 12,000 / 200
    rows = {r[0]: r for r in report.rows(_results())}
    assert rows["1 throughput, req/s (32 conns)"][-1] == "PASS"
    assert rows["2 added p99 ms (minus direct)"][-1] == "MISS"  # 6 ms > 5 ms
    assert rows["4 peak RSS MB"][-1] == "PASS"
    assert rows["5 RSS end / checkpoint"][-1] == "PASS"
    assert rows["1 throughput, FleetGate 1 worker"][2] == "9,000"


def test_docs_section_is_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\nmethod\n\n{report.START}\nold\n{report.END}\n\ntried\n")
    report.write_docs(_results(), doc, "benchmarks.png")
    report.write_docs(_results(), doc, "benchmarks.png")
    text = doc.read_text()
    assert "old" not in text and text.count(report.START) == 1
    assert text.startswith("# B\n\nmethod") and text.rstrip().endswith("tried")
    assert "| 1 throughput, req/s (32 conns) |" in text and "benchmarks.png" in text


def test_plot_or_a_clean_refusal_without_matplotlib(tmp_path: Path) -> None:
    # matplotlib lives in bench/.venvs/bench only: without it the report goes on with no plot.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report.plot(_results(), tmp_path / "b.png") is False
        return
    assert report.plot(_results(), tmp_path / "b.png")
    assert 0 < (tmp_path / "b.png").stat().st_size < 200_000


def test_quick_mode_is_short() -> None:
    a = harness.parse_args(["--quick", "--only", "1,5"])
    assert a.duration == 3.0 and a.soak_requests == 50_000 and a.scenarios == {1, 5}
    assert harness.one_process("--workers 2 --access-log") == ["--access-log"]
    full = harness.parse_args([])
    assert full.soak_requests == 1_000_000 and full.keys == 100_000 and full.streams == 5_000


def test_bulk_keys_use_the_cli_digest(tmp_path: Path) -> None:
    from fleetgate.auth import keys as keyfmt

    cfg = paths.fleetgate_config(tmp_path, "http://127.0.0.1:9")
    key_file = tmp_path / "keys.txt"
    paths.bulk_keys(cfg, 25, key_file, batch=10)
    ks = key_file.read_text().split()
    assert len(ks) == 25 and all(keyfmt.well_formed(k) for k in ks)
    with sqlite3.connect(tmp_path / "fleetgate.db") as db:
        digests = {d for (d,) in db.execute("select digest from api_keys")}
    assert digests == {keyfmt.digest(k) for k in ks}


def test_lua_script_and_nginx_conf(tmp_path: Path) -> None:
    s = wrk.lua_script(tmp_path / "a.lua", url_path=CHAT, body=upstream.REQUEST, key="fg-x")
    text = s.read_text()
    assert 'wrk.method = "POST"' in text and "Bearer fg-x" in text and "WRKJSON" in text
    kf = tmp_path / "keys.txt"
    kf.write_text("a\nb\n")
    assert "math.random(#keys)" in wrk.lua_script(tmp_path / "b.lua", url_path=CHAT,
                                                  body=upstream.REQUEST, key_file=kf).read_text()
    conf = upstream.nginx_conf(tmp_path / "ng", 8080).read_text()
    assert "listen 127.0.0.1:8080" in conf and "return 200 '" in conf
    assert json.loads(upstream.BODY)["usage"]["total_tokens"] == 18


def test_sampler_sees_this_process() -> None:
    import os

    with Sampler(os.getpid(), interval_s=0.05) as smp:
        sum(range(200_000))
        time.sleep(0.1)
    assert smp.peak_rss >= rss_bytes(os.getpid()) // 2 > 0 and smp.cpu_s >= 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (bench/run installs it)")
def test_wrk_against_the_simulator(fast_sim: str, tmp_path: Path) -> None:
    s = wrk.lua_script(tmp_path / "s.lua", url_path=CHAT, body=upstream.REQUEST, key="x")
    r = wrk.run(fast_sim, s, duration_s=1, connections=4)
    assert r["requests"] > 10 and r["non_2xx"] == 0 and r["p50_ms"] >= 20


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx not installed (bench/run installs it)")
def test_nginx_upstream_answers_the_fixed_body(tmp_path: Path) -> None:
    import urllib.request

    port = free_port()
    with Procs(tmp_path) as procs:
        ng = procs.start("nginx", upstream.nginx_argv(tmp_path / "ng", port))
        wait_http(f"http://127.0.0.1:{port}/", 10, None)
        req = urllib.request.Request(f"http://127.0.0.1:{port}{CHAT}", data=upstream.REQUEST,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["content-type"] == "application/json"
            assert json.loads(r.read()) == json.loads(upstream.BODY)
        assert ng.alive()
    assert not ng.alive()


def test_bench_run_is_executable_and_documents_itself() -> None:
    run = ROOT / "bench" / "run"
    assert run.stat().st_mode & 0o111
    out = subprocess.run(["bash", "-n", str(run)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
