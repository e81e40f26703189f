"""Reading token usage off responses as they pass, without re-encoding what the client gets.

A non-streamed body is searched for its ``usage`` object. A stream is handled one complete SSE
event at a time: events that mention ``"usage"`` are parsed, everything else passes as bytes.
When the gateway itself asked the upstream for ``stream_options.include_usage`` (so that every
token is counted even when the client didn't ask), the usage-only event is dropped before it
reaches the client, who then sees exactly the stream it asked for.
"""

from __future__ import annotations

import orjson

_USAGE = b'"usage"'
_DONE = b"data: [DONE]"


class UsageTap:
    __slots__ = ("hide_usage_event", "rewrite", "prompt_tokens", "completion_tokens", "done")

    def __init__(self, *, hide_usage_event: bool, rewrite: tuple[bytes, bytes] | None) -> None:
        self.hide_usage_event = hide_usage_event
        self.rewrite = rewrite
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.done = False

    def _take(self, usage: object) -> None:
        if isinstance(usage, dict):
            p = usage.get("prompt_tokens")
            c = usage.get("completion_tokens")
            if isinstance(p, int):
                self.prompt_tokens = p
            if isinstance(c, int):
                self.completion_tokens = c

    def body(self, data: bytes) -> bytes:
        """A whole (non-streamed) JSON body: note its usage, return what the client gets."""
        if _USAGE in data:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                self._take(obj.get("usage"))
        if self.rewrite is not None:
            data = data.replace(*self.rewrite)
        return data

    def events(self, chunk: bytes) -> bytes:
        """One or more complete SSE events (each ending in a blank line)."""
        if _DONE in chunk:
            self.done = True
        if _USAGE in chunk:
            kept = []
            for ev in chunk.split(b"\n\n"):
                if not ev:
                    continue
                if _USAGE in ev and self._usage_event(ev):
                    continue
                kept.append(ev + b"\n\n")
            chunk = b"".join(kept)
        if self.rewrite is not None:
            chunk = chunk.replace(*self.rewrite)
        return chunk

    def _usage_event(self, ev: bytes) -> bool:
        """Record usage from one event; True when the event should be hidden."""
        line = ev.strip()
        if not line.startswith(b"data:"):
            return False
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        self._take(obj.get("usage"))
        return self.hide_usage_event and obj.get("choices") == [] and obj.get("usage") is not None
