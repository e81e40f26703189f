"""Settings: loaded once, at start-up, from one YAML file.

``load(path)`` is the only way in. It reads a ``.env`` beside the file (real environment
variables win), parses YAML, interpolates ``${VAR}`` and ``${VAR:-default}`` inside string values
(after parsing, so a variable can never inject YAML structure), validates with models that reject
unknown keys, and returns a frozen :class:`Settings`. Every problem names its key path, for
example ``models[2].backend.urls: field required``. Nothing here runs during a request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetgate import redact
from fleetgate.errors import ConfigError
from fleetgate.fleet.backend_base import template_slots
from fleetgate.fleet.spec import (
    BACKEND_TYPES,
    Backend,
    BalancerPolicy,
    ColdStartPolicy,
    FleetSettings,
    LocalBackend,
    RestartPolicy,
    ScalingPolicy,
    SlurmBackend,
)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamTLSSettings(_Model):
    """How ``https://`` upstreams are checked: verified against the system CAs by default."""

    ca_file: str | None = None
    verify: bool = True


class HttpSettings(_Model):
    """Bounds of the HTTP front (``fleetgate/server``), against hostile or broken clients."""

    max_header_bytes: int = Field(32 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)
    header_timeout_s: float = Field(10.0, gt=0)
    body_min_rate_bytes_s: float = Field(1024.0, ge=0)
    keepalive_timeout_s: float = Field(20.0, gt=0)
    max_connections: int = Field(10_000, ge=1)


class TlsSettings(_Model):
    """Native TLS for the gateway's own port; ``client_ca_file`` turns on mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    public_models_list: bool = True
    upstream_connect_timeout_s: float = Field(5.0, gt=0)
    upstream_read_timeout_s: float = Field(600.0, gt=0)
    upstream_max_connections: int = Field(1000, ge=1)  # per upstream origin
    upstream_pool_wait_s: float = Field(10.0, gt=0)
    max_upstream_response_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    max_sse_event_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    upstream_tls: UpstreamTLSSettings = UpstreamTLSSettings()
    shutdown_grace_s: float = Field(30.0, ge=0)
    http: HttpSettings = HttpSettings()
    tls: TlsSettings | None = None
    # Peers whose X-Forwarded-For is believed (CIDRs); by default nobody's.
    trusted_proxies: tuple[str, ...] = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from fleetgate.auth.networks import parse_networks

        try:
            parse_networks(v)
        except ValueError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None
        return v


class AuthSettings(_Model):
    mode: Literal["keys", "static", "none"] = "keys"
    tokens: tuple[str, ...] = Field((), repr=False)
    admin_tokens: tuple[str, ...] = Field((), repr=False)
    cache_ttl_s: float = Field(300.0, gt=0)
    revocation_poll_s: float = Field(1.0, gt=0)
    negative_cache_size: int = Field(10000, ge=0)
    # Fail-closed thresholds; None: max(5 s, 5 polls) and max(30 s, 10 polls).
    store_stale_after_s: float | None = Field(None, gt=0)
    store_hang_after_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _tokens_fit_mode(self) -> AuthSettings:
        if self.mode == "static":
            if not self.tokens and not self.admin_tokens:
                raise ValueError("auth.mode 'static' needs at least one token in auth.tokens")
            for tok in self.tokens + self.admin_tokens:
                if len(tok) < 16:
                    raise ValueError("every static token must be at least 16 characters")
            if set(self.tokens) & set(self.admin_tokens):
                raise ValueError("a token can't be in both auth.tokens and auth.admin_tokens")
        elif self.tokens or self.admin_tokens:
            raise ValueError(
                f"auth.tokens and auth.admin_tokens are only used with mode 'static', "
                f"not '{self.mode}'"
            )
        return self


class StoreSettings(_Model):
    url: str = "sqlite:///./fleetgate.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql:", "postgresql+")):
            raise ValueError("store.url must be a sqlite:/// or postgresql:// URL")
        return v


class ModelLimits(_Model):
    """Limits on a model itself, for all its callers together (``models[].limits``)."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_n: int | None = Field(None, ge=1)


