"""``fleetgate up``, ``down`` and ``status``: a running gateway's fleet API, over HTTP.

Thin on purpose: each command is one or a few calls to ``/v1/fleet/*`` (see
:mod:`fleetgate.fleet.api_handlers`) and prints the answer. ``up --wait`` polls
``/v1/fleet/status`` every half second, bounded by ``--timeout``. ``up`` takes a configured
model's name or a model path a template matches (the gateway tells them apart). A replica whose job still
waits in a scheduler's queue shows as ``queued (REASON)``, with the queue's estimate.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

import click

_CONNECTION = [
    click.option(
        "--url",
        default="http://127.0.0.1:8000",
        envvar="FLEETGATE_URL",
        show_default=True,
        help="The gateway's base URL (env FLEETGATE_URL).",
    ),
    click.option(
        "--key",
        envvar="FLEETGATE_API_KEY",
        default=None,
        help="API key (env FLEETGATE_API_KEY).",
    ),
]


def _connection(f: Any) -> Any:
    for opt in reversed(_CONNECTION):
        f = opt(f)
    return f


class Client:
    def __init__(self, url: str, key: str | None, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("accept", "application/json")
        if data is not None:
            req.add_header("content-type", "application/json")
        if self.key:
            req.add_header("authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                doc = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise click.ClickException(_error_text(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise click.ClickException(f"cannot reach {self.url}: {reason}") from None
        if not isinstance(doc, dict):
            raise click.ClickException(f"unexpected answer from {path}: {doc!r}")
        return doc


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        msg = json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = e.reason
    return f"{e.code}: {msg}"


def _model(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    for m in doc.get("models", []):
        if m.get("model") == name:
            return dict(m)
    return None


def replica_state(r: dict[str, Any]) -> str:
    """A replica's state as people read it: a job still in a scheduler's queue is "queued",
    with the scheduler's reason."""
    if r.get("slurm_state") == "PENDING" and r.get("state") in ("pending", "starting"):
        reason = r.get("pending_reason")
        return f"queued ({reason})" if reason else "queued"
    return str(r.get("state"))


def _progress(m: dict[str, Any], elapsed: float) -> str:
    reps = [r for r in m.get("replicas", []) if r.get("state") not in ("stopped",)]
    states = ",".join(replica_state(r) for r in reps) or "-"
    line = ""
    for r in reps:
        if r.get("note"):
            line = r["note"]
        if r.get("last_log_line"):
            line = r["last_log_line"]
    out = f"[{elapsed:6.1f}s] {m['model']}: {m.get('status')} (replicas: {states})"
    return out + (f" | {line[:120]}" if line else "")


@click.command(
    "up",
    epilog="""\b
Examples:
  fleetgate up demo                 # ask the gateway to start it; returns at once
  fleetgate up demo --wait          # show progress until it is healthy
  FLEETGATE_API_KEY=fg-... fleetgate up demo --wait --url http://gpu-host:8000
  fleetgate up Qwen/Qwen3-8B --wait # a path an admin's template matches (docs/templates.md)
""",
)
@click.argument("model")
@click.option("--wait", is_flag=True, help="Show progress until the model is healthy.")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True)
@_connection
def up(model: str, wait: bool, timeout_s: float, url: str, key: str | None) -> None:
    """Start MODEL's replicas on a running gateway (POST /v1/fleet/up).

    MODEL is a configured model's name, or a model path that a template matches: the gateway
    starts it from the template and serves it under the path."""
    c = Client(url, key)
    doc = c.call("POST", "/v1/fleet/up", {"model": model})
    click.echo(f"{model}: {doc.get('status')}")
    if not wait or doc.get("status") == "healthy":
        return
    started = time.monotonic()
    last = ""
    for _ in range(int(timeout_s / 0.5) + 1):
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            break
        m = _model(c.call("GET", f"/v1/fleet/status?model={quote(model)}"), model)
        if m is None:
            raise click.ClickException(f"{model} is not in the gateway's status")
        line = _progress(m, elapsed)
        if line != last:
            click.echo(line)
            last = line
        if m.get("status") == "healthy":
            return
        if m.get("status") == "failed":
            raise click.ClickException(f"{model} failed: {m.get('last_failure')}")
        time.sleep(0.5)
    raise click.ClickException(f"{model} is not healthy after {timeout_s:g}s")


@click.command(
    "down",
    epilog="""\b
Examples:
  fleetgate down demo               # drain and stop demo's replicas
""",
)
@click.argument("model")
@_connection
def down(model: str, url: str, key: str | None) -> None:
    """Drain and stop MODEL's replicas on a running gateway (POST /v1/fleet/down)."""
    doc = Client(url, key).call("POST", "/v1/fleet/down", {"model": model})
    click.echo(f"{model}: {doc.get('status')}")


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def table(doc: dict[str, Any]) -> str:
    """The status document as a fixed-width table: one line per replica (or per idle model)."""
    rows = [("MODEL", "STATUS", "REPLICA", "STATE", "INFLIGHT", "IDLE", "AGE", "REASON")]
    for m in doc.get("models", []):
        reps = m.get("replicas", [])
        if not reps:
            rows.append(
                (m["model"], str(m.get("status")), "-", "-", "0", _age(m.get("idle_s")), "-", "")
            )
        for r in reps:
            reason = str(r.get("reason", "")).splitlines()[0][:60] if r.get("reason") else ""
            if r.get("note"):  # what the launcher says now (a queued job's reason) beats history
                reason = str(r["note"])[:80]
            rows.append(
                (
                    m["model"],
                    str(m.get("status")),
                    r["id"],
                    replica_state(r),
                    str(r.get("inflight", 0)),
                    _age(r.get("idle_s")),
                    _age(r.get("age_s")),
                    reason,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


@click.command(
    "status",
    epilog="""\b
Examples:
  fleetgate status                  # table of models, replicas, states, in-flight, idle time
  fleetgate status --json           # the full document from GET /v1/fleet/status
""",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document.")
@click.option("--model", default=None, help="Only this model.")
@_connection
def status(as_json: bool, model: str | None, url: str, key: str | None) -> None:
    """Show the fleet of a running gateway (GET /v1/fleet/status)."""
    path = "/v1/fleet/status" + (f"?model={quote(model)}" if model else "")
    doc = Client(url, key).call("GET", path)
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        click.echo()
    else:
        click.echo(table(doc))
