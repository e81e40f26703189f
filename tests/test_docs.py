"""The docs are kept true: every setting and every CLI command is documented."""

from __future__ import annotations

import typing
from pathlib import Path

import click
from pydantic import BaseModel

from fleetgate.cli.main import cli
from fleetgate.config import Settings

DOCS = Path(__file__).parent.parent / "docs"


def _models_in(annotation: object) -> list[type[BaseModel]]:
    out: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def setting_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        is_seq = typing.get_origin(field.annotation) in (tuple, list)
        subs = _models_in(field.annotation)
        if subs:
            for sub in subs:
                paths.extend(setting_paths(sub, f"{path}[]." if is_seq else f"{path}."))
            if not is_seq:
                paths.append(path)
        else:
            paths.append(path)
    return paths


def test_every_setting_is_in_the_configuration_reference():
    text = (DOCS / "configuration.md").read_text() + (DOCS / "fleet.md").read_text()
    missing = [p for p in setting_paths(Settings) if f"`{p}`" not in text]
    assert not missing, f"undocumented settings: {missing}"


def _commands(group: click.Group, prefix: str = "fleetgate") -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        full = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, full))
        else:
            out.append(full)
    return out


def test_every_command_is_in_the_cli_reference():
    text = (DOCS / "cli.md").read_text()
    missing = [c for c in _commands(cli) if f"`{c}" not in text]
    assert not missing, f"undocumented commands: {missing}"


def test_readme_leads_with_the_two_commands():
    readme = (DOCS.parent / "README.md").read_text()
    assert "pip install -e . && fleetgate demo" in readme
    assert "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (DOCS.parent / ".ci" / "run").read_text()


def test_yaml_examples_in_the_docs_and_examples_load():
    import re

    from fleetgate import config

    env = {"VLLM_API_KEY": "k" * 20, "FLEETGATE_DB": "/tmp/x.db"}
    blocks = []
    for doc in [DOCS.parent / "README.md", *DOCS.glob("*.md")]:
        blocks += re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)
    assert blocks, "the configuration reference should show a complete example"
    import yaml

    for b in blocks:
        config.parse(yaml.safe_load(b), env)
    for ex in (DOCS.parent / "examples").glob("*.yaml"):
        config.parse(yaml.safe_load(ex.read_text()), env)


def test_every_route_is_documented(tmp_path):
    """Every (method, path) the gateway serves, in keys mode (the mode with the most routes),
    appears in the docs as `METHOD path`."""
    from fleetgate.app import create_app
    from fleetgate.config import parse

    app = create_app(parse({"store": {"url": f"sqlite:///{tmp_path / 'fg.db'}"}}))
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    text += (DOCS.parent / "README.md").read_text()
    missing = [f"{r.method} {r.path}" for r in app.router.routes
               if f"{r.method} {r.path}" not in text]
    assert not missing, f"undocumented routes: {missing}"
