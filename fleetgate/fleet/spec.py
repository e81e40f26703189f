"""Config models for the fleet: where a model's replicas come from and how they scale.

Imported by :mod:`fleetgate.config`, which owns loading and validation. These models reject
unknown keys and are frozen, like every config model. Nothing here does I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StaticBackend(SpecModel):
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
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"backend URL must start with http:// or https://: {u!r}")
            out.append(u.rstrip("/"))
        return tuple(out)


Backend = Annotated[StaticBackend, Field(discriminator="type")]
