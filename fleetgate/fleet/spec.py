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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from fleetgate.fleet.backend_base import (
    BackendSpec,
    Lifecycle,
    SpecModel,
    check_command,
    launched_lifecycle,
)
from fleetgate.fleet.slurm_spec import SlurmBackend, SlurmSubmit

__all__ = [
    "BACKEND_TYPES", "Backend", "BackendSpec", "BalancerPolicy", "ColdStartPolicy",
    "FleetSettings", "Lifecycle", "LocalBackend", "ModelPolicy", "RestartPolicy",
    "ScalingPolicy", "SlurmBackend", "SlurmSubmit", "SpecModel", "StaticBackend",
    "check_command", "policy_of", "retry_after_estimate",
]

if TYPE_CHECKING:
    from fleetgate.config import ModelSettings


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
        return launched_lifecycle(self)

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
