"""The container deployment (Dockerfile, compose.yaml, deploy/) is kept true without Docker.

No Docker engine runs where these tests run, so nothing here builds an image or starts the stack
(docs/deploy.md says so). What can be checked is:

- the compose file as Debian's ``docker-compose config`` (1.29) resolves it with a test ``.env``:
  only the gateway publishes a port, only on 127.0.0.1 unless ``FLEETGATE_BIND`` says otherwise;
  vLLM's ``--api-key``, the gateway's upstream key and PostgreSQL's password all come from
  ``.env``, and a missing secret stops compose before anything starts;
- the Dockerfile's facts: a slim Python 3.11 base, a non-root ``USER``, a ``HEALTHCHECK``, no
  secret-named ``ENV``/``ARG``, the gateway as its command, and a ``.dockerignore`` that lets
  nothing but the package into the build context;
- ``deploy/gw.yaml`` through the real config loader, agreeing with the compose services it
  names, and the image's health check script against a real gateway process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import free_port, gateway

from fleetgate import config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
GW_YAML = ROOT / "deploy" / "gw.yaml"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"

SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw|credential)")
REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$")  # a whole ${VAR...} reference

# Values that can't be mistaken for anything in the files: if one shows up resolved where it
# should, it came from the .env the test wrote.
TEST_ENV = {
    "VLLM_API_KEY": "vk-deploy-test-4f1c9e2a7b",
    "POSTGRES_PASSWORD": "pg0deploy0test0c3d5e7f",
    "VLLM_MODEL": "org/tiny-model",
    "MODEL_NAME": "tiny-public",
}


# -- docker-compose config -----------------------------------------------------------------------

def compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/test.sh apt-installs it)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    # A clean environment: the variables must come from the env file, not from this process.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, timeout=60, env=clean, cwd=tmp_path,
    )


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = compose_config(tmp_path_factory.mktemp("compose"), TEST_ENV)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert isinstance(doc, dict)
    return doc


def published(port: Any) -> tuple[str, str]:
    """(host ip, published port) of one ``ports`` entry, short or long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", ""))
    parts = str(port).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    return "", parts[0] if len(parts) == 2 else ""


