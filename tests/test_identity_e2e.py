"""Users, groups and keys end to end: the CLI sets them up, a real `fleetgate serve` enforces
them, the official `openai` client sees the result.

Three users in two groups with different model access; a group narrowed while the gateway runs
narrows every key under it within the poll interval; a rotated key's old value works during the
overlap and stops after it; a disabled user's keys stop; a user key can't use the admin API to
give itself more.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from helpers import FLEETGATE, cli, free_port, gateway, new_key, sim, until

MODELS = ("llama", "qwen/small", "qwen/large")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("identity")
    with sim("engine", "--ttft-ms", "0", "--tokens-per-s", "0") as sim_url:
        cfg = tmp / "gw.yaml"
        models = "".join(
            f"  - name: {m}\n    served_name: engine\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
            for m in MODELS
        )
        cfg.write_text(
            "auth: {mode: keys, revocation_poll_s: 0.2}\n"
            f"store: {{url: 'sqlite:///{tmp / 'fg.db'}'}}\n"
            f"models:\n{models}"
        )
        cli(cfg, "groups", "create", "research", "--models", "qwen/*")
        cli(cfg, "groups", "create", "platform", "--models", "llama,qwen/small")
        cli(cfg, "users", "create", "ana", "--group", "research")
        cli(cfg, "users", "create", "ben", "--group", "platform")
        cli(cfg, "users", "create", "cat", "--group", "research", "--group", "platform",
            "--models", "qwen/*")
        keys = {u: new_key(cfg, f"{u}-1", "--user", u) for u in ("ana", "ben", "cat")}
        port = free_port()
        with gateway(cfg, port) as url:
            yield {"url": url, "cfg": cfg, "keys": keys}


def client(stack: dict[str, Any], key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=key, max_retries=0, timeout=20)


def can_use(stack: dict[str, Any], key: str, model: str) -> bool:
    try:
        client(stack, key).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        return True
    except openai.PermissionDeniedError:
        return False


# Who may use what, from the groups above: research = qwen/*; platform = llama, qwen/small;
# cat is in both but narrowed by her own list to qwen/*.
ACCESS = {
    "ana": {"qwen/small", "qwen/large"},
    "ben": {"llama", "qwen/small"},
    "cat": {"qwen/small", "qwen/large"},
}


@pytest.mark.parametrize("user", sorted(ACCESS))
def test_three_users_in_two_groups_get_what_their_groups_allow(
    stack: dict[str, Any], user: str
) -> None:
    key = stack["keys"][user]
    for model in MODELS:
        assert can_use(stack, key, model) == (model in ACCESS[user]), (user, model)
    listed = {m.id for m in client(stack, key).models.list()}
    assert listed == ACCESS[user]


def test_a_key_narrows_and_can_never_widen(stack: dict[str, Any]) -> None:
    cfg = stack["cfg"]
    narrow = new_key(cfg, "ana-narrow", "--user", "ana", "--models", "qwen/large")
    assert can_use(stack, narrow, "qwen/large") and not can_use(stack, narrow, "qwen/small")
    wide = subprocess.run(
        [*FLEETGATE, "keys", "create", "--config", str(cfg), "--name", "ana-wide",
         "--user", "ana", "--models", "llama"], capture_output=True, text=True, timeout=60)
    assert wide.returncode != 0 and "llama" in wide.stderr
    assert "fg-" not in wide.stdout


def test_narrowing_a_group_narrows_its_keys_within_the_poll(stack: dict[str, Any]) -> None:
    cfg, ben = stack["cfg"], stack["keys"]["ben"]
    assert can_use(stack, ben, "llama")
    cli(cfg, "groups", "update", "platform", "--models", "qwen/small")
    try:
        t0 = time.monotonic()
        until(lambda: not can_use(stack, ben, "llama"), 10, "the narrowing to reach the gateway")
        print(f"group narrowing took effect after {time.monotonic() - t0:.2f} s")
        assert can_use(stack, ben, "qwen/small")
    finally:
        cli(cfg, "groups", "update", "platform", "--models", "llama,qwen/small")
    until(lambda: can_use(stack, ben, "llama"), 10, "the widening to reach the gateway")


def test_rotation_keeps_the_old_key_for_the_overlap_then_stops_it(stack: dict[str, Any]) -> None:
    cfg = stack["cfg"]
    old = new_key(cfg, "ana-rotating", "--user", "ana")
    key_id = next(
        line.split()[0] for line in cli(cfg, "keys", "list", "--user", "ana").splitlines()
        if "ana-rotating" in line
    )
    new = cli(cfg, "keys", "rotate", key_id, "--overlap", "3s").strip().splitlines()[-1]
    assert new.startswith("fg-") and new != old
    assert can_use(stack, new, "qwen/small")
    assert can_use(stack, old, "qwen/small")  # inside the overlap
    listing = [ln for ln in cli(cfg, "keys", "list").splitlines() if "ana-rotating" in ln]
    assert len(listing) == 1 and listing[0].split()[0] == key_id and "rotating" in listing[0]

    def old_refused() -> bool:
        try:
            client(stack, old).models.list()
            return False
        except openai.AuthenticationError:
            return True

    until(old_refused, 10, "the old key to stop after the overlap")
    assert can_use(stack, new, "qwen/small")


def test_disabling_a_user_stops_their_keys(stack: dict[str, Any]) -> None:
    cfg = stack["cfg"]
    cli(cfg, "users", "create", "eve", "--group", "research")
    eve = new_key(cfg, "eve-1", "--user", "eve")
    assert can_use(stack, eve, "qwen/small")
    cli(cfg, "users", "disable", "eve")

    def refused() -> bool:
        try:
            client(stack, eve).models.list()
            return False
        except openai.AuthenticationError:
            return True

    until(refused, 10, "a disabled user's key to stop")
    cli(cfg, "users", "enable", "eve")
    until(lambda: can_use(stack, eve, "qwen/small"), 10, "the re-enabled key to work")


def test_a_user_key_cannot_make_itself_admin_over_http(stack: dict[str, Any]) -> None:
    ana = stack["keys"]["ana"]
    h = {"Authorization": f"Bearer {ana}"}
    with httpx.Client(base_url=stack["url"], headers=h, timeout=10) as c:
        assert c.patch("/admin/v1/users/ana", json={"role": "admin"}).status_code == 403
        assert c.post("/admin/v1/me/keys", json={"name": "x", "admin": True}).status_code == 403
        assert c.post("/admin/v1/me/keys", json={"name": "x", "models": ["llama"]}
                      ).status_code == 400
        me = c.get("/admin/v1/me").json()
    assert me["role"] == "user"
    assert not can_use(stack, ana, "llama")
    denied = [ln for ln in cli(stack["cfg"], "audit").splitlines() if "denied" in ln]
    assert any("ana" in ln and "user.update" in ln for ln in denied), denied
