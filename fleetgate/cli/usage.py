"""``fleetgate usage``: requests and tokens per key and model, read from the store."""

from __future__ import annotations

import datetime as dt

import click

from fleetgate.cli.keys import _config_opt, _duration, _engine, store_errors
from fleetgate.cli.serve import load_or_exit
from fleetgate.store import repo


@click.command()
@_config_opt
@click.option("--since", default=None, callback=_duration,
              help="Only the last stretch of time, e.g. 24h, 7d (default: everything).")
@store_errors
def usage(config_path: str, since: dt.timedelta | None) -> None:
    """Requests and tokens per key and model, from the store.

    \b
    Examples:
      fleetgate usage --config gw.yaml
      fleetgate usage --config gw.yaml --since 7d
    """
    settings = load_or_exit(config_path)
    engine = _engine(settings)
    names = {k.id: f"{k.name} ({k.prefix}…)" for k in repo.list_keys(engine)}
    rows = repo.usage_totals(engine, repo.utcnow() - since if since else None)
    header = ("KEY", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS")
    table = [header]
    for r in rows:
        kid = r["key_id"]
        who = names.get(kid, f"id {kid}") if isinstance(kid, int) else "(no key: static/none auth)"
        table.append((who, str(r["model"]), str(r["requests"]), str(r["prompt_tokens"]),
                      str(r["completion_tokens"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
