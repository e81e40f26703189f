"""The comparison table, the plot, and the results section of ``docs/benchmarks.md``.

Everything here is a pure function of the results dict that :mod:`bench.harness` builds (also
saved as ``bench/results/latest.json``), so the table can be re-rendered from a saved run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

PATHS = ("direct", "fleetgate", "vllm-router", "litellm")
PEERS = ("vllm-router", "litellm")
START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

Results = dict[str, Any]


def _get(results: Results, *keys: str) -> Any:
    cur: Any = results
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ratio(a: Any, b: Any, higher_is_better: bool) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not a or not b:
        return "-"
    r = a / b if higher_is_better else b / a
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def rows(results: Results) -> list[list[str]]:
    """Table rows: metric, one column per path, FleetGate's ratio to each peer, bar, verdict."""
    out: list[list[str]] = []

    def per_path(label: str, scen: str, metric: str, *, higher: bool = True,
                 bar: str = "", ok: bool | None = None, fg: str = "fleetgate") -> None:
        vals = {p: _get(results, scen, fg if p == "fleetgate" else p, metric) for p in PATHS}
        if fg != "fleetgate":
            vals["direct"] = None
        fg = vals["fleetgate"]
        ratios = [_ratio(fg, vals[peer], higher) for peer in PEERS]
        out.append([label, *(_fmt(vals[p]) for p in PATHS), *ratios, bar, _verdict(ok)])

    def single(label: str, value: Any, bar: str = "", ok: bool | None = None,
               direct: Any = None) -> None:
        out.append([label, _fmt(direct), _fmt(value), "-", "-", "-", "-", bar, _verdict(ok)])

    s1 = results.get("s1") or {}
    fg1 = _get(results, "s1", "fleetgate", "rps")
    if s1:
        router, lite = _get(results, "s1", "vllm-router", "rps"), _get(results, "s1", "litellm", "rps")
        ok = None
        if fg1 is not None and (router is not None or lite is not None):
            ok = (router is None or fg1 >= 0.5 * router) and (lite is None or fg1 >= 25 * lite)
        per_path("1 throughput, req/s (32 conns)", "s1", "rps",
                 bar=">= 0.5x router, >= 25x LiteLLM", ok=ok)
        if _get(results, "s1", "fleetgate-1w", "rps") is not None:
            per_path("1 throughput, FleetGate 1 worker", "s1", "rps", fg="fleetgate-1w")
        per_path("1 p50 ms", "s1", "p50_ms", higher=False)
        per_path("1 p99 ms", "s1", "p99_ms", higher=False)
        per_path("1 path CPU, % of one core", "s1", "cpu_pct", higher=False)
        per_path("1 errors (non-2xx + socket)", "s1", "errors", higher=False)
    s2 = results.get("s2") or {}
    if s2:
        per_path("2 p50 ms @ 1000 req/s", "s2", "p50_ms", higher=False)
        per_path("2 p99 ms @ 1000 req/s", "s2", "p99_ms", higher=False)
        add50 = _get(results, "s2", "fleetgate", "added_p50_ms")
        add99 = _get(results, "s2", "fleetgate", "added_p99_ms")
        per_path("2 added p50 ms (minus direct)", "s2", "added_p50_ms", higher=False,
                 bar="<= 1 ms", ok=None if add50 is None else add50 <= 1.0)
        per_path("2 added p99 ms (minus direct)", "s2", "added_p99_ms", higher=False,
                 bar="<= 5 ms", ok=None if add99 is None else add99 <= 5.0)
    s3 = results.get("s3") or {}
    if s3:
        per_path("3 TTFT p50 ms (100 streams)", "s3", "ttft_p50_ms", higher=False)
        per_path("3 TTFT p99 ms", "s3", "ttft_p99_ms", higher=False)
        add = _get(results, "s3", "fleetgate", "added_ttft_p50_ms")
        per_path("3 added TTFT p50 ms", "s3", "added_ttft_p50_ms", higher=False,
                 bar="<= 2 ms", ok=None if add is None else add <= 2.0)
        per_path("3 chunk gap p50 ms", "s3", "gap_p50_ms", higher=False)
        per_path("3 chunk gap p99 ms", "s3", "gap_p99_ms", higher=False)
    s4 = results.get("s4")
    if s4:
        done_ok = s4["completed"] == s4["streams"]
        single("4 streams completed", f"{s4['completed']}/{s4['streams']}", "all", done_ok)
        single("4 peak concurrent streams", s4["peak_in_flight"])
        single("4 peak RSS MB", s4["peak_rss_mb"], "< 1024 MB", s4["peak_rss_mb"] < 1024)
        single("4 gateway CPU, % of one core", s4["cpu_pct"])
    s5 = results.get("s5")
    if s5:
        single(f"5 RSS MB at {s5['checkpoint_requests']:,} req", s5["rss_checkpoint_mb"])
        single(f"5 RSS MB at end ({s5['requests']:,} req)", s5["rss_end_mb"])
        single("5 RSS end / checkpoint", s5["rss_ratio"], "<= 1.1x", s5["rss_ratio"] <= 1.1)
        single("5 soak req/s, errors", f"{s5['rps']:,.0f}, {s5['errors']}")
    s6 = results.get("s6")
    if s6:
        ok = s6.get("ratio_to_s1")
        single(f"6 req/s, {s6['keys']:,} keys, random key (cold cache)", s6["rps"])
        single("6 req/s, second run (warm cache)", s6["warm_rps"])
        single("6 cold req/s / scenario 1 req/s", ok, ">= ~1 (holds)",
               None if ok is None else ok >= 0.9)
    return out


