"""The CLI, in-process with click's runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetgate.cli.main import cli


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "gw.yaml"
    p.write_text(f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\n"
                 "models:\n  - name: a\n    backend: {type: static, urls: ['http://127.0.0.1:9']}\n"
                 "  - name: b\n    backend: {type: static, urls: ['http://127.0.0.1:9']}\n")
    return p


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_keys_create_list_revoke(cfg):
    r = run("keys", "create", "--config", str(cfg), "--name", "alice", "--models", "a",
            "--expires", "30d")
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("fg-") and len(key) == 46
    listing = run("keys", "list", "--config", str(cfg)).output
    assert key not in listing and key[:9] in listing
    assert "alice" in listing and " a " in listing and "active" in listing
    assert run("keys", "revoke", "--config", str(cfg), "1").exit_code == 0
    assert "revoked" in run("keys", "list", "--config", str(cfg)).output
    r = run("keys", "revoke", "--config", str(cfg), "99")
    assert r.exit_code != 0 and "no key with id 99" in r.output


def test_keys_create_rejects_unknown_models_and_bad_durations(cfg):
    r = run("keys", "create", "--config", str(cfg), "--name", "x", "--models", "zzz")
    assert r.exit_code != 0 and "unknown model" in r.output
    r = run("keys", "create", "--config", str(cfg), "--name", "x", "--expires", "soon")
    assert r.exit_code != 0 and "invalid duration" in r.output


def test_check_config(cfg, tmp_path):
    r = run("check-config", str(cfg))
    assert r.exit_code == 0 and "model a" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    backend: {type: static}\n    extra: 1\n")
    r = run("check-config", str(bad))
    assert r.exit_code == 1
    assert "models[0].backend.urls: field required" in r.output
    assert "models[0].extra: unknown key" in r.output


def test_serve_refuses_open_bind_without_auth(tmp_path):
    p = tmp_path / "open.yaml"
    p.write_text("auth: {mode: none}\n")
    r = run("serve", "--config", str(p), "--host", "0.0.0.0")
    assert r.exit_code != 0 and "--insecure" in r.output


def test_serve_refuses_bad_config(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("server: {port: 99999}\n")
    r = run("serve", "--config", str(p))
    assert r.exit_code != 0 and "server.port" in r.output


def test_every_command_has_examples_in_help():
    for cmd in (["serve"], ["keys"], ["check-config"], ["demo"], ["usage"]):
        out = run(*cmd, "--help").output
        assert "Example" in out, cmd


def test_keys_with_an_unusable_store_fail_with_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = tmp_path / "gw.yaml"
    p.write_text(f"store: {{url: 'sqlite:///{blocker}/sub/fg.db'}}\n")
    r = run("keys", "list", "--config", str(p))
    assert r.exit_code == 1
    assert "the key store can't be used" in r.output
    assert "Traceback" not in r.output


def test_usage_report(cfg):
    import datetime as dt

    from fleetgate import config
    from fleetgate.store import repo
    from fleetgate.store.db import open_engine

    key = run("keys", "create", "--config", str(cfg), "--name", "alice").stdout.strip()
    engine = open_engine(config.load(cfg).store.url)
    rec = repo.list_keys(engine)[0]
    old = repo.utcnow() - dt.timedelta(days=10)
    for when, toks in ((repo.utcnow(), 5), (old, 100)):
        repo.insert_usage(engine, [repo.UsageEvent(
            key_id=rec.id, model="a", endpoint="chat.completions", status=200, stream=True,
            prompt_tokens=2, completion_tokens=toks, latency_ms=3, created_at=when)])
    out = run("usage", "--config", str(cfg)).output
    assert "alice" in out and key not in out
    assert "105" in out.split("alice")[1]
    recent = run("usage", "--config", str(cfg), "--since", "7d").output
    line = [ln for ln in recent.splitlines() if "alice" in ln][0]
    assert line.split()[-5:] == ["1", "2", "5", "7", "0"]  # requests, prompt, completion, total
