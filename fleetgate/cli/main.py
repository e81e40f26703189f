"""The ``fleetgate`` command: a thin layer over the library calls the server itself makes."""

from __future__ import annotations

import click

from fleetgate import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetgate")
def cli() -> None:
    """FleetGate: an authenticating, OpenAI-compatible gateway for vLLM fleets.

    \b
    Examples:
      fleetgate demo                                  # simulator + gateway + a key
      fleetgate check-config examples/static.yaml
      fleetgate keys create --config examples/static.yaml --name alice --models demo
      fleetgate serve --config examples/static.yaml --port 8000
    """


def _register() -> None:
    import importlib

    for mod, names in (
        ("fleetgate.cli.serve", ("serve", "check_config", "demo")),
        ("fleetgate.cli.keys", ("keys",)),
        ("fleetgate.cli.users", ("users",)),
        ("fleetgate.cli.groups", ("groups",)),
        ("fleetgate.cli.audit", ("audit",)),
        ("fleetgate.cli.usage", ("usage",)),
        ("fleetgate.cli.sim", ("sim",)),
        ("fleetgate.cli.fleet", ("up", "down", "status")),
    ):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue  # that command group isn't built yet
            raise
        for n in names:
            if hasattr(m, n):
                cli.add_command(getattr(m, n))


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
