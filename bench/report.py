"""The tables, the bars, the plot, and the results section of ``docs/benchmarks.md``.

Everything here is a pure function of the results dict that :mod:`bench.harness` builds (also
saved as ``bench/results/latest.json``), so a saved run can be re-rendered (``--render``).

A ratio or difference between two paths is taken within each round of scenarios 1 and 2 (both
ran minutes apart on the same machine), and the median over the rounds is what a bar is judged
on; the per-round values are printed beside it, so the noise shows. A bar whose measurement
the run didn't make (a path left out, a smaller run than the bar names) is ``-``, never a pass.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.paths import ALL, SPECS

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
ROUTER, LITELLM = "vllm-router", "litellm"
FG, FG_NOLIMITS, FG_REDIS, FG_WORKERS = ("fleetgate", "fleetgate-nolimits", "fleetgate-redis",
                                         "fleetgate-workers")
FG_NOLIMITS_WORKERS = "fleetgate-nolimits-workers"

Results = dict[str, Any]


def _get(results: Results, *keys: str) -> Any:
    cur: Any = results
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


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


def _x(r: float | None) -> str:
    if r is None:
        return "-"
    if r < 0.01:
        return f"{r:.4f}x"
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def label(results: Results, name: str) -> str:
    """The path's label as the run recorded it (else as :data:`SPECS` has it now)."""
    rec = _get(results, "meta", "paths", name, "label")
    if rec:
        return str(rec)
    spec = SPECS.get(name)
    return spec.label.format(n=_get(results, "meta", "workers") or "N") if spec else name


def _order(results: Results, scen: str) -> list[str]:
    have = results.get(scen) or {}
    return [p for p in ALL if p in have] + [p for p in have if p not in ALL]


# -- same-round comparisons ------------------------------------------------------------------


def paired(results: Results, scen: str, a: str, b: str, metric: str,
           op: Callable[[float, float], float]) -> tuple[float | None, list[float]]:
    """``op(a, b)`` on ``metric`` per round where both ran; (median, per-round values).

    Results without rounds (one run per path) give the one value.
    """
    ra, rb = _get(results, scen, a, "rounds"), _get(results, scen, b, "rounds")
    vals: list[float] = []
    if isinstance(ra, list) and isinstance(rb, list):
        by_round = {x.get("round"): x for x in rb}
        for x in ra:
            y = by_round.get(x.get("round"))
            if y is not None and _num(x.get(metric)) and _num(y.get(metric)):
                with_b = op(x[metric], y[metric])
                if _num(with_b):
                    vals.append(with_b)
    else:
        va, vb = _get(results, scen, a, metric), _get(results, scen, b, metric)
        if _num(va) and _num(vb):
            vals.append(op(va, vb))
    return (statistics.median(vals) if vals else None), vals


def _div(x: float, y: float) -> float:
    return x / y if y else math.nan


def _sub(x: float, y: float) -> float:
    return x - y


def ratio(results: Results, scen: str, a: str, b: str, metric: str = "rps"
          ) -> tuple[float | None, list[float]]:
    return paired(results, scen, a, b, metric, _div)


def _rounds_note(vals: list[float], fmt: Callable[[float], str]) -> str:
    return f" (rounds: {', '.join(fmt(v) for v in vals)})" if len(vals) > 1 else ""


# -- the per-scenario tables -----------------------------------------------------------------

Table = tuple[list[str], list[list[str]]]


def s1_table(results: Results) -> Table | None:
    if not results.get("s1"):
        return None
    head = ["path", "req/s", "vs vllm-router", "p50 ms", "p99 ms", "CPU, % of a core",
            "CPU µs/request", "errors"]
    rows = []
    for p in _order(results, "s1"):
        r = results["s1"][p]
        cpu = _fmt(r.get("cpu_us_per_req"))
        if _num(r.get("redis_cpu_us_per_req")):
            cpu += f" (+{_fmt(r['redis_cpu_us_per_req'])} in Redis)"
        vs, _ = ratio(results, "s1", p, ROUTER)
        rows.append([label(results, p), _fmt(r.get("rps")), _x(vs), _fmt(r.get("p50_ms")),
                     _fmt(r.get("p99_ms")), _fmt(r.get("cpu_pct")), cpu, _fmt(r.get("errors"))])
    return head, rows


