"""The limit, quota and allow-list flags of ``fleetgate users|groups|keys``, ``fleetgate usage
--by/--format``, and ``serve --workers`` refused on memory counters when the store has limits:
in-process with click's runner, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine
from store_engines import engine  # noqa: F401  (a fixture: SQLite and PostgreSQL)

from fleetgate import config
from fleetgate.cli.main import cli
from fleetgate.store import repo


@pytest.fixture
def cfg(tmp_path: Path, engine: Engine) -> str:  # noqa: F811  (the fixture)
    p = tmp_path / "gw.yaml"
    p.write_text(
        f"store: {{url: '{engine.url.render_as_string(hide_password=False)}'}}\n"
        "models:\n  - name: demo\n    backend: {type: static, urls: ['http://127.0.0.1:9']}\n")
    return str(p)


def run(*args: str) -> str:
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, (args, r.output)
    return r.stdout


def refused(*args: str, reason: str, code: int = 1) -> None:
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == code, (args, r.output)
    assert reason in r.stderr and "Traceback" not in r.output, r.output


def row(out: str, name: str) -> list[str]:
    return next(ln.split() for ln in out.splitlines()[1:] if ln.split()[0] == name)


def test_flags_set_change_and_remove(cfg: str) -> None:
    run("groups", "create", "--config", cfg, "nlp", "--models", "*", "--rpm", "600",
        "--quota-tokens", "5000", "--quota-period", "day")
    run("users", "create", "--config", cfg, "alice", "--group", "nlp", "--tpm", "1000",
        "--max-n", "2", "--allow-ips", "10.0.0.0/8, 192.168.1.5")
    out = run("keys", "create", "--config", cfg, "--name", "ci", "--user", "alice",
              "--max-concurrent", "3", "--allow-ips", "10.1.0.0/16")
    key = out.strip().splitlines()[-1]
    assert row(run("groups", "list", "--config", cfg), "nlp")[-1] == "rpm=600,quota=5000/day"
    alice = row(run("users", "list", "--config", cfg), "alice")
    assert alice[-2:] == ["tpm=1000,max_n=2", "10.0.0.0/8,192.168.1.5/32"]
    listing = run("keys", "list", "--config", cfg)
    assert key not in listing and "max_concurrent=3" in listing and "10.1.0.0/16" in listing

    run("users", "update", "--config", cfg, "alice", "--tpm", "0", "--rpm", "5",
        "--quota-tokens", "70")
    alice = row(run("users", "list", "--config", cfg), "alice")
    assert alice[-2] == "rpm=5,max_n=2,quota=70/month"
    run("users", "update", "--config", cfg, "alice", "--quota-period", "day", "--allow-ips", "")
    assert row(run("users", "list", "--config", cfg), "alice")[-2:] == [
        "rpm=5,max_n=2,quota=70/day", "-"]
    run("groups", "update", "--config", cfg, "nlp", "--rpm", "0", "--quota-tokens", "0")
    assert row(run("groups", "list", "--config", cfg), "nlp")[-1] == "-"
    actions = run("audit", "--config", cfg)
    assert "user.update" in actions and "group.update" in actions and key not in actions


@pytest.mark.parametrize(("args", "reason", "code"), [
    (("users", "create", "x", "--allow-ips", "10.0.0.0/33"), "is not an address or CIDR", 1),
    (("users", "create", "x", "--allow-ips", "example.com"), "is not an address or CIDR", 1),
    (("keys", "create", "--name", "x", "--allow-ips", "10.0.0.300"), "not an address", 1),
    (("users", "create", "x", "--rpm", "-1"), "--rpm", 2),
    (("users", "create", "x", "--quota-period", "week"), "--quota-period", 2),
    (("groups", "create", "x", "--tpm", "lots"), "--tpm", 2),
    (("users", "update", "default", "--quota-period", "day"), "no quota", 1),
    (("users", "create", "x", "--quota-period", "day"), "--quota-tokens", 2),
    (("groups", "create", "x", "--quota-period", "day", "--quota-tokens", "0"), "--quota-tokens",
     2),
])
def test_bad_values_are_one_clear_line(cfg: str, args: tuple[str, ...], reason: str,
                                       code: int) -> None:
    cmd, sub, *rest = args
    refused(cmd, sub, "--config", cfg, *rest, reason=reason, code=code)
    assert not repo.any_limits(repo_engine(cfg))


def repo_engine(cfg: str) -> Engine:
    from fleetgate.store.db import open_engine

    return open_engine(config.load(cfg).store.url)


def test_usage_by_each_dimension_and_format(cfg: str) -> None:
    run("users", "create", "--config", cfg, "bob")
    run("keys", "create", "--config", cfg, "--name", "b1", "--user", "bob")
    eng = repo_engine(cfg)
    k = repo.list_keys(eng)[0]
    now = repo.utcnow()
    repo.insert_usage(eng, [
        repo.UsageEvent(key_id=k.id, model="demo", endpoint="chat.completions", status=200,
                        stream=s, prompt_tokens=3, completion_tokens=c, latency_ms=9,
                        created_at=when, user_id=k.user_id, ttft_ms=2, disconnected=d)
        for s, c, d, when in ((True, 10, False, now), (False, 4, False, now),
                              (True, 1, True, now), (False, 100, False,
                                                     now - dt.timedelta(days=9)))
    ])
    every = json.loads(run("usage", "--config", cfg, "--format", "json"))
    assert every == [{"key": k.id, "key_name": "b1", "user": "bob", "requests": 4,
                      "prompt_tokens": 12, "completion_tokens": 115, "total_tokens": 127,
                      "disconnected": 1}]
    week = {by: json.loads(run("usage", "--config", cfg, "--by", by, "--since", "7d",
                               "--format", "json")) for by in ("user", "model", "day")}
    assert [(r["user"], r["requests"], r["total_tokens"]) for r in week["user"]] == [
        ("bob", 3, 24)]
    assert [r["model"] for r in week["model"]] == ["demo"]
    assert [r["day"] for r in week["day"]] == [now.date().isoformat()]
    csv_out = run("usage", "--config", cfg, "--by", "model", "--format", "csv").splitlines()
    assert csv_out == ["model,requests,prompt_tokens,completion_tokens,total_tokens,disconnected",
                       "demo,4,12,115,127,1"]
    table = run("usage", "--config", cfg, "--by", "user").splitlines()
    assert table[0].split()[0] == "USER" and table[1].split() == ["bob", "4", "12", "115", "127",
                                                                  "1"]


def test_quota_usage_seeds_from_the_records(cfg: str) -> None:
    run("groups", "create", "--config", cfg, "g", "--quota-tokens", "1000", "--quota-period",
        "day")
    run("users", "create", "--config", cfg, "ann", "--group", "g", "--quota-tokens", "50")
    run("keys", "create", "--config", cfg, "--name", "a", "--user", "ann")
    eng = repo_engine(cfg)
    k = repo.list_keys(eng)[0]
    now = repo.utcnow()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    earlier = month if day > month else None  # this month, before today (none on the 1st)
    events = [(now, 7)] + ([(earlier, 30)] if earlier else [])
    repo.insert_usage(eng, [
        repo.UsageEvent(key_id=k.id, model="demo", endpoint="completions", status=200,
                        stream=False, prompt_tokens=1, completion_tokens=c - 1, latency_ms=1,
                        created_at=when)  # no user_id: owned through the key
        for when, c in events])
    found = {(q.kind, q.name): q for q in repo.quota_usage(eng, day, month)}
    assert found[("group", "g")].used == 7 and found[("group", "g")].period == "day"
    assert found[("user", "ann")].used == 7 + (30 if earlier else 0)
    assert found[("user", "ann")].tokens == 50


def test_several_workers_on_memory_counters_are_refused_when_the_store_has_limits(
    cfg: str,
) -> None:
    from fleetgate.cli.serve import check_workers

    settings = config.load(cfg)
    check_workers(settings, 2)  # nothing set anywhere: several workers are fine
    run("users", "create", "--config", cfg, "carl", "--rpm", "10")
    with pytest.raises(click.ClickException, match="users, groups or keys in the store"):
        check_workers(settings, 2)
    check_workers(settings, 1)