HEADER = ["metric", *PATHS, "FG vs router", "FG vs LiteLLM", "bar", "verdict"]


def markdown_table(results: Results) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return "\n".join(lines)


def text_table(results: Results) -> str:
    data = [HEADER, *rows(results)]
    widths = [max(len(r[i]) for r in data) for i in range(len(HEADER))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(data[0]), fmt(["-" * w for w in widths]), *map(fmt, data[1:])])


def plot(results: Results, png: Path) -> bool:
    """Throughput per path (log scale) and the soak's RSS; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    ax = axes[0]
    names = [p for p in PATHS if _get(results, "s1", p, "rps")]
    vals = [results["s1"][p]["rps"] for p in names]
    bars = ax.bar(names, vals, color=["#888", "#2a7", "#c63", "#36c"][: len(names)])
    ax.set_yscale("log")
    ax.set_title("Scenario 1: requests/s, 32 connections")
    for b, v in zip(bars, vals, strict=True):
        ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)
    ax = axes[1]
    series = _get(results, "s5", "series") or []
    if series:
        ax.plot([r / 1000 for r, _ in series], [m for _, m in series], color="#2a7")
        ax.set_xlabel("requests (thousands)")
        ax.set_ylabel("FleetGate RSS (MB)")
        ax.set_ylim(bottom=0)
    ax.set_title("Scenario 5: RSS during the soak")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return True


def results_section(results: Results, png_name: str | None) -> str:
    m = results.get("meta", {})
    parts = [
        START,
        f"Run on {m.get('date', '?')} with `{' '.join(['bench/run', *m.get('argv', [])])}` "
        f"(FleetGate at {m.get('git', '?')}, `fleetgate serve {m.get('fleetgate_args', '')}`).",
        "",
        f"Machine: {m.get('nproc', '?')} cores ({m.get('cpu', '?')}), "
        f"{m.get('mem_gb', '?')} GB memory, {m.get('kernel', '?')}, Python {m.get('python', '?')}; "
        f"wrk {m.get('wrk', '?')}, nginx {m.get('nginx', '?')}.",
        "",
        markdown_table(results),
    ]
    if png_name:
        parts += ["", f"![throughput and soak RSS]({png_name})"]
    parts.append(END)
    return "\n".join(parts)


def write_docs(results: Results, doc: Path, png_name: str | None) -> None:
    """Replace the results section of ``doc`` (between the markers), keeping the rest."""
    section = results_section(results, png_name)
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text,
                  flags=re.S)
    doc.write_text(text)
