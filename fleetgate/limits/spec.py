"""What limits apply to one request: pure values, built once per request by the caller.

* :class:`Limits`: ``rpm``, ``tpm``, ``max_concurrent``, ``max_tokens``, ``max_n``; ``None``
  means no limit. Set on a group, a user, a key or a model.
* :class:`Quota`: a token budget per UTC ``day`` or ``month``, set on a user or a group.
* :class:`Subject`: who a counter belongs to (``group``, ``user``, ``key`` or ``model`` and an
  id). A group's limit is one counter shared by every member; a model's limit is one counter
  shared by every caller of that model.
* :class:`Checks`: every ``(Subject, Limits)`` and ``(Subject, Quota)`` that applies to one
  request, plus the tightest caps. :meth:`Checks.build` makes it from the caller's user, groups,
  key and the model, looking each up in plain mappings (no I/O).

:func:`check_caps` refuses a request above a cap with a 400 that names the cap; it never clamps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from fleetgate.errors import InvalidRequest

SubjectKind = Literal["group", "user", "key", "model"]
SUBJECT_KINDS: tuple[str, ...] = ("group", "user", "key", "model")
Period = Literal["day", "month"]
PERIODS: tuple[str, ...] = ("day", "month")


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    max_tokens: int | None = None
    max_n: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent", "max_tokens", "max_n"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {v!r}")

    @property
    def empty(self) -> bool:
        return all(
            v is None
            for v in (self.rpm, self.tpm, self.max_concurrent, self.max_tokens, self.max_n)
        )


@dataclass(frozen=True, slots=True)
class Quota:
    tokens: int
    period: Period = "month"

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 0:
            raise ValueError(f"quota tokens must be an integer >= 0, not {self.tokens!r}")
        if self.period not in PERIODS:
            raise ValueError(f"quota period must be 'day' or 'month', not {self.period!r}")


class Subject(NamedTuple):
    """Who a counter belongs to. A tuple, so that building and hashing one per request is cheap;
    ``kind`` is one of :data:`SUBJECT_KINDS` (:meth:`of` checks it)."""

    kind: SubjectKind
    id: str

    @classmethod
    def of(cls, kind: str, id: str) -> Subject:
        if kind not in SUBJECT_KINDS:
            raise ValueError(f"unknown subject kind {kind!r}")
        return cls(kind, id)  # type: ignore[arg-type]

    def __str__(self) -> str:
        # A key's id means nothing to the person holding it; they know which key they sent.
        if self.kind == "key":
            return f"this API key (id {self.id})"
        return f"{self.kind} '{self.id}'"


@dataclass(frozen=True, slots=True)
class Checks:
    """Everything admission checks for one request.

    ``limits`` holds only subjects with a counter to keep (rpm, tpm or max_concurrent); the caps
    are folded into ``max_tokens`` / ``max_n`` (the tightest, with the subject that set it).
    """

    limits: tuple[tuple[Subject, Limits], ...] = ()
    quotas: tuple[tuple[Subject, Quota], ...] = ()
    max_tokens: tuple[int, Subject] | None = None
    max_n: tuple[int, Subject] | None = None
    # Derived once (read on every request, so plain attributes, not properties):
    counts: bool = field(init=False)
    """Whether any counter (bucket, concurrency or quota) applies."""
    capped: bool = field(init=False)
    """Whether a cap on ``max_tokens`` or ``n`` applies."""
    empty: bool = field(init=False)
    """Nothing to count or check: admission can skip the backend."""
    tpm_floor: int | None = field(init=False)
    """The smallest tpm limit that applies: a cost above it can never be admitted."""

    def __post_init__(self) -> None:
        counts = bool(self.limits or self.quotas)
        capped = self.max_tokens is not None or self.max_n is not None
        tpms = [lim.tpm for _, lim in self.limits if lim.tpm is not None]
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "capped", capped)
        object.__setattr__(self, "empty", not counts and not capped)
        object.__setattr__(self, "tpm_floor", min(tpms) if tpms else None)

    @classmethod
    def of(
        cls,
        limits: Iterable[tuple[Subject, Limits]] = (),
        quotas: Iterable[tuple[Subject, Quota]] = (),
    ) -> Checks:
        counted: list[tuple[Subject, Limits]] = []
        cap_tokens: tuple[int, Subject] | None = None
        cap_n: tuple[int, Subject] | None = None
        for subject, lim in limits:
            if lim.max_tokens is not None and (cap_tokens is None or lim.max_tokens < cap_tokens[0]):
                cap_tokens = (lim.max_tokens, subject)
            if lim.max_n is not None and (cap_n is None or lim.max_n < cap_n[0]):
                cap_n = (lim.max_n, subject)
            if lim.rpm is not None or lim.tpm is not None or lim.max_concurrent is not None:
                counted.append((subject, lim))
        return cls(tuple(counted), tuple(quotas), cap_tokens, cap_n)

    @classmethod
    def build(
        cls,
        *,
        model: str,
        user: str | None,
        groups: Iterable[str] = (),
        key: str | None = None,
        limits: Mapping[Subject, Limits],
        quotas: Mapping[Subject, Quota] | None = None,
    ) -> Checks:
        """The checks for a caller (its user, groups and key) using ``model``.

        ``limits`` and ``quotas`` map subjects to what is set on them; subjects with nothing set
        are simply absent. Every limit that applies is enforced: a request must fit all of them.
        """
        subjects = [Subject("model", model)]
        if user is not None:
            subjects.append(Subject("user", user))
        subjects.extend(Subject("group", g) for g in groups)
        if key is not None:
            subjects.append(Subject("key", key))
        subjects = list(dict.fromkeys(subjects))  # a group named twice is still one counter
        found = [(s, limits[s]) for s in subjects if s in limits]
        q: list[tuple[Subject, Quota]] = []
        if quotas:
            q = [(s, quotas[s]) for s in subjects if s.kind in ("user", "group") and s in quotas]
        return cls.of(found, q)


NO_CHECKS = Checks()


def check_caps(checks: Checks, max_tokens: int | None, n: int) -> None:
    """400 when the request asks for more than a cap allows. Never clamps.

    ``max_tokens`` is the request's ``max_completion_tokens``, else its ``max_tokens`` (the
    parser already folds them); the message names the field the caller will recognise.
    """
    if checks.max_tokens is not None and max_tokens is not None and max_tokens > checks.max_tokens[0]:
        cap, subject = checks.max_tokens
        raise InvalidRequest(
            f"max_tokens (or max_completion_tokens) is {max_tokens}, above the cap of {cap} "
            f"set on {subject}. Ask for at most {cap}.",
            param="max_tokens",
            code="max_tokens_above_cap",
        )
    if checks.max_n is not None and n > checks.max_n[0]:
        cap, subject = checks.max_n
        raise InvalidRequest(
            f"n is {n}, above the cap of {cap} set on {subject}. Ask for at most {cap}.",
            param="n",
            code="n_above_cap",
        )
