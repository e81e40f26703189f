"""Reading token usage off responses as they pass, without re-encoding what the client gets.

A non-streamed body is searched for its ``usage`` object. A stream is handled one batch of
complete SSE events at a time, mostly as bytes:

- the *last* ``usage`` object seen is kept as raw bytes (found with ``find``, not a JSON parse)
  and parsed once, lazily, when the counts are read. With vLLM's
  ``stream_options.continuous_usage_stats`` every chunk carries usage, so a client that reads 20
  of 30 tokens and leaves is still billed for what the engine produced. A chunk's usage counts
  only its own choice (``n`` > 1, or a list of prompts: vLLM's ``previous_num_tokens[i]``), so
  the last usage of each choice index is kept too, and until the final usage event (which sums
  them) the completion tokens are their sum;
- when no usage came at all, the content events relayed are counted as completion tokens (one
  event is one token in vLLM's and the simulator's streams), so a stream is never free;
- when the gateway itself asked for usage (the client didn't), the usage-only event
  (``"choices":[]``) is dropped and the ``usage`` member of other chunks is cut out, so the
  client sees the stream it asked for;
- the served-name rewrite turns ``"model": "<upstream name>"``, with or without whitespace
  around the colon, into ``"model":"<public name>"`` so the internal name never leaks.

Cost per event is a few ``bytes.find`` calls; only events carrying usage that must be hidden in
a layout other than vLLM's (``usage`` as the last member) are parsed and re-serialised.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple, TypeGuard

import orjson

_USAGE = b'"usage"'
_DONE = b"data: [DONE]"
# `"usage": {...}` closing the event's top-level object (vLLM writes usage last). The object may
# hold one level of nesting (`prompt_tokens_details`).
_USAGE_TAIL = re.compile(  # possessive: linear, never backtracks
    rb',\s*+"usage"\s*+:\s*+(null|\{(?:[^{}"]++|"(?:[^"\\]++|\\.)*+"|\{[^{}]*+\})*+\})\s*+\}\s*+\Z'
)
_FAST_USAGE = b',"usage":{'  # vLLM's own spelling, checked before the regex
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def _count_content(data: bytes) -> int:
    """Events carrying non-empty text (vLLM sends one token per event). Escaped text (\")
    can't fake the marks: they need a bare quote. JSON written with ": " is counted too."""
    n = data.count(b'"content":"') + data.count(b'"text":"')
    if n:
        n -= data.count(b'"content":""') + data.count(b'"text":""')
    if b'": "' in data:
        n += data.count(b'"content": "') + data.count(b'"text": "')
        n -= data.count(b'"content": ""') + data.count(b'"text": ""')
    return n


def _choice_index(ev: bytes, choices_at: int, end: int) -> int | None:
    """The ``index`` of the (first) choice in a chunk's ``"choices"`` array, or None. Text
    can't fake the mark: inside a JSON string a quote is escaped."""
    k = ev.find(b'"index":', choices_at, end)
    if k < 0:
        return None
    k += 8
    while k < end and ev[k] == 0x20:
        k += 1
    stop = k
    while stop < end and 0x30 <= ev[stop] <= 0x39:
        stop += 1
    return int(ev[k:stop]) if stop > k else None


MAX_COUNT = 2**31 - 1
"""The largest token count taken from an upstream's usage (a usage column's range on PostgreSQL).
A number past it is no count: stored, it would fail the usage batch it is in, every time."""


def _count(v: object) -> TypeGuard[int]:
    """Whether ``v`` is a token count the gateway takes: an integer in 0..MAX_COUNT."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


class Rewrite(NamedTuple):
    """The served-name rewrite: ``"model"`` set to the upstream name, however spaced."""

    pattern: re.Pattern[bytes]
    public: bytes
    compact: bytes  # the usual spelling, replaced with a plain (fast) bytes.replace
    upstream: bytes  # the upstream name as JSON: if it's still there, the regex runs

    def apply(self, data: bytes) -> bytes:
        data = data.replace(self.compact, self.public)
        if self.upstream in data:
            data = self.pattern.sub(self.public, data)
        return data


@functools.lru_cache(maxsize=1024)
def model_rewrite(upstream: str, public: str) -> Rewrite:
    """The rewrite of ``"model": "<upstream>"`` (any spacing) into ``"model":"<public>"``."""
    name = orjson.dumps(upstream)
    return Rewrite(
        re.compile(rb'"model"\s*:\s*' + re.escape(name)),
        b'"model":' + orjson.dumps(public),
        b'"model":' + name,
        name,
    )


def _as_rewrite(r: tuple[bytes, bytes] | Rewrite | None) -> Rewrite | None:
    """Accepts the older literal pair ``(b'"model":"up"', b'"model":"pub"')`` too."""
    if r is None or isinstance(r, Rewrite):
        return r
    old, new = r
    up = orjson.loads(old.partition(b":")[2])
    pub = orjson.loads(new.partition(b":")[2])
    return model_rewrite(up, pub)


class UsageTap:
    __slots__ = (
        *("hide_usage_event", "strip_chunk_usage", "rewrite", "done", "disconnected"),
        "first_byte_at",
        *("content_events", "_usage_raw", "_prompt", "_completion", "_parsed", "_per_choice"),
    )

    def __init__(
        self,
        *,
        hide_usage_event: bool,
        rewrite: tuple[bytes, bytes] | Rewrite | None,
        strip_chunk_usage: bool | None = None,
    ) -> None:
        self.hide_usage_event = hide_usage_event
        # Usage on every chunk is only there because the gateway asked for it.
        self.strip_chunk_usage = hide_usage_event if strip_chunk_usage is None else strip_chunk_usage
        self.rewrite = _as_rewrite(rewrite)
        self.done = False
        #: Set by the relay when the client went away before the stream ended.
        self.disconnected = False
        #: Set by the relay (``time.monotonic()``) as the first byte of the answer goes out.
        self.first_byte_at: float | None = None
        #: Events relayed that carried generated text: the fallback count.
        self.content_events = 0
        self._usage_raw: bytes | None = None
        # choice index -> its last usage (per-chunk usage counts one choice); None once a usage
        # for the whole response (the final event) is the last one seen.
        self._per_choice: dict[int, bytes] | None = None
        self._prompt = 0
        self._completion = 0
        self._parsed = True

    # -- the counts, parsed lazily ------------------------------------------------------------

    def _parse(self) -> None:
        if self._parsed:
            return
        self._parsed = True
        try:
            usage = orjson.loads(self._usage_raw or b"null")
        except orjson.JSONDecodeError:
            return
        self._take(usage)
        if self._per_choice is not None and len(self._per_choice) > 1:
            total = 0
            for raw in self._per_choice.values():
                try:
                    c = orjson.loads(raw).get("completion_tokens")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if _count(c):
                    total += c
            self._completion = total

    def _note(self, raw: bytes, choice: int | None) -> None:
        """A usage object seen: for one choice (``choice``), or for the whole response."""
        self._usage_raw = raw
        self._parsed = False
        if choice is None:
            self._per_choice = None
        else:
            if self._per_choice is None:
                self._per_choice = {}
            self._per_choice[choice] = raw

    def _take(self, usage: object) -> None:
        if isinstance(usage, dict):
            p = usage.get("prompt_tokens")
            c = usage.get("completion_tokens")
            if _count(p):
                self._prompt = p
            if _count(c):
                self._completion = c

    @property
    def usage_seen(self) -> bool:
        self._parse()
        return self._usage_raw is not None or self._prompt > 0 or self._completion > 0

    @property
    def prompt_tokens(self) -> int:
        self._parse()
        return self._prompt

    @property
    def completion_tokens(self) -> int:
        self._parse()
        if self._usage_raw is None and self._completion == 0:
            return self.content_events
        return self._completion

    # -- bytes in, bytes out ------------------------------------------------------------------

    def apply_rewrite(self, data: bytes) -> bytes:
        return data if self.rewrite is None else self.rewrite.apply(data)

    def body(self, data: bytes) -> bytes:
        """A whole (non-streamed) JSON body: note its usage, return what the client gets."""
        if _USAGE in data:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                self._take(obj.get("usage"))
        return self.apply_rewrite(data)

    def events(self, chunk: bytes) -> bytes:
        """One or more complete SSE events (each ending in a blank line)."""
        if _DONE in chunk:
            self.done = True
        if self._usage_raw is None:
            self.content_events += _count_content(chunk)
        if _USAGE not in chunk:
            return self.apply_rewrite(chunk)
        if not (self.hide_usage_event or self.strip_chunk_usage):
            # Nothing to hide: only the batch's last usage matters, found from the end.
            self._last_usage(chunk)
            return self.apply_rewrite(chunk)
        kept: list[bytes] = []
        changed = False
        for ev in chunk.split(b"\n\n"):
            if not ev:
                continue
            out = self._event(ev)
            if out is not ev:
                changed = True
            if out:
                kept.append(out)
                kept.append(b"\n\n")
        if changed:
            chunk = b"".join(kept)
        return self.apply_rewrite(chunk)

    def _last_usage(self, chunk: bytes) -> None:
        """Note every usage in ``chunk``, in order (each choice's last one counts)."""
        pos = 0
        while True:
            i = chunk.find(_USAGE, pos)
            if i < 0:
                return
            start = chunk.rfind(b"\n\n", 0, i)
            start = 0 if start < 0 else start + 2
            end = chunk.find(b"\n\n", i)
            end = len(chunk) if end < 0 else end
            self._event(chunk[start:end])
            pos = end

    def _usage_at(self, ev: bytes, start: int) -> bytes | None:
        """The usage object's bytes when ``ev[start:]`` is ``,"usage":{...}}`` closing the event."""
        if ev.startswith(_FAST_USAGE, start):  # vLLM's flat object: no regex needed
            close = ev.find(b"}", start + 10)
            rest = ev[close + 1 :]
            if close > 0 and (rest == b"}" or rest.strip() == b"}"):
                return ev[start + 9 : close + 1]
        m = _USAGE_TAIL.match(ev, start)
        return None if m is None else m.group(1)

    def _event(self, ev: bytes) -> bytes:
        """One event without its blank line: its usage noted; returned as the client gets it
        (the very same object when unchanged, ``b""`` to drop it)."""
        i = ev.rfind(_USAGE)
        if i < 0 or not (ev.startswith(b"data:") or ev.lstrip().startswith(b"data:")):
            return ev
        start = ev.rfind(b",", 0, i)
        raw = self._usage_at(ev, start) if start >= 0 else None
        if raw is not None:
            j = ev.rfind(b'"choices"', 0, start)  # escaped text can't match: it has \"
            final = j < 0 or _EMPTY_CHOICES.match(ev, j) is not None
            if raw != b"null":
                self._note(raw, None if final else _choice_index(ev, j, start))
            if not (self.hide_usage_event or self.strip_chunk_usage):
                return ev
            if j >= 0 and final:
                return b"" if self.hide_usage_event else ev
            if self.strip_chunk_usage:
                return ev[:start] + b"}"
            return ev
        return self._event_parsed(ev)

    def _event_parsed(self, ev: bytes) -> bytes:
        """The slow path: an event mentioning usage in another layout; parse it to be sure."""
        line = ev.strip()
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return ev
        if not isinstance(obj, dict) or "usage" not in obj:
            return ev
        usage = obj.get("usage")
        if usage is not None:
            choices = obj.get("choices")
            first = choices[0] if isinstance(choices, list) and choices else None
            index = first.get("index") if isinstance(first, dict) else None
            self._note(orjson.dumps(usage),
                       index if isinstance(index, int) and not isinstance(index, bool) else None)
        if obj.get("choices") == [] and self.hide_usage_event:
            return b""
        if self.strip_chunk_usage and obj.get("choices") != []:
            del obj["usage"]
            return b"data: " + orjson.dumps(obj)
        return ev
