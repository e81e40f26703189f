"""Config loading: interpolation, .env, unknown keys, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from fleetgate import config
from fleetgate.errors import ConfigError

BACKEND = {"type": "static", "urls": ["http://127.0.0.1:9"]}


def problems(doc, env=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(doc, env or {})
    return e.value.problems


def test_defaults_are_safe():
    s = config.parse({}, {})
    assert s.server.host == "127.0.0.1"
    assert s.auth.mode == "keys"
    assert s.server.public_models_list is True
    assert 1024 * 1024 <= s.server.max_body_bytes <= 16 * 1024 * 1024


def test_unknown_keys_are_rejected_with_their_path():
    p = problems({"server": {"prot": 1}, "models": [{"name": "a", "backend": BACKEND, "x": 1}]})
    assert "server.prot: unknown key" in p
    assert "models[0].x: unknown key" in p


def test_missing_field_names_the_path():
    p = problems({"models": [{"name": "a", "backend": BACKEND}, {"name": "b",
                  "backend": {"type": "static"}}]})
    assert p == ["models[1].backend.urls: field required"]


def test_bad_backend_type_and_url():
    assert any("models[0].backend" in x for x in problems(
        {"models": [{"name": "a", "backend": {"type": "nope"}}]}))
    p = problems({"models": [{"name": "a", "backend": {"type": "static", "urls": ["ftp://x"]}}]})
    assert p[0].startswith("models[0].backend.urls:")


def test_duplicate_model_names():
    p = problems({"models": [{"name": "a", "backend": BACKEND}, {"name": "a", "backend": BACKEND}]})
    assert "appears twice" in p[0]


def test_static_mode_needs_long_tokens():
    assert "needs at least one token" in problems({"auth": {"mode": "static"}})[0]
    assert "at least 16" in problems({"auth": {"mode": "static", "tokens": ["short"]}})[0]
    assert "only used with mode" in problems({"auth": {"mode": "keys", "tokens": ["x" * 20]}})[0]
    assert "both" in problems({"auth": {"mode": "static", "tokens": ["x" * 20],
                                        "admin_tokens": ["x" * 20]}})[0]


def test_interpolation_and_defaults():
    doc = {"store": {"url": "sqlite:///${DB:-./x.db}"},
           "models": [{"name": "m", "api_key": "${K}", "backend": {
               "type": "static", "urls": ["${UP:-http://127.0.0.1:1}"]}}]}
    s = config.parse(doc, {"K": "secret"})
    assert s.store.url == "sqlite:///./x.db"
    assert s.models[0].api_key == "secret"
    assert s.models[0].backend.urls == ("http://127.0.0.1:1",)
    s = config.parse(doc, {"K": "secret", "DB": "/tmp/y.db"})
    assert s.store.url == "sqlite:////tmp/y.db"


def test_missing_variable_names_where():
    p = problems({"models": [{"name": "m", "api_key": "${NOPE}", "backend": BACKEND}]})
    assert p == ["models[0].api_key: environment variable NOPE is not set"]


def test_interpolated_value_cannot_inject_structure():
    s = config.parse({"models": [{"name": "${N}", "backend": BACKEND}]},
                     {"N": "a\nauth: {mode: none}"})
    assert s.auth.mode == "keys"
    assert s.models[0].name == "a\nauth: {mode: none}"


def test_load_reads_dotenv_beside_the_file_and_env_wins(tmp_path: Path, monkeypatch):
    (tmp_path / ".env").write_text("UP=http://127.0.0.1:7001\nKEY=from-dotenv\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - name: m\n    api_key: ${KEY}\n"
                   "    backend: {type: static, urls: ['${UP}']}\n")
    monkeypatch.setenv("KEY", "from-env")
    s = config.load(cfg)
    assert s.models[0].backend.urls == ("http://127.0.0.1:7001",)
    assert s.models[0].api_key == "from-env"


def test_load_reports_yaml_errors_and_missing_files(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError) as e:
        config.load(bad)
    assert "invalid YAML" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "missing.yaml")
    assert "cannot read config" in str(e.value)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError):
        config.load(top)


def test_settings_are_frozen():
    s = config.parse({}, {})
    with pytest.raises(pydantic.ValidationError):
        s.server.port = 1  # type: ignore[misc]


def test_example_config_is_valid():
    s = config.load(Path(__file__).parent.parent / "examples" / "static.yaml")
    assert s.model("demo") is not None


def test_upstream_key_cannot_inject_headers():
    p = problems({"models": [{"name": "m", "api_key": "abc\r\nX-Evil: 1", "backend": BACKEND}]})
    assert p[0].startswith("models[0].api_key:")


def test_https_upstreams_load_and_other_schemes_are_refused_at_load():
    s = config.parse({"models": [{"name": "m", "backend": {"type": "static",
                                                           "urls": ["https://x:1/"]}}]})
    assert s.models[0].backend.urls == ("https://x:1",)  # type: ignore[union-attr]
    assert s.server.upstream_tls.verify is True  # verification is on unless turned off
    p = problems({"models": [{"name": "m", "backend": {"type": "static",
                                                       "urls": ["ftp://x:1"]}}]})
    assert p[0].startswith("models[0].backend.urls:") and "http:// or https://" in p[0]