def test_only_the_gateway_publishes_a_port_and_only_on_loopback(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {"gateway", "vllm", "postgres"}
    with_ports = {name for name, s in services.items() if s.get("ports")}
    assert with_ports == {"gateway"}
    assert [published(p) for p in services["gateway"]["ports"]] == [("127.0.0.1", "8000")]
    # The engine and the database are on the internal network; the database on nothing else.
    assert resolved["networks"]["backend"]["internal"] is True
    assert set(services["postgres"]["networks"]) == {"backend"}
    assert "network_mode" not in services["vllm"] and "network_mode" not in services["postgres"]


def test_the_bind_address_is_an_explicit_choice(tmp_path: Path) -> None:
    out = compose_config(tmp_path, {**TEST_ENV, "FLEETGATE_BIND": "0.0.0.0", "FLEETGATE_PORT": "9443"})
    assert out.returncode == 0, out.stderr
    ports = yaml.safe_load(out.stdout)["services"]["gateway"]["ports"]
    assert [published(p) for p in ports] == [("0.0.0.0", "9443")]


def test_secrets_reach_the_services_from_the_env_file(resolved: dict[str, Any]) -> None:
    s = resolved["services"]
    cmd = [str(a) for a in s["vllm"]["command"]]
    assert cmd[cmd.index("--api-key") + 1] == TEST_ENV["VLLM_API_KEY"]
    assert cmd[cmd.index("--served-model-name") + 1] == TEST_ENV["MODEL_NAME"]
    assert s["gateway"]["environment"]["VLLM_API_KEY"] == TEST_ENV["VLLM_API_KEY"]
    assert s["gateway"]["environment"]["POSTGRES_PASSWORD"] == TEST_ENV["POSTGRES_PASSWORD"]
    assert s["postgres"]["environment"]["POSTGRES_PASSWORD"] == TEST_ENV["POSTGRES_PASSWORD"]
    # Each service gets only the secrets it uses: the database never sees vLLM's key.
    assert TEST_ENV["VLLM_API_KEY"] not in yaml.safe_dump(s["postgres"])
    assert TEST_ENV["POSTGRES_PASSWORD"] not in yaml.safe_dump(s["vllm"])


@pytest.mark.parametrize("missing", ["VLLM_API_KEY", "POSTGRES_PASSWORD"])
def test_a_missing_secret_stops_compose(tmp_path: Path, missing: str) -> None:
    env = {k: v for k, v in TEST_ENV.items() if k != missing}
    out = compose_config(tmp_path, env)
    assert out.returncode != 0
    assert missing in out.stderr


def _secret_values(node: Any, where: str = "") -> list[tuple[str, str]]:
    """(where, value) for every value at a secret-named key or after a secret-named flag."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if SECRET_NAME.search(str(k)) and not isinstance(v, dict | list):
                found.append((f"{where}.{k}", str(v)))
            found += _secret_values(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, str) and v.startswith("--") and SECRET_NAME.search(v):
                if "=" in v:
                    found.append((f"{where}[{i}]", v.split("=", 1)[1]))
                elif i + 1 < len(node):
                    found.append((f"{where}[{i + 1}]", str(node[i + 1])))
            found += _secret_values(v, f"{where}[{i}]")
    return found


def test_no_secret_literal_in_the_compose_file() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    values = _secret_values(raw["services"])
    # vLLM's key (flag and gateway env), PostgreSQL's password (twice), HF_TOKEN at least.
    assert len(values) >= 5, values
    literal = [(w, v) for w, v in values if not REF.match(v)]
    assert not literal, f"secret-named values that are not ${{VAR}} references: {literal}"


# -- the Dockerfile ------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    return instrs[last_from:]


def env_names(args: str) -> list[str]:
    if "=" not in args.split()[0]:
        return [args.split()[0]]  # legacy `ENV NAME value`
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)


def test_dockerfile_facts() -> None:
    instrs = instructions(DOCKERFILE.read_text())
    stage = final_stage(instrs)
    words = [w for w, _ in stage]
    assert stage[0][1].split()[0] == "python:3.11-slim"
    users = [a for w, a in stage if w == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    # Nothing after USER runs as root again.
    assert "RUN" not in words[words.index("USER"):]
    assert words.count("HEALTHCHECK") == 1
    hc = next(a for w, a in stage if w == "HEALTHCHECK")
    assert "healthcheck.py" in hc and "--timeout=" in hc and "--interval=" in hc
    assert next(a for w, a in stage if w == "ENTRYPOINT") == '["fleetgate"]'
    assert next(a for w, a in stage if w == "CMD") == (
        '["serve", "--config", "/etc/fleetgate/gw.yaml", "--host", "0.0.0.0"]'
    )
    named = [n for w, a in instrs if w in ("ENV", "ARG") for n in env_names(a)]
    assert named, "the parser should see the ENV lines"
    assert not [n for n in named if SECRET_NAME.search(n)], named


# What a secret pasted into a file would look like: a FleetGate key, a URL with a literal password,
# a bearer token, or a long random-looking run (a hex or base64 key).
LITERAL_SECRET = re.compile(
    r"fg-[A-Za-z0-9_-]{16,}"
    r"|://[^:/@\s]+:(?!\$\{)[^@\s/]+@"
    r"|(?i:bearer)\s+(?!\$\{)[A-Za-z0-9._~+/=-]{8,}"
    r"|\b[A-Za-z0-9+/_-]{32,}"
)


def test_no_secret_literal_in_the_image_or_deploy_files() -> None:
    files = [DOCKERFILE, COMPOSE, ROOT / ".dockerignore", GW_YAML, ROOT / "deploy" / ".env.example"]
    for f in files:
        hits = LITERAL_SECRET.findall(f.read_text())
        assert not hits, f"{f.name} holds what looks like a secret: {hits}"
    assert LITERAL_SECRET.search("postgresql://fleetgate:hunter2hunter2@postgres/fleetgate")
    assert not LITERAL_SECRET.search("postgresql://fleetgate:${POSTGRES_PASSWORD}@postgres/x")
    example = (ROOT / "deploy" / ".env.example").read_text()
    for name in ("VLLM_API_KEY", "POSTGRES_PASSWORD", "HF_TOKEN"):
        assert re.search(rf"^{name}=$", example, re.M), f"{name} must be left empty in the example"


def test_the_build_context_is_an_allow_list_covering_every_copy() -> None:
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "deny everything first, so no .env or database enters the context"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copies = [a.split() for w, a in instructions(DOCKERFILE.read_text()) if w == "COPY"]
    sources = [s for args in copies if not args[0].startswith("--") for s in args[:-1]]
    assert sources
    for src in sources:
        assert src in allowed, f"COPY {src} is not let into the build context by .dockerignore"
        assert (ROOT / src).exists(), src


# -- deploy/gw.yaml and the health check ---------------------------------------------------------

def test_the_example_config_loads_and_matches_the_compose_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    s = config.load(GW_YAML)
    from sqlalchemy.engine import make_url

    url = make_url(s.store.url)
    assert (url.get_backend_name(), url.host, url.port) == ("postgresql", "postgres", 5432)
    assert url.password == TEST_ENV["POSTGRES_PASSWORD"] and url.username == "fleetgate"
    assert s.auth.mode == "keys"
    (m,) = s.models
    assert m.name == TEST_ENV["MODEL_NAME"] and m.upstream_name == TEST_ENV["MODEL_NAME"]
    assert m.api_key == TEST_ENV["VLLM_API_KEY"]
    assert m.backend.type == "static" and m.backend.urls == ("http://vllm:8000",)

    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    # The user and database the URL names are the ones the postgres service creates.
    pg_env = compose["postgres"]["environment"]
    assert (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"]) == ("fleetgate", "fleetgate")
    # vLLM listens where the gateway looks for it.
    vcmd = [str(a) for a in compose["vllm"]["command"]]
    assert vcmd[vcmd.index("--port") + 1] == "8000"
    # Every ${VAR} the config uses is passed into the gateway's container.
    values = yaml.safe_dump(yaml.safe_load(GW_YAML.read_text()))  # comments dropped
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", values))
    assert used and used <= set(compose["gateway"]["environment"]), used
    # The state directory is on the gateway's writable volume (its root filesystem is read-only).
    assert compose["gateway"]["read_only"] is True
    assert any(v.endswith(":/var/lib/fleetgate") for v in compose["gateway"]["volumes"])
    assert s.fleet.state_dir.startswith("/var/lib/fleetgate/")


def test_the_example_config_refuses_to_load_without_its_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("VLLM_API_KEY")
    with pytest.raises(config.ConfigError) as e:
        config.load(GW_YAML)
    assert "VLLM_API_KEY" in str(e.value)


def run_healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30,
        env={**os.environ, "FLEETGATE_HEALTH_URL": url},
    )


def test_the_image_health_check_against_a_real_gateway(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": {"url": f"sqlite:///{tmp_path / 'fg.db'}"},
        "fleet": {"state_dir": str(tmp_path / "state")},
        "models": [{"name": "m", "backend": {"type": "static",
                                            "urls": [f"http://127.0.0.1:{free_port()}"]}}],
    }))
    port = free_port()
    with gateway(cfg, port) as base:
        ok = run_healthcheck(f"{base}/health")
        assert ok.returncode == 0, ok.stderr
        wrong = run_healthcheck(f"{base}/no-such-path")
        assert wrong.returncode == 1 and "did not answer 200" in wrong.stderr
    down = run_healthcheck(f"http://127.0.0.1:{port}/health")
    assert down.returncode == 1