def s2_table(results: Results) -> Table | None:
    if not results.get("s2"):
        return None
    head = ["path", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "achieved req/s",
            "errors", "generator lag p99 ms"]
    rows = []
    for p in _order(results, "s2"):
        r = results["s2"][p]
        rows.append([label(results, p), *(_fmt(r.get(k)) for k in (
            "p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms", "achieved_rps", "errors",
            "lag_p99_ms"))])
    return head, rows


def s3_table(results: Results) -> Table | None:
    if not results.get("s3"):
        return None
    head = ["path", "streams done / failed", "TTFT p50 ms", "TTFT p99 ms", "added TTFT p50 ms",
            "chunk gap p50 ms", "chunk gap p99 ms"]
    rows = []
    for p in _order(results, "s3"):
        r = results["s3"][p]
        rows.append([label(results, p), f"{_fmt(r.get('completed'))} / {_fmt(r.get('failed'))}",
                     *(_fmt(r.get(k)) for k in ("ttft_p50_ms", "ttft_p99_ms",
                                                "added_ttft_p50_ms", "gap_p50_ms",
                                                "gap_p99_ms"))])
    return head, rows


def rest_table(results: Results) -> Table | None:
    """Scenarios 4-6, one FleetGate process each."""
    rows: list[list[str]] = []
    s4 = results.get("s4")
    if s4:
        rows += [
            ["4", "streams completed", f"{s4['completed']:,} / {s4['streams']:,}"],
            ["4", "peak concurrent streams", _fmt(s4.get("peak_in_flight"))],
            ["4", "peak RSS MB", _fmt(s4.get("peak_rss_mb"))],
            ["4", "gateway CPU, % of a core", _fmt(s4.get("cpu_pct"))],
            ["4", "open-file limit", _fmt(s4.get("nofile"))],
        ]
    s5 = results.get("s5")
    if s5:
        rows += [
            ["5", f"RSS MB at {s5['checkpoint_requests']:,} requests",
             _fmt(s5.get("rss_checkpoint_mb"))],
            ["5", f"RSS MB at the end ({s5['requests']:,} requests)", _fmt(s5.get("rss_end_mb"))],
            ["5", "RSS end / checkpoint", _fmt(s5.get("rss_ratio"))],
            ["5", "soak req/s, errors", f"{s5['rps']:,.0f}, {s5['errors']}"],
        ]
    s6 = results.get("s6")
    if s6:
        rows += [
            ["6", f"req/s, {s6['keys']:,} keys, a random key each (cold cache)",
             _fmt(s6.get("rps"))],
            ["6", "req/s, second run (warm cache)", _fmt(s6.get("warm_rps"))],
            ["6", "cold req/s / scenario 1 (FleetGate 1 worker, no limits)",
             _fmt(s6.get("ratio_to_s1"))],
            ["6", "errors", _fmt(s6.get("errors"))],
        ]
    return (["scenario", "metric", "FleetGate"], rows) if rows else None


# -- the bars --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    issue: str
    scenario: str
    bar: str
    measured: str
    ok: bool | None  # None: this run didn't measure it


def _s1_vs_router(results: Results, p: str) -> Bar:
    r, vals = ratio(results, "s1", p, ROUTER)
    fg, router = _get(results, "s1", p, "rps"), _get(results, "s1", ROUTER, "rps")
    measured = "-" if r is None else (f"{_x(r)} ({_fmt(fg)} vs {_fmt(router)} req/s)"
                                      + _rounds_note(vals, _x))
    return Bar("11", "1", f">= 1.5x vllm-router's req/s: {label(results, p)}", measured,
               None if r is None else r >= 1.5)


def _s1_cpu(results: Results, p: str) -> Bar:
    us = _get(results, "s1", p, "cpu_us_per_req")
    redis = _get(results, "s1", p, "redis_cpu_us_per_req")
    measured = f"{_fmt(us)} µs" if _num(us) else "-"
    if _num(redis):
        measured += f" (and {_fmt(redis)} µs in Redis, not counted)"
    return Bar("11", "1", f"<= 50 µs gateway CPU/request: {label(results, p)}", measured,
               None if not _num(us) else us <= 50)


