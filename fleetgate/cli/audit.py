"""``fleetgate audit``: the audit log, newest first."""

from __future__ import annotations

import datetime as dt

import click
import orjson

from fleetgate.cli.keys import _config_opt, _duration, context, store_errors, table
from fleetgate.services import audit as audit_svc
from fleetgate.store import repo


@click.command()
@_config_opt
@click.option("--since", default=None, callback=_duration,
              help="Only the last stretch of time, e.g. 24h, 7d.")
@click.option("--actor", default=None, help="Only what this user (or 'cli') did.")
@click.option("--limit", type=click.IntRange(1, audit_svc.MAX_LIST), default=100,
              show_default=True)
@store_errors
def audit(config_path: str, since: dt.timedelta | None, actor: str | None, limit: int) -> None:
    """Who changed what, on which object, and when (refused attempts included). No secrets.

    \b
    Examples:
      fleetgate audit --config gw.yaml
      fleetgate audit --config gw.yaml --since 24h --actor alice
    """
    rows = audit_svc.list_entries(
        context(config_path), limit=limit, actor=actor,
        since=repo.utcnow() - since if since else None,
    )
    table(
        ("ID", "AT", "ACTOR", "ACTION", "OBJECT", "OUTCOME", "DETAIL"),
        [
            (str(r.id), r.at.strftime("%Y-%m-%d %H:%M:%S"),
             r.actor + (f" (key {r.actor_key_id})" if r.actor_key_id is not None else ""),
             r.action, f"{r.object_type} {r.object_id or ''}".strip(), r.outcome,
             orjson.dumps(r.detail).decode() if r.detail else "")
            for r in rows
        ],
    )
