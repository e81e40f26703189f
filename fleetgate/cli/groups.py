"""``fleetgate groups``: create, update, list and delete groups (actor ``cli``)."""

from __future__ import annotations

from typing import Any

import click

from fleetgate.cli.keys import (
    _config_opt,
    context,
    fmt_limits,
    globs,
    limit_options,
    pop_limits,
    quota_options,
    quota_period_needs_tokens,
    store_errors,
    table,
)
from fleetgate.services import groups as group_svc
from fleetgate.services.validation import KEEP


@click.group()
def groups() -> None:
    """Manage groups: a model allow-list (globs; empty allows nothing) and a fair-share weight.

    \b
    Examples:
      fleetgate groups create --config gw.yaml nlp --models 'Qwen/*,llama-3-8b' --weight 2
      fleetgate groups update --config gw.yaml nlp --models 'Qwen/*'
      fleetgate groups update --config gw.yaml nlp --rpm 600 --quota-tokens 50000000
      fleetgate groups list --config gw.yaml
      fleetgate groups delete --config gw.yaml nlp --force
    """


@groups.command("create")
@_config_opt
@click.argument("name")
@click.option("--models", default=None, help="Comma-separated names or globs (default: none).")
@click.option("--weight", type=float, default=1.0, show_default=True,
              help="Fair-share weight, above 0.")
@limit_options
@quota_options
@store_errors
def create(config_path: str, name: str, models: str | None, weight: float,
           quota_tokens: int | None, quota_period: str | None, **lim: Any) -> None:
    """Create a group. Its limits and quota are shared by its members together."""
    g = group_svc.create_group(context(config_path), name, models=globs(models) or (),
                               weight=weight, limits=pop_limits(lim), quota_tokens=quota_tokens,
                               quota_period=quota_period_needs_tokens(quota_tokens, quota_period))
    click.echo(f"created group {g.name}")


@groups.command("update")
@_config_opt
@click.argument("name")
@click.option("--models", default=None, help="Replace the list ('' allows no model).")
@click.option("--weight", type=float, default=None, help="Replace the weight.")
@limit_options
@quota_options
@store_errors
def update(config_path: str, name: str, models: str | None, weight: float | None,
           quota_tokens: int | None, quota_period: str | None, **lim: Any) -> None:
    """Change a group; the options given replace the current values."""
    g = group_svc.update_group(
        context(config_path), name, models=KEEP if models is None else (globs(models) or ()),
        weight=KEEP if weight is None else weight, limits=pop_limits(lim),
        quota_tokens=KEEP if quota_tokens is None else quota_tokens,
        quota_period=KEEP if quota_period is None else quota_period,
    )
    click.echo(f"updated group {g.name}: models {','.join(g.models) or '(none)'}, "
               f"weight {g.weight:g}, limits {fmt_limits(g.limits, g.quota)}")


@groups.command("list")
@_config_opt
@store_errors
def list_(config_path: str) -> None:
    """List groups: name, models, weight, members, limits and quota."""
    rows = [
        (g.name, ",".join(g.models) or "-", f"{g.weight:g}", ",".join(g.members) or "-",
         fmt_limits(g.limits, g.quota))
        for g in group_svc.list_groups(context(config_path))
    ]
    table(("NAME", "MODELS", "WEIGHT", "MEMBERS", "LIMITS"), rows)


@groups.command("delete")
@_config_opt
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete it even if it still has members.")
@store_errors
def delete(config_path: str, name: str, force: bool) -> None:
    """Delete a group; its members lose what it allowed within about a second."""
    group_svc.delete_group(context(config_path), name, force=force)
    click.echo(f"deleted group {name}")
