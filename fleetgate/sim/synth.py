"""What the simulator "generates": token text, rough token counts and embedding vectors.

Nothing here is a model. Completions are the fixed sequence ``tok0 tok1 tok2 ...``; prompt
sizes are whitespace word counts; embeddings are a hash of the input spread over a unit
vector. Everything is deterministic (same input, same output, across processes), pure and
allocation-light: token pieces and their JSON encodings are built once at import time, so
a streamed token costs a list lookup, not a serialisation.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from functools import lru_cache
from typing import Any

import orjson

from fleetgate.sim.options import MAX_TOKENS_CAP

# Piece i is what token i adds to the text: "tok0", " tok1", " tok2", ...
PIECES: tuple[str, ...] = tuple(f"tok{i}" if i == 0 else f" tok{i}" for i in range(MAX_TOKENS_CAP))
PIECES_JSON: tuple[bytes, ...] = tuple(orjson.dumps(p) for p in PIECES)
_FULL_TEXT = "".join(PIECES)


def _prefix_ends() -> tuple[int, ...]:
    ends = [0]
    for p in PIECES:
        ends.append(ends[-1] + len(p))
    return tuple(ends)


_ENDS = _prefix_ends()  # _ENDS[n] == len(text of the first n tokens)


def completion_text(n_tokens: int) -> str:
    """The text of the first ``n_tokens`` tokens: ``"tok0 tok1 ... tok{n-1}"``."""
    return _FULL_TEXT[: _ENDS[n_tokens]]


def count_words(text: str) -> int:
    """A rough token count: whitespace-separated words."""
    return len(text.split())


def count_message_tokens(messages: list[Any]) -> int:
    """Rough prompt size of chat ``messages``: words in every text content, at least 1.

    Content may be a string or a list of parts (only ``{"type": "text"}`` parts count).
    Anything else is ignored rather than rejected: the simulator is lenient where vLLM's
    tokenizer would simply count.
    """
    total = 0
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            total += count_words(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_words(part["text"])
    return max(total, 1)


def split_prompts(prompt: Any) -> list[Any] | None:
    """Normalise a completions ``prompt`` / embeddings ``input`` into a list of items.

    Accepts a string, a list of strings, a list of token ids or a list of token-id lists,
    as OpenAI does. Returns None when the value has none of those shapes.
    """
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) or _is_token_list(p) for p in prompt):
            return list(prompt)
    return None


def _is_token_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def count_item_tokens(item: str | list[int]) -> int:
    """Rough size of one prompt item (a string or a token-id list), at least 1."""
    n = count_words(item) if isinstance(item, str) else len(item)
    return max(n, 1)


@lru_cache(maxsize=64)
def _u16(dim: int) -> struct.Struct:
    return struct.Struct(f"<{dim}H")


@lru_cache(maxsize=64)
def _f32(dim: int) -> struct.Struct:
    return struct.Struct(f"<{dim}f")


def embed(item: str | list[int], dim: int) -> list[float]:
    """A deterministic unit vector of length ``dim`` derived from ``item``'s bytes."""
    key = item.encode() if isinstance(item, str) else orjson.dumps(item)
    raw = _u16(dim).unpack(hashlib.shake_128(key).digest(2 * dim))
    vec = [x / 32767.5 - 1.0 for x in raw]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


def embedding_base64(vec: list[float]) -> str:
    """``vec`` as OpenAI's ``encoding_format="base64"``: little-endian float32, base64."""
    return base64.b64encode(_f32(len(vec)).pack(*vec)).decode("ascii")
