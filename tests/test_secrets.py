"""Secrets stay out of logs: one redaction (fleetgate.redact) on every log path."""

from __future__ import annotations

import logging

import pytest

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


def test_every_log_record_is_redacted_whatever_handler_writes_it(caplog):
    redact.install()
    redact.register(["late-registered-secret"])
    log = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO):
        # uvicorn's access formatter reads these five arguments back: they must stay a tuple.
        log.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST",
                 f"/v1/chat/completions?api_key={KEY}", "1.1", 401)
        logging.getLogger("fleetgate").warning("replica failed: %s", {"tail": "late-registered-secret"})
        try:
            raise RuntimeError("boom --api-key sk-in-traceback-1")
        except RuntimeError:
            logging.getLogger("fleetgate").exception("with a traceback")
    rec = caplog.records[0]
    assert isinstance(rec.args, tuple) and len(rec.args) == 5 and rec.args[4] == 401
    assert KEY not in caplog.text and "late-registered-secret" not in caplog.text
    assert "sk-in-traceback-1" not in caplog.text
    assert "?api_key=*** HTTP/1.1" in caplog.text


def test_loading_a_config_registers_its_secrets(tmp_path):
    (tmp_path / ".env").write_text("UPSTREAM_KEY=from-dotenv-secret-42\n")
    (tmp_path / "c.yaml").write_text(
        "models:\n  - name: m\n    api_key: ${UPSTREAM_KEY}\n"
        "    backend: {type: static, urls: ['http://127.0.0.1:9']}\n"
    )
    config.load(tmp_path / "c.yaml")
    assert redact.redact("upstream said: from-dotenv-secret-42") == "upstream said: ***"
