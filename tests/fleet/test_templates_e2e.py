"""Models on request, end to end: a real `fleetgate serve` whose templates launch `fleetgate sim`
replicas, driven with `curl` (Autoserve's `POST /up` workflow) and the official `openai` client.

Users and keys are made through the admin API, as an admin would: ``alice`` is in ``research``
(may launch), ``bob`` in ``students`` (may use what runs, may not launch).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e import FLEETGATE, Fleet, Gateway, tagged_pids, until
from fleet_helpers import SIM, no_leaked_replicas  # noqa: F401  (autouse)

SLOW = ["--ttft-ms", "0", "--tokens-per-s", "40"]  # a 60-token stream lasts 1.5 s


def sim_template(name: str, match: list[str], **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": match,
        "launch": ["research"],
        "backend": {
            "type": "local",
            "command": [*SIM, "--port", "{port}", "--model", "{model_path}", *SLOW],
            "log_dir": "logs",
            "start_timeout_s": 20,
            "stop_grace_s": 3,
            "health_interval_s": 0.5,
        },
        **kw,
    }


def curl(gw: Gateway, key: str, path: str, body: Any = None) -> tuple[int, dict[str, Any], str]:
    """(status, JSON body, headers) of one curl call, as an Autoserve script makes it."""
    cmd = ["curl", "-sS", "-D", "-", "-H", f"Authorization: Bearer {key}", gw.url + path]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = subprocess.run(cmd, capture_output=True, timeout=30, check=True).stdout.decode()
    head, _, text = out.partition("\r\n\r\n")
    return int(head.split()[1]), json.loads(text), head.lower()


def admin_post(gw: Gateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(gw.url + path, json=body, timeout=10,
                   headers={"authorization": f"Bearer {gw.admin_key}"})
    assert r.status_code in (200, 201), r.text
    doc: dict[str, Any] = r.json()
    return doc


def user_key(gw: Gateway, name: str, group: str) -> str:
    admin_post(gw, "/admin/v1/groups", {"name": group, "models": ["*"]})
    admin_post(gw, "/admin/v1/users", {"name": name, "groups": [group]})
    key = admin_post(gw, "/admin/v1/keys", {"name": f"{name}-key", "user": name})["key"]
    assert isinstance(key, str)
    return key


def models_list(gw: Gateway, key: str) -> dict[str, dict[str, Any]]:
    return {m.id: m.model_dump() for m in gw.client(key).models.list().data}


def up_until_healthy(gw: Gateway, key: str, path: str) -> list[str]:
    seen: list[str] = []

    def healthy() -> bool:
        status, doc, _ = curl(gw, key, "/up", {"model_path": path})
        assert status == 200 and doc["model"] == path, doc
        seen.append(doc["status"])
        return bool(doc["status"] == "healthy")

    until(healthy, 30, f"{path} healthy", every_s=0.2)
    return seen


@pytest.fixture
def gw(fleet: Fleet, tmp_path: Path) -> Gateway:
    ckpt = tmp_path / "ckpt"
    doc = fleet.config([])
    doc["templates"] = [
        sim_template("swap", ["org/*"], max_models=1, scaling={"idle_timeout_s": 120}),
        sim_template("idle", [f"{ckpt}/*"], max_models=2, scaling={"idle_timeout_s": 3}),
    ]
    return fleet.gateway(doc)


def test_up_chat_swap_and_idle_to_zero(fleet: Fleet, gw: Gateway, tmp_path: Path) -> None:
    alice = user_key(gw, "alice", "research")
    bob = user_key(gw, "bob", "students")

    # Autoserve's workflow: POST /up, poll it until healthy, chat under the path's name.
    status, doc, _ = curl(gw, alice, "/up", {"model_path": "org/a"})
    assert (status, doc["status"], doc["model"]) == (200, "pending", "org/a"), doc
    assert "healthy" not in up_until_healthy(gw, alice, "org/a")[:-1]
    reply = gw.client(alice).chat.completions.create(
        model="org/a", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.model == "org/a" and reply.choices[0].message.content
    assert models_list(gw, alice)["org/a"]["dynamic"] is True

    # The engine runs the template's command with the path in its one slot, nothing else.
    (state,) = [json.loads(p.read_text()) for p in (fleet.state_dir / "local").glob("*.json")]
    argv = state["info"]["argv"]
    assert argv[argv.index("--model") + 1] == "org/a" and argv.count("org/a") == 1
    assert argv[-4:] == SLOW

    # Bob may use what runs, may not launch; nobody gets a path no template takes.
    assert gw.client(bob).chat.completions.create(
        model="org/a", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).model == "org/a"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        gw.client(bob).chat.completions.create(
            model="org/b", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert denied.value.code == "launch_not_allowed"
    assert curl(gw, bob, "/up", {"model_path": "org/b"})[1]["error"]["code"] == "launch_not_allowed"
    status, doc, _ = curl(gw, alice, "/v1/fleet/up", {"model_path": "nope/x"})
    assert (status, doc["error"]["code"]) == (404, "model_not_found")

    # max_models: 1. A busy org/a can't be swapped out: 503 with Retry-After, and why.
    stream_done = threading.Event()

    def long_stream() -> None:
        try:
            for _ in gw.client(alice).chat.completions.create(
                model="org/a", messages=[{"role": "user", "content": "hi"}], max_tokens=60,
                stream=True,
            ):
                pass
        finally:
            stream_done.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        until(lambda: gw.status("org/a")["inflight"] == 1, 10, "the stream in flight")
        status, doc, head = curl(gw, alice, "/up", {"model_path": "org/b"})
        assert (status, doc["error"]["code"]) == (503, "capacity_full"), doc
        assert "retry-after:" in head and "none idle" in doc["error"]["message"]
        with pytest.raises(openai.InternalServerError) as full:
            gw.client(alice).chat.completions.create(
                model="org/b", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert full.value.status_code == 503
        fleet_status = gw.get("/v1/fleet/status", gw.admin_key).json()
        swap = [x for x in fleet_status["templates"] if x["name"] == "swap"][0]
        assert "none idle" in swap["full"] and swap["models"] == ["org/a"]
    finally:
        t.join(timeout=30)
    assert stream_done.is_set()

    # Idle now: asking for org/b swaps org/a out (drained, stopped, gone from /v1/models).
    up_until_healthy(gw, alice, "org/b")
    listed = models_list(gw, alice)
    assert "org/b" in listed and "org/a" not in listed
    until(lambda: len(list((fleet.state_dir / "local").glob("*.json"))) == 1, 15,
          "org/a's process stopped")

    # A chat request launches a model on demand (cold_start: reject: 503 + Retry-After while
    # it starts, as for a configured model), here of the "idle" template (an absolute path).
    ckpt = f"{tmp_path}/ckpt/run-7"
    chat = {"model": ckpt, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"authorization": f"Bearer {alice}"}
    cold = httpx.post(f"{gw.url}/v1/chat/completions", json=chat, headers=auth, timeout=10)
    assert cold.status_code == 503 and "retry-after" in cold.headers, cold.text
    until(lambda: httpx.post(f"{gw.url}/v1/chat/completions", json=chat, headers=auth,
                             timeout=10).status_code == 200, 30, "chat-launched model answers",
          every_s=0.3)
    # Idle to zero: it leaves /v1/models.
    assert models_list(gw, alice)[ckpt]["dynamic"] is True
    until(lambda: ckpt not in models_list(gw, alice), 20, "idle model gone from /v1/models",
          every_s=0.3)
    statuses = gw.get("/v1/fleet/status", gw.admin_key).json()["models"]
    assert ckpt not in [m["model"] for m in statuses]


BAD = [
    "../etc", "-rf", "$(id)", "a;b", "org/a\u0000b", "org/" + "x" * 10_000, "org/\u0430",
    "org\uff0fa", "/etc/../x", "org/a b", "--port=1",
]


def test_bad_paths_are_refused_and_start_nothing(fleet: Fleet, gw: Gateway) -> None:
    alice = user_key(gw, "alice", "research")
    before = len(tagged_pids(fleet.tag))
    for path in BAD:
        for route in ("/up", "/v1/fleet/up"):
            r = httpx.post(gw.url + route, json={"model_path": path}, timeout=10,
                           headers={"authorization": f"Bearer {alice}"})
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_model_path"), path
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                       json={"model": path, "messages": [{"role": "user", "content": "x"}]},
                       headers={"authorization": f"Bearer {alice}"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_model_path"), path
    # An absolute path is valid here (one template takes absolute paths) but matches none.
    r = httpx.post(gw.url + "/up", json={"model_path": "/etc/passwd"}, timeout=10,
                   headers={"authorization": f"Bearer {alice}"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
    # A request can't smuggle flags, env or ports beside the path: the rest of the body is
    # never read, and the launch is the template's.
    r = httpx.post(gw.url + "/up", timeout=10, headers={"authorization": f"Bearer {alice}"},
                   json={"model_path": "org/ok", "args": ["--api-key", "x"], "port": 1,
                         "env": {"LD_PRELOAD": "/x"}})
    assert r.status_code == 200
    until(lambda: list((fleet.state_dir / "local").glob("*.json")), 10, "org/ok launched")
    time.sleep(0.5)
    (state,) = [json.loads(p.read_text()) for p in (fleet.state_dir / "local").glob("*.json")]
    assert "--api-key" not in state["info"]["argv"] and state["model"] == "org/ok"
    assert "LD_PRELOAD" not in Path(f"/proc/{state['info']['pid']}/environ").read_text()
    # Only that one replica was ever started: the gateway and it are all that run.
    assert len(tagged_pids(fleet.tag)) == before + 1
    assert len(list((fleet.state_dir.parent / "logs").rglob("*.log"))) == 1


def test_cli_up_wait_and_a_restarted_gateway_adopts_the_replica(fleet: Fleet) -> None:
    doc = fleet.config([])
    kept = sim_template("kept", ["org/*"], scaling={"idle_timeout_s": 120})
    kept["backend"]["keep_on_shutdown"] = True
    doc["templates"] = [kept]
    first = fleet.gateway(doc)

    # `fleetgate up PATH --wait`: live progress, then done once healthy.
    out = subprocess.run(
        [*FLEETGATE, "up", "org/k", "--wait", "--timeout", "30",
         "--url", first.url, "--key", first.admin_key],
        capture_output=True, text=True, timeout=60, env=fleet.env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "org/k: pending" and "org/k: healthy" in lines[-1], out.stdout
    (rec,) = [json.loads(p.read_text()) for p in (fleet.state_dir / "local").glob("*.json")]
    assert first.terminate() == "clean"

    # The replica outlived its gateway (keep_on_shutdown); the next one adopts it.
    second = fleet.gateway(doc)
    until(lambda: second.get("/v1/models", second.user_key).status_code == 200, 10, "models")
    status = second.status("org/k")
    assert status["dynamic"] is True and status["launches"] == 0, status
    assert [r["pid"] for r in status["replicas"]] == [rec["info"]["pid"]]
    until(lambda: second.status("org/k")["status"] == "healthy", 15, "adopted replica ready")
    assert second.client().chat.completions.create(
        model="org/k", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).model == "org/k"
    assert "org/k" in {m.id for m in second.client().models.list().data}

    # Stop it for good (down), so nothing outlives the test.
    r = httpx.post(f"{second.url}/v1/fleet/down", json={"model": "org/k"}, timeout=10,
                   headers={"authorization": f"Bearer {second.admin_key}"})
    assert r.status_code == 200, r.text
    until(lambda: not list((fleet.state_dir / "local").glob("*.json")), 20, "replica stopped")