class AdmissionPolicy(_Model):
    """How a model admits requests when its replicas are busy (``models[].admission``)."""

    max_inflight_per_replica: int | None = Field(None, ge=1)
    max_queue: int = Field(1000, ge=1)
    queue_timeout_s: float = Field(300.0, gt=0)
    policy: Literal["fair", "fifo"] = "fair"
    default_max_tokens: int = Field(1024, ge=1)
    pass_priority: bool = False


class LimitsSettings(_Model):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = Field(None, repr=False)
    redis_fail_open: bool = False

    @model_validator(mode="after")
    def _redis_needs_url(self) -> LimitsSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("limits.backend 'redis' needs limits.redis_url")
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("limits.redis_url must be a redis://, rediss:// or unix:// URL")
        return self


class ModelPolicies(_Model):
    """How a model scales, starts, balances, restarts and admits: the same for a configured
    model and for a template, which hands them on to every model it makes."""

    scaling: ScalingPolicy = ScalingPolicy()
    cold_start: ColdStartPolicy = ColdStartPolicy()
    balancer: BalancerPolicy = BalancerPolicy()
    restart: RestartPolicy = RestartPolicy()
    limits: ModelLimits = ModelLimits()
    admission: AdmissionPolicy = AdmissionPolicy()

    def policies(self) -> dict[str, Any]:
        """These settings by name, to hand on."""
        return {name: getattr(self, name) for name in ModelPolicies.model_fields}


class ModelSettings(ModelPolicies):
    name: str = Field(min_length=1, max_length=200)
    served_name: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    label: str | None = None
    backend: Backend

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, v: str | None) -> str | None:
        # It goes into an HTTP header: no whitespace or control characters, so no injection.
        if v is not None and (not v or any(c.isspace() or not c.isprintable() for c in v)):
            raise ValueError("must be non-empty printable text without spaces or line breaks")
        return v

    @property
    def upstream_name(self) -> str:
        return self.served_name or self.name


#: What a template's backend holds in ``model_path`` until a request names the real one (it
#: passes every backend's path check; :mod:`fleetgate.fleet.templates` replaces it).
TEMPLATE_PATH_PLACEHOLDER = "model_path"

TemplateBackend = Annotated[LocalBackend | SlurmBackend, Field(discriminator="type")]


