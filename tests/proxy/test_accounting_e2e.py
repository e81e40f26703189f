"""A client that reads 20 of 30 streamed tokens and hangs up is billed for what was produced,
end to end: the official client, `fleetgate serve`, the simulator, the store."""

from __future__ import annotations

import time

import openai
import yaml
from helpers import create_key, free_port, gateway, sim

from fleetgate.store.db import open_engine
from fleetgate.store.repo import usage_totals


def test_a_stream_left_after_20_of_30_tokens_is_counted(tmp_path):
    with sim("m", "--ttft-ms", "0", "--tokens-per-s", "40") as url:
        db = tmp_path / "fg.db"
        cfg = tmp_path / "fleetgate.yaml"
        cfg.write_text(yaml.safe_dump({
            "store": {"url": f"sqlite:///{db}"},
            "models": [{"name": "m", "backend": {"type": "static", "urls": [url]}}],
        }))
        key = create_key(cfg, "user")
        with gateway(cfg, free_port()) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "one two three"}],
                max_tokens=30, stream=True)
            got = 0
            for chunk in stream:
                assert chunk.usage is None  # the usage the gateway asked for stays hidden
                if chunk.choices and chunk.choices[0].delta.content:
                    got += 1
                    if got == 20:
                        break
            stream.close()  # hang up mid-stream
            time.sleep(0.5)  # the gateway notices and closes the upstream connection
        # The gateway stopped: its usage writer flushed on the way out.
        engine = open_engine(f"sqlite:///{db}")
        try:
            rows = usage_totals(engine)
        finally:
            engine.dispose()
    assert len(rows) == 1, rows
    assert 20 <= int(rows[0]["completion_tokens"]) < 30, rows  # type: ignore[call-overload]
    assert int(rows[0]["prompt_tokens"]) == 3  # type: ignore[call-overload]
