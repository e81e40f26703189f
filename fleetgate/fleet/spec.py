"""Config models for the fleet: where a model's replicas come from and how they scale.

Imported by :mod:`fleetgate.config`, which owns loading and validation. These models reject
unknown keys and are frozen, like every config model. Nothing here does I/O.

Per model, ``fleetgate.config.ModelSettings`` carries ``backend`` (the :data:`Backend` union)
and, as policy, ``scaling``, ``cold_start``, ``balancer`` and ``restart``. Fleet-wide knobs live
in :class:`FleetSettings` (``Settings.fleet``). :func:`policy_of` turns a model's settings into
the policy the fleet acts on (a static backend's replica count is its URL count).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from fleetgate.config import ModelSettings


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Lifecycle:
    """What the supervisor needs from any backend, whatever its type (no ``getattr``)."""

    health_path: str
    health_interval_s: float
    models_path: str | None = None  # probed once before ready; None: skip
    start_timeout_s: float | None = None  # None: probe forever (a URL someone else runs)
    stop_grace_s: float = 0.0
    keep_on_shutdown: bool = False
    owns_replicas: bool = True  # False: URLs others run (never started, so any worker may serve)


class BackendSpec(SpecModel):
    """The part of every backend config model the fleet reads generically.

    A new backend type subclasses this, overrides what differs, and joins :data:`Backend`.
    """

    def lifecycle(self) -> Lifecycle:
        raise NotImplementedError

    def cap_scaling(self, scaling: ScalingPolicy) -> ScalingPolicy:
        """The scaling policy this backend can honour (default: as configured)."""
        return scaling


class StaticBackend(BackendSpec):
    """Existing engine URLs: health-checked, never started or stopped."""

    type: Literal["static"]
    urls: tuple[str, ...] = Field(min_length=1)
    health_path: str = "/health"
    health_interval_s: float = Field(5.0, gt=0)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for u in v:
            # https:// is verified as server.upstream_tls says (on, by default).
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"backend URL must start with http:// or https://: {u!r}")
            out.append(u.rstrip("/"))
        return tuple(out)

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.health_path, self.health_interval_s, owns_replicas=False)

    def cap_scaling(self, scaling: ScalingPolicy) -> ScalingPolicy:
        n = len(self.urls)  # exactly one replica per URL, never idle
        return scaling.model_copy(
            update={"min_replicas": n, "max_replicas": n, "idle_timeout_s": None}
        )


#: The slots a local command template (and its ``env`` values) may use.
LOCAL_SLOTS = frozenset(
    {"port", "host", "gpus", "model", "served_name", "model_path", "replica", "log_dir"}
)


def _template_slots(text: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ValueError(f"bad template {text!r}: {e}") from None


def check_command(
    command: tuple[str, ...] | str,
    env: dict[str, str],
    model_path: str | None,
    slots: frozenset[str],
) -> None:
    """A command template (and its ``env`` values): not empty, only known slots, ``{port}``
    present, ``{model_path}`` only with a model path. Raises ValueError."""
    parts = [command] if isinstance(command, str) else list(command)
    if not parts or not any(p.strip() for p in parts):
        raise ValueError("command must not be empty")
    used: set[str] = set()
    for p in [*parts, *env.values()]:
        used |= _template_slots(p)
    unknown = used - slots
    if unknown:
        raise ValueError(f"unknown template slot(s) {sorted(unknown)}; known: {sorted(slots)}")
    if "port" not in used:
        raise ValueError("command must contain the {port} slot")
    if "model_path" in used and model_path is None:
        raise ValueError("command uses {model_path} but model_path is not set")


class LocalBackend(BackendSpec):
    """Engine processes started on this host from a command template.

    ``command`` is a list of arguments (or one string, split like a shell would, without a
    shell). ``{port}`` is required; the launcher picks a free port per replica. ``gpus`` is the
    pool of GPU ids this model may use; each replica gets ``gpus_per_replica`` of them, as
    ``CUDA_VISIBLE_DEVICES`` and the ``{gpus}`` slot, and no GPU is given to two replicas at
    once unless ``share_gpus`` is set.
    """

    type: Literal["local"]
    command: tuple[str, ...] | str
    model_path: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port_range: tuple[int, int] | None = None
    gpus: tuple[str, ...] = ()
    gpus_per_replica: int = Field(0, ge=0)
    share_gpus: bool = False
    log_dir: str = ".fleetgate/logs"
    start_timeout_s: float = Field(600.0, gt=0)
    stop_grace_s: float = Field(30.0, ge=0)
    health_path: str = "/health"
    models_path: str | None = "/v1/models"
    health_interval_s: float = Field(2.0, gt=0)
    keep_on_shutdown: bool = False

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids_as_text(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(str(g) for g in v)
        return v

    @model_validator(mode="after")
    def _check(self) -> LocalBackend:
        check_command(self.command, self.env, self.model_path, LOCAL_SLOTS)
        if self.gpus_per_replica > len(self.gpus):
            raise ValueError(
                f"gpus_per_replica is {self.gpus_per_replica} but only {len(self.gpus)} gpus are listed"
            )
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError("gpus lists the same GPU twice")
        if self.port_range is not None:
            lo, hi = self.port_range
            if not (1 <= lo <= hi <= 65535):
                raise ValueError("port_range must be [low, high] with 1 <= low <= high <= 65535")
        return self

    def max_replicas_by_gpus(self) -> int | None:
        """How many replicas the GPU list allows at once (None: no GPU limit)."""
        if self.gpus_per_replica == 0 or self.share_gpus:
            return None
        return len(self.gpus) // self.gpus_per_replica

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(
            self.health_path,
            self.health_interval_s,
            self.models_path,
            self.start_timeout_s,
            self.stop_grace_s,
            self.keep_on_shutdown,
        )

    def cap_scaling(self, scaling: ScalingPolicy) -> ScalingPolicy:
        cap = self.max_replicas_by_gpus()
        if cap is None or scaling.max_replicas <= cap:
            return scaling
        return scaling.model_copy(
            update={
                "max_replicas": max(cap, 1),
                "min_replicas": min(scaling.min_replicas, max(cap, 1)),
            }
        )


#: The slots a SLURM job's command (and ``env`` values) may use. ``{port}`` and ``{host}`` are
#: only known on the node, so the job script fills them in as it runs.
SLURM_SLOTS = frozenset(
    {"port", "host", "model", "served_name", "model_path", "replica", "log_dir"}
)
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:=+-]+$")  # partition, qos, account, gres
_SLURM_MEM = re.compile(r"^[0-9]+[KMGT]?$")
_SLURM_TIME = re.compile(r"^(?:[0-9]+-)?[0-9]+(?::[0-9]+){0,2}$")
_SBATCH_OPT = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*(?:=[^\s'\"\\`$;&|<>]+)?$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_SAFE_PATH = re.compile(r"^[^\s'\"\\`$;&|<>%]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CALLBACK_URL = re.compile(r"^https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/-]*)?$")


def _matching(v: str | None, rx: re.Pattern[str], problem: str) -> str | None:
    if v is not None and not rx.match(v):
        raise ValueError(f"{v!r} {problem}")
    return v


def _no_control(v: str, what: str) -> str:
    if any(not c.isprintable() for c in v):
        raise ValueError(f"{what} must be one line of printable text")
    return v


class SlurmSubmit(SpecModel):
    """Where ``sbatch``, ``squeue`` and ``scancel`` run: here, or on a login node over SSH
    (the system ``ssh`` with ``BatchMode=yes`` and strict host-key checking)."""

    via: Literal["local", "ssh"] = "local"
    host: str | None = None
    user: str | None = None
    port: int = Field(22, ge=1, le=65535)
    key_file: str | None = None
    known_hosts: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SlurmSubmit:
        if self.via == "ssh":
            if not self.host:
                raise ValueError("submit.host is required with via: ssh")
            if not self.known_hosts:
                raise ValueError(
                    "submit.known_hosts is required with via: ssh (host keys are checked "
                    "strictly; add the login node's key with ssh-keyscan and check it)"
                )
        for name in ("host", "user"):
            v = getattr(self, name)
            if v is not None and not _HOST.match(v.replace("_", "a")):
                raise ValueError(f"submit.{name} must be a plain host or user name: {v!r}")
        for name in ("key_file", "known_hosts"):
            v = getattr(self, name)
            if v is not None and not _SAFE_PATH.match(v):
                raise ValueError(f"submit.{name} must be a path without spaces or quotes")
        return self


class SlurmBackend(BackendSpec):
    """Replicas as SLURM jobs: a job script rendered from this config, submitted with
    ``sbatch --parsable``; the job reports its node and port back (callback or file).

    Every value that reaches the job script is validated here or shell-quoted when the
    script is rendered (:mod:`fleetgate.fleet.slurm_script`); ``setup`` lines are the admin's
    own shell and are written as given.
    """

    type: Literal["slurm"]
    command: tuple[str, ...] | str
    model_path: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    bind_host: str | None = None
    partition: str | None = None
    qos: str | None = None
    account: str | None = None
    gres: str | None = None
    cpus_per_task: int | None = Field(None, ge=1, le=4096)
    mem: str | None = None
    time_limit: str | None = None
    sbatch_extra: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    handover_before_s: float = Field(300.0, ge=0)
    submit: SlurmSubmit = SlurmSubmit()
    discovery: Literal["callback", "file"] = "callback"
    callback_url: str | None = None
    shared_dir: str | None = None
    poll_interval_s: float = Field(10.0, ge=2.0, le=600)
    pending_timeout_s: float | None = Field(3600.0, gt=0)
    pending_timeout_action: Literal["report", "cancel"] = "report"
    log_dir: str = ".fleetgate/logs"
    start_timeout_s: float = Field(600.0, gt=0)
    stop_grace_s: float = Field(30.0, ge=0)
    health_path: str = "/health"
    models_path: str | None = "/v1/models"
    health_interval_s: float = Field(5.0, gt=0)
    keep_on_shutdown: bool = False

    @field_validator("partition", "qos", "account", "gres")
    @classmethod
    def _slurm_word(cls, v: str | None) -> str | None:
        return _matching(v, _SLURM_WORD, "has characters SLURM doesn't use there")

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        return _matching(v, _SLURM_MEM, "is not a SLURM size such as 64G or 16000M")

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        return _matching(v, _SLURM_TIME, "is not a SLURM time such as 04:00:00 or 1-00:00")

    @field_validator("sbatch_extra")
    @classmethod
    def _extra(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for opt in v:
            if not _SBATCH_OPT.match(opt):
                raise ValueError(
                    f"{opt!r} must be one option such as --constraint=a100 "
                    "(no spaces, quotes or shell characters)"
                )
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for line in v:
            _no_control(line, "each setup line")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not _ENV_NAME.match(k):
                raise ValueError(f"{k!r} is not a valid variable name")
        return v

    @field_validator("bind_host")
    @classmethod
    def _bind(cls, v: str | None) -> str | None:
        return _matching(v, _HOST, "is not a host name or address")

    @field_validator("log_dir", "shared_dir", "model_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return _matching(v, _SAFE_PATH, "must be a path without spaces, quotes, % or shell characters")

    @field_validator("callback_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not _CALLBACK_URL.match(v):
            raise ValueError(f"{v!r} is not an http(s) URL such as http://login1:8000")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _check(self) -> SlurmBackend:
        parts = [self.command] if isinstance(self.command, str) else list(self.command)
        for p in [*parts, *self.env.values()]:
            _no_control(p, "command and env values")
        check_command(self.command, self.env, self.model_path, SLURM_SLOTS)
        if self.discovery == "callback":
            if not self.callback_url:
                raise ValueError(
                    "callback_url is required with discovery: callback (how jobs reach the "
                    "gateway, e.g. http://login1:8000)"
                )
        elif not self.shared_dir:
            raise ValueError("shared_dir is required with discovery: file")
        return self

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(
            self.health_path,
            self.health_interval_s,
            self.models_path,
            self.start_timeout_s,
            self.stop_grace_s,
            self.keep_on_shutdown,
        )


Backend = Annotated[StaticBackend | LocalBackend | SlurmBackend, Field(discriminator="type")]


def _backend_types() -> frozenset[str]:
    union = get_args(Backend)[0]
    return frozenset(get_args(c.model_fields["type"].annotation)[0] for c in get_args(union))


#: The ``type`` tags of :data:`Backend` (config error paths leave them out).
BACKEND_TYPES = _backend_types()


class ScalingPolicy(SpecModel):
    """How many replicas a model runs. Ignored for ``static`` (one replica per URL).

    Scale up when in-flight plus queued requests per ready replica stay above
    ``target_inflight`` for ``scale_up_window_s``. Scale down one replica at a time when the
    load would fit in one replica fewer at ``scale_down_below`` of the target, for
    ``scale_down_window_s``, and no sooner than ``scale_down_cooldown_s`` after the last change.
    With ``min_replicas: 0``, ``idle_timeout_s`` without a request scales to zero.
    """

    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_inflight: float = Field(8.0, gt=0)
    idle_timeout_s: float | None = Field(900.0, gt=0)
    scale_up_window_s: float = Field(10.0, ge=0)
    scale_down_window_s: float = Field(60.0, ge=0)
    scale_down_cooldown_s: float = Field(120.0, ge=0)
    scale_down_below: float = Field(0.5, gt=0, le=1)
    drain_timeout_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> ScalingPolicy:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class ColdStartPolicy(SpecModel):
    """What a request gets when no replica is ready: 503 + Retry-After now, or a wait.

    In ``wait`` mode a streaming request gets an SSE comment every ``keepalive_s`` while it
    waits, so proxies and clients with read timeouts don't give up on a silent connection.
    """

    mode: Literal["reject", "wait"] = "reject"
    wait_timeout_s: float = Field(120.0, gt=0)
    keepalive_s: float = Field(5.0, gt=0, le=300)
    retry_after_s: int | None = Field(None, ge=1, le=3600)


class BalancerPolicy(SpecModel):
    """How a request picks among ready replicas.

    ``prefix_affinity`` sends requests whose affinity key hashes the same to the same replica
    (so the engine's prefix cache hits), unless that replica already holds more than
    ``load_factor`` times the average load (consistent hashing with bounded loads).
    """

    strategy: Literal["least_outstanding", "prefix_affinity"] = "least_outstanding"
    load_factor: float = Field(1.25, ge=1.0)


class RestartPolicy(SpecModel):
    """Replacing a replica that crashed, hung, or failed its health checks."""

    max_restarts: int = Field(3, ge=0)
    window_s: float = Field(600.0, gt=0)
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    unhealthy_after: int = Field(2, ge=1)
    failed_cooldown_s: float = Field(300.0, ge=0)


class FleetSettings(SpecModel):
    """Fleet-wide settings (``Settings.fleet``).

    ``state_dir`` records the processes this gateway started, so a restarted gateway finds
    them: ``on_leftover: adopt`` keeps those whose model and backend config are unchanged and
    stops the rest; ``stop`` stops them all. ``readiness_interval_s`` is how often a starting
    replica is probed: a replica is routable within about that long of its engine being ready.
    ``up_access`` / ``down_access`` say who may warm a model up or stop it through the fleet
    API: ``admin`` keys only, or also any key allowed to use that model (``model_users``).
    """

    state_dir: str = ".fleetgate/state"
    on_leftover: Literal["adopt", "stop"] = "adopt"
    readiness_interval_s: float = Field(0.25, gt=0, le=5)
    probe_timeout_s: float = Field(2.0, gt=0)
    control_interval_s: float = Field(1.0, gt=0, le=60)
    up_access: Literal["admin", "model_users"] = "model_users"
    down_access: Literal["admin", "model_users"] = "admin"
    gateway_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,40}$")

    def resolved_gateway_id(self) -> str:
        """This gateway's name in the names of the jobs it submits: ``gateway_id``, or by
        default the short host name and a hash of the absolute state directory, so two
        gateways on one login node (different state directories) never take each other's jobs.
        """
        if self.gateway_id:
            return self.gateway_id
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:24] or "gw"
        where = os.path.abspath(self.state_dir).encode()
        return f"{host}-{hashlib.sha256(where).hexdigest()[:6]}"


@dataclass(frozen=True)
class ModelPolicy:
    scaling: ScalingPolicy
    cold_start: ColdStartPolicy
    balancer: BalancerPolicy
    restart: RestartPolicy


def policy_of(m: ModelSettings) -> ModelPolicy:
    """The policy the fleet acts on for model ``m``.

    The backend caps what it can't honour (:meth:`BackendSpec.cap_scaling`): a static backend
    always runs exactly one replica per URL, a local one no more than its GPU list allows.
    """
    scaling = m.backend.cap_scaling(m.scaling)
    return ModelPolicy(
        scaling=scaling, cold_start=m.cold_start, balancer=m.balancer, restart=m.restart
    )


def retry_after_estimate(
    policy: ColdStartPolicy, remaining_s: float | None, cap_s: int = 30
) -> int:
    """Seconds to put in Retry-After for a model that is starting (pure).

    ``cap_s`` is 30 for an estimate from the last cold start; a queue's own estimate (a SLURM
    job's expected start) may go up to 300.
    """
    if policy.retry_after_s is not None:
        return policy.retry_after_s
    if remaining_s is None:
        return 5
    return max(1, min(cap_s, math.ceil(remaining_s)))
