"""What every backend config model shares, and what the fleet reads from any of them.

:class:`BackendSpec` is the base of each backend's config model (``static``, ``local``,
``slurm``, ...): the fleet reads a backend only through :meth:`BackendSpec.lifecycle` and
:meth:`BackendSpec.cap_scaling`, never by its type. :func:`check_command` validates a command
template the same way for every launcher that runs one. Pure: no I/O.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from fleetgate.fleet.spec import ScalingPolicy


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


class _Launched(Protocol):
    """The settings every launched backend has (read-only: the config models are frozen)."""

    @property
    def health_path(self) -> str: ...
    @property
    def health_interval_s(self) -> float: ...
    @property
    def models_path(self) -> str | None: ...
    @property
    def start_timeout_s(self) -> float: ...
    @property
    def stop_grace_s(self) -> float: ...
    @property
    def keep_on_shutdown(self) -> bool: ...


def launched_lifecycle(b: _Launched) -> Lifecycle:
    """The lifecycle of a backend whose replicas the gateway starts (local processes, jobs)."""
    return Lifecycle(
        b.health_path,
        b.health_interval_s,
        b.models_path,
        b.start_timeout_s,
        b.stop_grace_s,
        b.keep_on_shutdown,
    )


class BackendSpec(SpecModel):
    """The part of every backend config model the fleet reads generically.

    A new backend type subclasses this, overrides what differs, and joins :data:`Backend`.
    """

    def lifecycle(self) -> Lifecycle:
        raise NotImplementedError

    def cap_scaling(self, scaling: ScalingPolicy) -> ScalingPolicy:
        """The scaling policy this backend can honour (default: as configured)."""
        return scaling


def template_slots(text: str) -> set[str]:
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
        used |= template_slots(p)
    unknown = used - slots
    if unknown:
        raise ValueError(f"unknown template slot(s) {sorted(unknown)}; known: {sorted(slots)}")
    if "port" not in used:
        raise ValueError("command must contain the {port} slot")
    if "model_path" in used and model_path is None:
        raise ValueError("command uses {model_path} but model_path is not set")