def bars(results: Results) -> list[Bar]:
    out: list[Bar] = []
    s1, s2, s3 = (results.get(k) or {} for k in ("s1", "s2", "s3"))
    # -- issue 11, with the bar set-up (a user in a group, rpm/tpm limit, quota, accounting)
    for p in (FG, FG_WORKERS):
        if p in s1:
            out += [_s1_vs_router(results, p), _s1_cpu(results, p)]
    if FG in s2:
        r = s2[FG]
        a50, a99, rate = r.get("added_p50_ms"), r.get("added_p99_ms"), r.get("target_rps")
        ok = None
        if _num(a50) and _num(a99) and _num(rate) and rate >= 1000:
            ok = a50 <= 0.25 and a99 <= 1.0
        out.append(Bar("11", "2", f"added p50 <= 0.25 ms and p99 <= 1 ms at 1,000 req/s: "
                       f"{label(results, FG)}",
                       f"+{_fmt(a50)} / +{_fmt(a99)} ms at {_fmt(r.get('achieved_rps'))} req/s",
                       ok))
    if FG in s3:
        r, d = s3[FG], s3.get("direct") or {}
        add = r.get("added_ttft_p50_ms")
        g50 = r.get("gap_p50_ms", math.nan) - d.get("gap_p50_ms", math.nan)
        g99 = r.get("gap_p99_ms", math.nan) - d.get("gap_p99_ms", math.nan)
        ok = None
        if _num(add) and _num(g50) and _num(g99):
            ok = add <= 0.5 and abs(g50) <= 1.0 and abs(g99) <= 1.0
        out.append(Bar("11", "3", "added TTFT p50 <= 0.5 ms; chunk gaps unchanged (p50 and p99 "
                       f"within 1 ms of direct): {label(results, FG)}",
                       f"+{_fmt(add)} ms; gaps {g50:+.2f} / {g99:+.2f} ms vs direct", ok))
    s4 = results.get("s4")
    if s4:
        n, done, rss = s4["streams"], s4["completed"], s4.get("peak_rss_mb")
        ok = None if n < 10_000 else (done == n and _num(rss) and rss < 1024)
        out.append(Bar("11", "4", "10,000 concurrent streams through one process, all "
                       "completing, under 1 GB",
                       f"{done:,} / {n:,} completed, peak {_fmt(s4.get('peak_in_flight'))} at "
                       f"once, {_fmt(rss)} MB" + (" (a smaller run than the bar)"
                                                  if n < 10_000 else ""), ok))
    s5 = results.get("s5")
    if s5:
        full = s5["requests"] >= 1_000_000
        rr = s5.get("rss_ratio")
        out.append(Bar("11", "5", "RSS at the end of 1,000,000 requests <= 1.05x RSS at 100k",
                       f"{_fmt(rr)}x ({_fmt(s5.get('rss_checkpoint_mb'))} -> "
                       f"{_fmt(s5.get('rss_end_mb'))} MB over {s5['requests']:,} requests)",
                       None if not full or not _num(rr) else rr <= 1.05))
    # -- issue 9: the same set-up against the same path without limits, same rounds
    if FG in s1 and FG_NOLIMITS in s1:
        r, vals = ratio(results, "s1", FG, FG_NOLIMITS)
        out.append(Bar("9", "1", "limits >= 0.9x no limits (1 worker, memory backend)",
                       _x(r) + _rounds_note(vals, _x), None if r is None else r >= 0.9))
    if FG in s2 and FG_NOLIMITS in s2:
        d50, v50 = paired(results, "s2", FG, FG_NOLIMITS, "p50_ms", _sub)
        d99, v99 = paired(results, "s2", FG, FG_NOLIMITS, "p99_ms", _sub)
        ok = None if d50 is None or d99 is None else d50 <= 0.2 and d99 <= 0.2
        out.append(Bar("9", "2", "added p50 and p99 <= 0.2 ms above no limits",
                       f"p50 {_fmt(d50)} ms, p99 {_fmt(d99)} ms"
                       + _rounds_note(v50, lambda v: f"{v:+.2f}")
                       + _rounds_note(v99, lambda v: f"{v:+.2f}"), ok))
    if FG_WORKERS in s1 and FG_REDIS in s1:
        r, vals = ratio(results, "s1", FG_WORKERS, FG_REDIS)
        out.append(Bar("9", "1", f"{label(results, FG_WORKERS)} >= 1.2x "
                       f"{label(results, FG_REDIS)}", _x(r) + _rounds_note(vals, _x),
                       None if r is None else r >= 1.2))
    # -- issue 4's bars, kept: its set-up was keys and accounting, no limits, one worker a core
    p = next((x for x in (FG_NOLIMITS_WORKERS, FG_NOLIMITS, FG_WORKERS, FG) if x in s1), FG)
    if p in s1 and (ROUTER in s1 or LITELLM in s1):
        vr, _ = ratio(results, "s1", p, ROUTER)
        vl, _ = ratio(results, "s1", p, LITELLM)
        ok = None
        if vr is not None or vl is not None:
            ok = (vr is None or vr >= 0.5) and (vl is None or vl >= 25)
        out.append(Bar("4", "1", f">= 0.5x vllm-router, >= 25x LiteLLM: {label(results, p)}",
                       f"{_x(vr)} vllm-router, {_x(vl)} {label(results, LITELLM)}", ok))
    s6 = results.get("s6")
    if s6:
        r6 = s6.get("ratio_to_s1")
        out.append(Bar("4", "6", "scenario 1's throughput holds with 100,000 keys (>= 0.9x, "
                       "cold cache)", f"{_fmt(r6)}x with {s6['keys']:,} keys",
                       None if not _num(r6) or s6["keys"] < 100_000 else r6 >= 0.9))
    return out


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def bars_table(results: Results) -> Table | None:
    bs = bars(results)
    if not bs:
        return None
    return (["issue", "scenario", "bar", "measured", "verdict"],
            [[b.issue, b.scenario, b.bar, b.measured, _verdict(b.ok)] for b in bs])


