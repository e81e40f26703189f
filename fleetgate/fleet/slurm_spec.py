"""The ``slurm`` backend's config model: a model's replicas as SLURM jobs.

Everything that reaches a job script is checked here to a narrow character set, or quoted when
the script is rendered (:mod:`fleetgate.fleet.slurm_script`); ``setup`` lines are the admin's
own shell. Errors name the key (``models[0].backend.partition: ...``). Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fleetgate.fleet.backend_base import (
    BackendSpec,
    Lifecycle,
    SpecModel,
    check_command,
    launched_lifecycle,
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
        return launched_lifecycle(self)
