"""Who is calling. Computed once per key, cached, and passed downstream instead of the key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    key_id: int | None = None
    key_prefix: str | None = None
    models: frozenset[str] | None = None  # None: every configured model
    admin: bool = False

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal(name="anonymous")
