"""Everything set on subjects, read once per request: a table replaced whole, never mutated.

The caller builds a :class:`LimitTable` from the config (``models[].limits``) and the store
(limits and quotas on groups, users and keys; group weights) and swaps it in whole when they
change, as the route table is. Per request, :meth:`LimitTable.checks` is one dict lookup: the
:class:`~fleetgate.limits.spec.Checks` for a (model, user, groups, key) are built the first time
and remembered (at most ``max_memo`` of them; the memo starts over when full).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fleetgate.limits.fairshare import weight_for
from fleetgate.limits.spec import Checks, Limits, Quota, Subject


class LimitTable:
    def __init__(
        self,
        limits: Mapping[Subject, Limits] | None = None,
        quotas: Mapping[Subject, Quota] | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        max_memo: int = 100_000,
    ) -> None:
        self.limits = {s: lim for s, lim in (limits or {}).items() if not lim.empty}
        self.quotas = dict(quotas or {})
        self.weights = dict(weights or {})
        self.max_memo = max_memo
        self._memo: dict[tuple[str, str | None, tuple[str, ...], str | None], Checks] = {}

    @property
    def configured(self) -> bool:
        """Whether any limit or quota is set (``--workers`` > 1 on ``memory`` is then refused)."""
        return bool(self.limits or self.quotas)

    def checks(
        self, *, model: str, user: str | None, groups: tuple[str, ...] = (), key: str | None = None
    ) -> Checks:
        k = (model, user, groups, key)
        found = self._memo.get(k)
        if found is None:
            if len(self._memo) >= self.max_memo:
                self._memo.clear()
            found = self._memo[k] = Checks.build(
                model=model, user=user, groups=groups, key=key,
                limits=self.limits, quotas=self.quotas,
            )
        return found

    def weight(self, groups: Iterable[str]) -> float:
        return weight_for(groups, self.weights)
