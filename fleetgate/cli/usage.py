"""``fleetgate usage``: requests and tokens per user, key, model or day, read from the store.

A thin layer over :func:`fleetgate.services.usage_report.totals`, printed as a table, CSV or a
JSON list of objects (each with the ``--by`` dimension's key and the token counts).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys

import click

from fleetgate.cli.keys import _config_opt, _duration, context, store_errors, table
from fleetgate.services import usage_report
from fleetgate.store import repo

_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "disconnected")


def _label(by: str, row: dict[str, object]) -> str:
    if by != "key":
        return str(row[by] if row[by] is not None else "-")
    if row["key"] is None:
        return "(no key: static/none auth)"
    return f"{row['key_name']} (id {row['key']}, {row['user'] or '-'})"


@click.command()
@_config_opt
@click.option("--by", type=click.Choice(usage_report.BY), default="key", show_default=True,
              help="What to group by.")
@click.option("--since", default=None, callback=_duration,
              help="Only the last stretch of time, e.g. 24h, 7d (default: everything).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="json: a list of objects; csv: a header row, then rows.")
@store_errors
def usage(config_path: str, by: str, since: dt.timedelta | None, fmt: str) -> None:
    """Requests and tokens (prompt, completion, total) and client disconnects, from the store.

    \b
    Examples:
      fleetgate usage --config gw.yaml
      fleetgate usage --config gw.yaml --by user --since 7d
      fleetgate usage --config gw.yaml --by day --since 30d --format csv > usage.csv
      fleetgate usage --config gw.yaml --by model --format json | jq .
    """
    rows = usage_report.totals(context(config_path), by=by,
                               since=repo.utcnow() - since if since else None)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if fmt == "csv":
        keys = list(rows[0]) if rows else [by, *_COUNTS]
        w = csv.DictWriter(sys.stdout, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return
    table((by.upper(), "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "TOTAL_TOKENS",
           "DISCONNECTED"),
          [(_label(by, r), *(str(r[c]) for c in _COUNTS)) for r in rows])
