"""The issue's "done when", as a user meets it: a model with `min_replicas: 0` and the default
policy (`reject`, estimated `Retry-After`) costs nothing while idle, and the official `openai`
client gets a completion from it with no manual step: the gateway answers 503 + Retry-After on
the cold start, the client retries on its own, the replica is ready. The gateway stops the
replica it launched when it shuts down."""

from __future__ import annotations

import openai
import pytest
from e2e import Fleet, sim_model
from fleet_helpers import pid_running


def test_openai_client_gets_a_completion_from_a_cold_model(fleet: Fleet) -> None:
    doc = fleet.config([sim_model(fleet.tmp, "cold", "--startup-delay-s", "0.5")])
    gw = fleet.gateway(doc)
    assert gw.status("cold")["status"] == "stopped"  # idle: nothing runs
    client = gw.client(max_retries=3)
    with pytest.raises(openai.APIStatusError) as e:
        client.with_options(max_retries=0).completions.create(model="cold", prompt="hi")
    assert e.value.status_code == 503
    assert e.value.response.headers["retry-after"] == "5"  # no cold start seen yet: a guess
    out = client.chat.completions.create(
        model="cold", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert out.choices[0].message.content
    (rep,) = gw.replicas("cold")
    assert rep["state"] == "ready" and pid_running(rep["pid"])
    assert len(list((fleet.state_dir / "local").glob("*.json"))) == 1  # one replica launched
    assert gw.terminate() == "clean"
    assert not pid_running(rep["pid"])  # the gateway stopped the replica it launched
    assert list((fleet.state_dir / "local").glob("*.json")) == []
