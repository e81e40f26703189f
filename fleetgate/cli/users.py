"""``fleetgate users``: create, update, list, disable and enable users (actor ``cli``)."""

from __future__ import annotations

import click

from fleetgate.cli.keys import _config_opt, context, fmt_time, globs, store_errors, table
from fleetgate.services import users as user_svc
from fleetgate.services.validation import KEEP


@click.group()
def users() -> None:
    """Manage users: a role, groups, an optional model list of their own, enabled or not.

    \b
    Examples:
      fleetgate users create --config gw.yaml alice --group nlp --group vision
      fleetgate users create --config gw.yaml ops --role admin
      fleetgate users update --config gw.yaml alice --remove-group vision --models 'Qwen/*'
      fleetgate users update --config gw.yaml alice --models ''   # drop her own list
      fleetgate users disable --config gw.yaml alice
    """


@users.command("create")
@_config_opt
@click.argument("name")
@click.option("--group", "groups", multiple=True, help="A group to join (repeatable).")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@click.option("--models", default=None,
              help="Comma-separated names or globs narrowing what the groups allow.")
@store_errors
def create(config_path: str, name: str, groups: tuple[str, ...], role: str,
           models: str | None) -> None:
    """Create a user."""
    u = user_svc.create_user(context(config_path), name, role=role, groups=groups,
                             models=globs(models) or None)
    click.echo(f"created user {u.name} (role {u.role})")


@users.command("update")
@_config_opt
@click.argument("name")
@click.option("--add-group", "add", multiple=True, help="Join a group (repeatable).")
@click.option("--remove-group", "remove", multiple=True, help="Leave a group (repeatable).")
@click.option("--role", type=click.Choice(["user", "admin"]), default=None)
@click.option("--models", default=None,
              help="Replace the user's own list; '' removes it.")
@click.option("--link-ldap", is_flag=True,
              help="Let portal sign-ins through LDAP reach this local account.")
@store_errors
def update(config_path: str, name: str, add: tuple[str, ...], remove: tuple[str, ...],
           role: str | None, models: str | None, link_ldap: bool) -> None:
    """Change a user; options not given stay as they are."""
    if link_ldap:
        from fleetgate.services import accounts

        accounts.link_ldap(context(config_path), name)
        click.echo(f"linked user {name} to the directory account of the same name")
    u = user_svc.update_user(
        context(config_path), name, role=role if role is not None else KEEP,
        models=KEEP if models is None else (globs(models) or None),
        add_groups=add, remove_groups=remove,
    )
    click.echo(f"updated user {u.name}: role {u.role}, groups {','.join(u.groups) or '-'}, "
               f"models {','.join(u.models) if u.models is not None else '(from groups)'}")


@users.command("list")
@_config_opt
@store_errors
def list_(config_path: str) -> None:
    """List users: name, role, groups, own models, status, source, created."""
    rows = [
        (u.name, u.role, ",".join(u.groups) or "-",
         ",".join(u.models) if u.models is not None else "-",
         "enabled" if u.enabled else "disabled", u.source, fmt_time(u.created_at))
        for u in user_svc.list_users(context(config_path))
    ]
    table(("NAME", "ROLE", "GROUPS", "MODELS", "STATUS", "SOURCE", "CREATED"), rows)


@users.command("disable")
@_config_opt
@click.argument("name")
@store_errors
def disable(config_path: str, name: str) -> None:
    """Disable a user: a running gateway refuses all their keys within about a second."""
    user_svc.set_enabled(context(config_path), name, False)
    click.echo(f"disabled user {name}")


@users.command("enable")
@_config_opt
@click.argument("name")
@store_errors
def enable(config_path: str, name: str) -> None:
    """Enable a user again; their keys that aren't revoked or expired work again."""
    user_svc.set_enabled(context(config_path), name, True)
    click.echo(f"enabled user {name}")


@users.command("set-password")
@_config_opt
@click.argument("name")
@store_errors
def set_password(config_path: str, name: str) -> None:
    """Set a local account's portal password, read from stdin (no echo on a terminal).

    \b
    Examples:
      fleetgate users set-password --config gw.yaml alice          # prompts twice
      printf '%s\\n' "$PW" | fleetgate users set-password --config gw.yaml alice
    """
    import sys

    from fleetgate.services import accounts

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    accounts.set_password(context(config_path), name, password)
    click.echo(f"set the password of user {name}")
