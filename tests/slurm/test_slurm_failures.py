"""What goes wrong on a real cluster: a job cancelled from outside, a partition that doesn't
exist, callbacks with a wrong or replayed token. None of them takes the gateway down."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from cluster import Cluster
from e2e import Fleet, until
from slurm_helpers import Load, gateway_doc, job_ids, scancel, slurm_model


def test_a_job_cancelled_from_outside_is_replaced_with_no_failed_request(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    m = slurm_model(tmp_path, "m", scaling={"min_replicas": 2, "max_replicas": 2})
    gw = fleet.gateway(gateway_doc(fleet, [m]))
    until(lambda: len(gw.replicas("m", "ready")) == 2, 60, "two ready replicas")
    before = job_ids(gw, "m")
    with Load(gw, "m") as load:
        time.sleep(2)
        victim = before[0]
        cancelled_at = time.monotonic()
        scancel(victim)

        def replaced() -> bool:
            ids = [str(r["job_id"]) for r in gw.replicas("m", "ready")]
            return len(ids) == 2 and victim not in ids

        until(replaced, 60, "the cancelled job replaced by a new ready one")
        replaced_s = time.monotonic() - cancelled_at
        time.sleep(2)
    print(f"\nscancel to a new ready replica: {replaced_s:.1f}s; "
          f"{len(load.ok)} requests ok, {len(load.failed)} failed")
    assert load.ok and not load.failed, load.failed[:5]
    st = gw.status("m")
    gone = [r for r in st["replicas"] if r.get("job_id") == victim]
    assert st["restarts"] >= 1 or any("CANCELLED" in e["reason"] or "left the queue" in e["reason"]
                                      for r in gone for e in r["events"])


def test_a_bad_partition_is_a_clear_503_and_the_gateway_carries_on(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    bad = slurm_model(
        tmp_path, "bad", backend={"partition": "nope"},
        restart={"max_restarts": 1, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
    )
    good = slurm_model(tmp_path, "good", scaling={"min_replicas": 1})
    gw = fleet.gateway(gateway_doc(fleet, [bad, good]))
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as first:
        client.chat.completions.create(
            model="bad", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert first.value.status_code == 503
    until(lambda: gw.status("bad")["status"] == "failed", 30, "bad held failed")
    with pytest.raises(openai.APIStatusError) as later:
        client.chat.completions.create(
            model="bad", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert later.value.status_code == 503 and later.value.response.headers["retry-after"]
    assert "failed to start" in later.value.message
    # The admin sees sbatch's own words; the user doesn't.
    st = gw.status("bad")
    assert "invalid partition" in st["last_failure"].lower(), st["last_failure"]
    assert "partition" not in later.value.message.lower()
    # Everything else still works.
    until(lambda: gw.replicas("good", "ready"), 60, "the good model ready")
    out = client.chat.completions.create(
        model="good", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].message.content
    assert gw.proc.poll() is None


def test_callbacks_with_a_wrong_or_replayed_token_are_refused(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    gw = fleet.gateway(gateway_doc(fleet, [slurm_model(tmp_path, "m", scaling={"min_replicas": 1})]))
    rep = until(lambda: (gw.replicas("m") or [None])[0], 30, "a replica")
    cb = f"{gw.url}/v1/fleet/callback"
    with httpx.Client(timeout=10) as http:
        # Someone racing the job with a made-up token is refused, and learns nothing.
        r = http.post(cb, json={"replica": rep["id"], "token": "x" * 43, "host": "evil",
                                "port": 1})
        assert r.status_code == 403 and r.json()["error"]["code"] == "callback_refused"
        r = http.post(cb, json={"replica": "nope", "token": "x", "host": "h", "port": 1})
        assert r.status_code == 403
        r = http.post(cb, content=b"not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        # The job's own callback still works: the replica comes up at the job's address.
        ready = until(lambda: (gw.replicas("m", "ready") or [None])[0], 60, "ready")
        assert "evil" not in ready["url"]
        # Replaying the job's real token (read back from SLURM's copy of the script) fails.
        script = cluster.run("scontrol", "write", "batch_script", str(ready["job_id"]), "-").stdout
        token = re.search(r'"token": "([^"]+)"', script)
        assert token, script[:500]
        r = http.post(cb, json={"replica": ready["id"], "token": token.group(1),
                                "host": "evil", "port": 1})
        assert r.status_code == 403
    assert gw.replicas("m", "ready")[0]["url"] == ready["url"]
    log = gw.log(400)
    assert "refused a job callback" in log and token.group(1) not in log
    state = json.dumps([p.read_text() for p in (fleet.state_dir / "slurm").glob("*.json")])
    assert token.group(1) not in state
