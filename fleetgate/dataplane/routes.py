"""One :class:`ModelRoute` per model, built once, and the replaceable table that holds them.

A route holds every fact the request path needs about one model: its settings, the upstream
name and the body and response rewrites that follow from it, the headers sent upstream (the
model's own upstream key, never the client's), its ``/v1/models`` entry, and whether requests
hash for prefix affinity. Nothing is looked up in parallel dicts per request.

:class:`RouteTable` maps model names to routes. The data plane reads it without locks: a change
(a model added or removed at run time, later from templates) builds a new dict and swaps it in
with one assignment, so a reader sees the old table or the new one, never half of either.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleetgate.config import ModelSettings
from fleetgate.proxy.usage_tap import Rewrite, model_rewrite


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    settings: ModelSettings
    upstream_name: str
    headers: dict[str, str]
    # The response's "model" member, upstream name -> public name, when the two differ.
    rewrite: Rewrite | None
    entry: dict[str, Any]
    affinity: bool
    dynamic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls, m: ModelSettings, *, created: int | None = None, dynamic: bool = False
    ) -> ModelRoute:
        headers = {"Content-Type": "application/json"}
        if m.api_key:
            headers["Authorization"] = f"Bearer {m.api_key}"
        upstream = m.upstream_name
        rewrite = None
        if upstream != m.name:
            rewrite = model_rewrite(upstream, m.name)
        entry: dict[str, Any] = {
            "id": m.name,
            "object": "model",
            "created": int(time.time()) if created is None else created,
            "owned_by": "fleetgate",
        }
        if m.label:
            entry["label"] = m.label
        if dynamic:
            entry["dynamic"] = True
        return cls(
            name=m.name,
            settings=m,
            upstream_name=upstream,
            headers=headers,
            rewrite=rewrite,
            entry=entry,
            affinity=m.balancer.strategy == "prefix_affinity",
            dynamic=dynamic,
        )


class RouteTable:
    """Model name -> :class:`ModelRoute`. Reads are plain dict lookups; writes swap the dict."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[ModelRoute] = ()) -> None:
        self._routes: dict[str, ModelRoute] = {r.name: r for r in routes}

    @classmethod
    def from_models(cls, models: Iterable[ModelSettings]) -> RouteTable:
        created = int(time.time())
        return cls(ModelRoute.build(m, created=created) for m in models)

    def get(self, name: str) -> ModelRoute | None:
        return self._routes.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._routes

    def __iter__(self) -> Any:
        return iter(tuple(self._routes.values()))

    def __len__(self) -> int:
        return len(self._routes)

    def names(self) -> tuple[str, ...]:
        return tuple(self._routes)

    def add(self, route: ModelRoute) -> None:
        self._routes = {**self._routes, route.name: route}

    def remove(self, name: str) -> ModelRoute | None:
        if name not in self._routes:
            return None
        table = dict(self._routes)
        gone = table.pop(name)
        self._routes = table
        return gone