# -- rendering -------------------------------------------------------------------------------


def tables(results: Results) -> list[tuple[str, Table]]:
    out = []
    for title, fn in (
        ("Scenario 1: throughput, `wrk -t1 -c32`", s1_table),
        ("Scenario 2: latency at a fixed 1,000 req/s (open loop; added = minus direct, same "
         "round)", s2_table),
        ("Scenario 3: 100 concurrent streams, 50 tokens/s", s3_table),
        ("Scenarios 4-6", rest_table),
        ("The bars", bars_table),
    ):
        t = fn(results)
        if t is not None:
            out.append((title, t))
    return out


def _markdown(t: Table) -> str:
    head, rows = t
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _text(t: Table) -> str:
    head, rows = t
    data = [head, *rows]
    widths = [max(len(r[i]) for r in data) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(results: Results) -> str:
    return "\n\n".join(f"**{title}**\n\n{_markdown(t)}" for title, t in tables(results))


def text_table(results: Results) -> str:
    return "\n\n".join(f"== {title}\n{_text(t)}" for title, t in tables(results))


def plot(results: Results, png: Path) -> bool:
    """Throughput per path (log scale) and the soak's RSS; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    ax = axes[0]
    names = [p for p in _order(results, "s1") if _num(_get(results, "s1", p, "rps"))]
    vals = [results["s1"][p]["rps"] for p in names]
    colors = ["#2a7" if p.startswith("fleetgate") else "#888" for p in names]
    bars_ = ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_title("Scenario 1: requests/s, 32 connections")
    for b, v in zip(bars_, vals[::-1], strict=True):
        ax.annotate(f" {v:,.0f}", (v, b.get_y() + b.get_height() / 2), va="center", fontsize=8)
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
    legend = (["path", "label", "how it runs"],
              [[f"`{p}`", str(v.get("label", p)), str(v.get("how", ""))]
               for p, v in (m.get("paths") or {}).items()])
    parts = [
        START,
        f"Run on {m.get('date', '?')} with `{' '.join(['bench/run', *m.get('argv', [])])}` "
        f"(FleetGate at {m.get('git', '?')}, {m.get('build', 'pure')} build; "
        f"N = {m.get('workers', '?')} workers; "
        f"scenarios 1-2 in {m.get('rounds', 1)} interleaved round(s), medians shown; "
        f"open-file limit {m.get('nofile', '?')}).",
        "",
        f"Machine: {m.get('nproc', '?')} cores ({m.get('cpu', '?')}), "
        f"{m.get('mem_gb', '?')} GB memory, {m.get('kernel', '?')}, Python {m.get('python', '?')}; "
        f"wrk {m.get('wrk', '?')}, nginx {m.get('nginx', '?')}.",
        "",
    ]
    if legend[1]:
        parts += [_markdown(legend), ""]
    parts.append(markdown_table(results))
    if results.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in
                                               results["skipped"].items())]
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
