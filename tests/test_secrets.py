"""Secrets stay out of logs: one redaction (fleetgate.redact) on every log path."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import FLEETGATE, create_key, free_port, stop, wait_http

from fleetgate import config, redact

KEY = "fg-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"auth failed for {KEY}", KEY),
        ("Authorization: Bearer sk-upstream-1234567", "sk-upstream-1234567"),
        ("vllm serve m --api-key sk-abc123456 --port 1", "sk-abc123456"),
        ("vllm serve m --api-key=sk-abc123456", "sk-abc123456"),
        ("vllm serve m --hf-token hf_abcdef12345", "hf_abcdef12345"),
        ('"POST /v1/chat/completions?api_key=fg-zzzzzz1234567890abc HTTP/1.1" 401', "zzzzzz1234"),
        ("GET /v1/models?x=1&key=s3cr3tvalue HTTP/1.1", "s3cr3tvalue"),
        ("store postgresql://fleet:hunter2pw@db:5432/fg unreachable", "hunter2pw"),
    ],
)
def test_patterns_mask_secrets_nobody_registered(text, secret):
    out = redact.redact(text)
    assert secret not in out
    assert redact.MASK in out


def test_key_keeps_its_display_prefix_and_ordinary_words_survive():
    assert redact.redact(f"key {KEY} revoked") == f"key {KEY[:9]}*** revoked"
    plain = "loaded 3 active keys; token counts 12; model key-value cache"
    assert redact.redact(plain) == plain


def test_known_secrets_from_the_config_are_masked_anywhere():
    s = config.parse({
        "auth": {"mode": "static", "tokens": ["static-token-0123456789"]},
        "store": {"url": "postgresql://u:db-pass-9876@h/db"},
        "models": [
            {"name": "a", "api_key": "upstream-key-abcdef",
             "backend": {"type": "static", "urls": ["http://127.0.0.1:9"]}},
            {"name": "b", "backend": {"type": "local",
                                      "command": "vllm serve x --port {port} --api-key cmdkey-777",
                                      "env": {"HF_TOKEN": "hf-env-token-55"}}},
        ],
    })
    redact.register_settings(s)
    text = ("upstream-key-abcdef static-token-0123456789 db-pass-9876 "
            "cmdkey-777 hf-env-token-55 json:{'k': 'upstream-key-abcdef'}")
    out = redact.redact(text)
    for secret in ("upstream-key-abcdef", "static-token-0123456789", "db-pass-9876",
                   "cmdkey-777", "hf-env-token-55"):
        assert secret not in out


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


def test_every_log_record_is_redacted_whatever_handler_writes_it():
    """A handler attached after install() (as uvicorn attaches its own) still sees it redacted."""
    redact.install()
    redact.register(["late-registered-secret"])
    keep = _Keep()
    loggers = [logging.getLogger("uvicorn.access"), logging.getLogger("fleetgate")]
    for lg in loggers:
        lg.addHandler(keep)
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.INFO)
        # uvicorn's access formatter reads these five arguments back: they must stay a tuple.
        loggers[0].info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST",
                        f"/v1/chat/completions?api_key={KEY}", "1.1", 401)
        loggers[1].warning("replica failed: %s", {"tail": "late-registered-secret"})
        try:
            raise RuntimeError("boom --api-key sk-in-traceback-1")
        except RuntimeError:
            loggers[1].exception("with a traceback")
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.removeHandler(keep)
            lg.setLevel(level)
    rec = keep.records[0]
    assert isinstance(rec.args, tuple) and len(rec.args) == 5 and rec.args[4] == 401
    text = "\n".join(keep.lines)
    assert KEY not in text and "late-registered-secret" not in text
    assert "sk-in-traceback-1" not in text and "boom --api-key ***" in text
    assert "?api_key=*** HTTP/1.1" in text


def test_loading_a_config_registers_its_secrets(tmp_path):
    (tmp_path / ".env").write_text("UPSTREAM_KEY=from-dotenv-secret-42\n")
    (tmp_path / "c.yaml").write_text(
        "models:\n  - name: m\n    api_key: ${UPSTREAM_KEY}\n"
        "    backend: {type: static, urls: ['http://127.0.0.1:9']}\n"
    )
    config.load(tmp_path / "c.yaml")
    assert redact.redact("upstream said: from-dotenv-secret-42") == "upstream said: ***"


# -- end to end: a real gateway, then grep everything it wrote ------------------------------

UPSTREAM_SECRET = "sk-upstream-e2e-5d1f09"
ENGINE_SECRET = "sk-engine-e2e-77ab3c"
LDAP_SECRET = "ldap-reader-e2e-41c9aa"


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_nothing_the_gateway_writes_holds_a_key_or_an_upstream_secret(tmp_path):
    """A local engine with --api-key in its command, another that prints its key and dies,
    an access log, a key in the query string, fleet status: then grep every file written."""
    port = free_port()
    sim_cmd = [*FLEETGATE, "sim", "--port", "{port}", "--model", "good",
               "--api-key", UPSTREAM_SECRET]
    crash_cmd = ["sh", "-c", 'echo "engine starting, key $3"; exit 1', "x", "{port}",
                 "--api-key", ENGINE_SECRET]
    doc = {
        "server": {"port": port},
        "store": {"url": f"sqlite:///{tmp_path / 'run' / 'fg.db'}"},
        "fleet": {"state_dir": str(tmp_path / "run" / "state")},
        "models": [
            {"name": "good", "api_key": UPSTREAM_SECRET, "scaling": {"min_replicas": 1},
             "backend": {"type": "local", "command": sim_cmd,
                         "log_dir": str(tmp_path / "run" / "logs")}},
            {"name": "bad", "scaling": {"min_replicas": 1},
             "restart": {"max_restarts": 1, "backoff_initial_s": 0.1, "backoff_max_s": 0.1},
             "backend": {"type": "local", "command": crash_cmd,
                         "log_dir": str(tmp_path / "run" / "logs")}},
        ],
    }
    # The portal signs in through a directory that is down: its read-only account's password
    # must not surface in any answer, log or file either.
    doc["portal"] = {"enabled": True, "public_url": f"http://127.0.0.1:{port}"}
    doc["ldap"] = {"url": f"ldaps://127.0.0.1:{free_port()}", "timeout_s": 1,
                   "search": {"base": "ou=people,dc=x", "bind_dn": "cn=reader,dc=x",
                              "bind_password": LDAP_SECRET}}
    cfg = tmp_path / "fleetgate.yaml"  # the admin's own file: the one place secrets belong
    cfg.write_text(yaml.safe_dump(doc))
    key = create_key(cfg, "user")
    admin = create_key(cfg, "ops", "--admin")
    out = tmp_path / "run" / "gateway.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [*FLEETGATE, "serve", "--config", str(cfg), "--access-log"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/ready", 60, proc)
        chat = {"model": "good", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status = {}
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(300):  # the good replica ready, the bad one given up on
                status = c.get("/v1/fleet/status",
                               headers={"Authorization": f"Bearer {admin}"}).json()
                by = {m["model"]: m for m in status["models"]}
                if by["good"]["ready"] and by["bad"]["status"] == "failed":
                    break
                time.sleep(0.1)
            assert by["good"]["ready"] and by["bad"]["status"] == "failed", status
            r = c.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert c.post(f"/v1/chat/completions?api_key={key}", json=chat).status_code == 401
            assert c.post("/v1/chat/completions", json=chat,
                          headers={"Authorization": f"Bearer {key}x"}).status_code == 401
            shown = c.get("/v1/fleet/status", headers={"Authorization": f"Bearer {admin}"}).text
            form = c.get("/portal/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert token, form.text[:500]
            signin = c.post("/portal/login", data={"username": "alice", "password": "pw",
                                                   "csrf_token": token.group(1)})
            assert signin.status_code in (401, 503), signin.status_code
            shown += signin.text
    finally:
        stop(proc)
    secrets = (key, admin, UPSTREAM_SECRET, ENGINE_SECRET, LDAP_SECRET)
    assert "failed" in shown and not [s for s in secrets if s in shown]
    engine_logs = set((tmp_path / "run" / "logs").rglob("*.log"))
    assert engine_logs
    leaks = {}
    for f in _files_under(tmp_path / "run"):
        data = f.read_bytes()
        if f in engine_logs:
            # The engine's own output (the crashing one echoes its key): FleetGate can't
            # rewrite it, so it is private to the gateway's user.
            assert f.stat().st_mode & 0o077 == 0, f
            continue
        found = [s for s in secrets if s.encode() in data]
        if found:
            leaks[str(f)] = found
    assert not leaks, leaks
    assert b"crash loop" in out.read_bytes() or b"failed" in out.read_bytes()


def test_fleet_status_strings_are_redacted_whatever_launcher_wrote_them():
    from fleetgate.fleet.status import _redacted

    redact.register(["slurm-side-secret-31"])
    snap = {"models": [{"replicas": [{"reason": "job failed: --api-key=abc12345xyz",
                                      "events": [{"reason": "tail: slurm-side-secret-31"}],
                                      "pid": 12, "gpus": ["0"]}], "ready": 0}]}
    out = _redacted(snap)
    rep = out["models"][0]["replicas"][0]
    assert rep["reason"] == "job failed: --api-key=***"
    assert rep["events"][0]["reason"] == "tail: ***"
    assert (rep["pid"], rep["gpus"], out["models"][0]["ready"]) == (12, ["0"], 0)
