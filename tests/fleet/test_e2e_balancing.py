"""Prefix affinity end to end: the request path hashes a chat's leading messages, and the pool
sends every turn of one conversation to the same replica (so the engine's prefix cache hits),
while different conversations spread over the replicas."""

from __future__ import annotations

from e2e import Fleet, Gateway, sim_model, until
from openai.types.chat import ChatCompletionMessageParam


def served(gw: Gateway) -> dict[str, int]:
    return {r["id"]: r["served"] for r in gw.replicas("m", "ready")}


def replica_of(gw: Gateway, messages: list[ChatCompletionMessageParam]) -> str:
    """Send one chat request and answer which replica served it."""
    before = served(gw)
    gw.client().chat.completions.create(model="m", messages=messages, max_tokens=2)
    after = served(gw)
    (rid,) = [r for r in after if after[r] != before[r]]
    return rid


def test_turns_of_one_conversation_stay_on_one_replica(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(
                fleet.tmp,
                "m",
                scaling={"min_replicas": 2, "max_replicas": 2},
                balancer={"strategy": "prefix_affinity"},
            )
        ]
    )
    gw = fleet.gateway(doc)
    until(lambda: len(gw.replicas("m", "ready")) == 2, 15, "two replicas ready")
    system: ChatCompletionMessageParam = {"role": "system", "content": "You are terse."}
    convo: list[ChatCompletionMessageParam] = [system, {"role": "user", "content": "Tell me"}]
    homes = set()
    for turn in range(6):  # a conversation grows; its first two messages stay the same
        homes.add(replica_of(gw, convo))
        convo = [*convo, {"role": "assistant", "content": "ok"}]
        convo = [*convo, {"role": "user", "content": f"and then {turn}?"}]
    assert len(homes) == 1
    others = {
        replica_of(gw, [system, {"role": "user", "content": f"topic {i}"}]) for i in range(20)
    }
    assert len(others) == 2  # different conversations use both replicas