class TemplateSettings(ModelPolicies):
    """A recipe for models started on request (``templates[]``, see docs/templates.md).

    The backend is the admin's: a request chooses the model path (matched against ``match``)
    and nothing else. ``{model_path}`` in the command is where the path goes, as one argument.
    """

    name: str = Field(min_length=1, max_length=100)
    match: tuple[str, ...] = Field(min_length=1)
    backend: TemplateBackend
    api_key: str | None = Field(default=None, repr=False)
    max_models: int = Field(1, ge=1, le=1000)
    launch: tuple[str, ...] = ()

    _api_key_safe = field_validator("api_key")(ModelSettings._header_safe.__func__)  # type: ignore[attr-defined]

    @field_validator("match")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not p or len(p) > 200 or any(c.isspace() or not c.isprintable() for c in p):
                raise ValueError(f"{p!r} is not a model path pattern")
        return v

    @field_validator("backend", mode="before")
    @classmethod
    def _path_from_request(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if "model_path" in v:
                raise ValueError(
                    "a template's backend takes model_path from the request: remove model_path"
                )
            v = {**v, "model_path": TEMPLATE_PATH_PLACEHOLDER}
        return v

    @model_validator(mode="after")
    def _command_takes_path(self) -> TemplateSettings:
        cmd = self.backend.command
        parts = [cmd] if isinstance(cmd, str) else list(cmd)
        if not any("model_path" in template_slots(p) for p in parts):
            raise ValueError("backend.command must contain the {model_path} slot")
        return self


class PortalSettings(_Model):
    """The web portal (``/portal/``): off by default; needs ``auth.mode: keys``."""

    enabled: bool = False
    public_url: str = "http://127.0.0.1:8000"  # the base URL the example code uses
    session_ttl_s: float = Field(28800.0, gt=0)
    local_accounts: bool = True  # sign-in with a password set by `fleetgate users set-password`

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or any(c.isspace() for c in v):
            raise ValueError("portal.public_url must be an http:// or https:// URL")
        return v.rstrip("/")


class LdapSearchSettings(_Model):
    """Search-then-bind: a read-only service account finds the user's DN."""

    base: str
    filter: str = "(uid={username})"
    bind_dn: str
    bind_password: str = Field(repr=False)


class LdapGroupSearchSettings(_Model):
    base: str
    filter: str = "(memberUid={username})"


class LdapSettings(_Model):
    """Portal sign-in against a directory (see docs/portal.md)."""

    url: str
    start_tls: bool = False
    ca_file: str | None = None  # None: the system CAs; validation is always on
    user_dn_template: str | None = None
    search: LdapSearchSettings | None = None
    group_search: LdapGroupSearchSettings | None = None
    group_map: dict[str, str] = {}
    required_group: str | None = None
    timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _one_way_to_find_users(self) -> LdapSettings:
        if not self.url.startswith(("ldap://", "ldaps://")):
            raise ValueError("ldap.url must be an ldap:// or ldaps:// URL")
        if self.url.startswith("ldap://") and not self.start_tls:
            raise ValueError("ldap.url 'ldap://' needs ldap.start_tls: true (or use ldaps://)")
        if (self.user_dn_template is None) == (self.search is None):
            raise ValueError("set exactly one of ldap.user_dn_template and ldap.search")
        if self.user_dn_template is not None and "{username}" not in self.user_dn_template:
            raise ValueError("ldap.user_dn_template must contain {username}")
        if (self.group_map or self.required_group) and self.group_search is None:
            raise ValueError("ldap.group_map and ldap.required_group need ldap.group_search")
        return self


class Settings(_Model):
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    store: StoreSettings = StoreSettings()
    fleet: FleetSettings = FleetSettings()
    limits: LimitsSettings = LimitsSettings()
    models: tuple[ModelSettings, ...] = ()
    templates: tuple[TemplateSettings, ...] = ()
    portal: PortalSettings = PortalSettings()
    ldap: LdapSettings | None = None

    @model_validator(mode="after")
    def _portal_needs_keys(self) -> Settings:
        if self.portal.enabled and self.auth.mode != "keys":
            raise ValueError("portal.enabled needs auth.mode: keys (the portal hands out keys)")
        return self

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears twice")
            seen.add(m.name)
        names = [t.name for t in self.templates]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"template name {n!r} appears twice")
        return self

    def model(self, name: str) -> ModelSettings | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


def interpolate(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string inside ``value``."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise ConfigError([f"{where or '<root>'}: environment variable {name} is not set"])

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()
        }
    return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in BACKEND_TYPES and out.endswith("backend"):
            continue  # pydantic's discriminator tag, not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _describe(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "field required"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(f"{_loc(tuple(e['loc']))}: {msg}")
    return problems


def parse(data: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed document (used by ``load`` and by tests)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["<root>: the config must be a mapping of keys"])
    data = interpolate(data, os.environ if env is None else env)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def load(path: str | os.PathLike[str]) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror}"], str(p)) from None
    env: dict[str, str] = {
        k: v for k, v in dotenv_values(p.parent / ".env").items() if v is not None
    }
    env.update(os.environ)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], str(p)) from None
    try:
        settings = parse(data, env)
    except ConfigError as e:
        raise ConfigError(e.problems, str(p)) from None
    # From here on, every secret this config holds is masked in whatever this process logs.
    redact.register_settings(settings)
    redact.register([t.api_key for t in settings.templates])
    if settings.ldap is not None and settings.ldap.search is not None:
        redact.register([settings.ldap.search.bind_password])
    return settings
