"""Fixtures of the portal tier: one real slapd for the session, and portal settings around it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ldap_server import GPU_POWER, LLM_USERS, SUFFIX, Slapd, available, running_slapd  # noqa: E402


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    if not available():
        pytest.skip("slapd is not installed (scripts/test.sh installs slapd and ldap-utils)")
    with running_slapd(tmp_path_factory.mktemp("slapd")) as s:
        yield s


def ldap_doc(s: Slapd, **over: Any) -> dict[str, Any]:
    """An ``ldap:`` section for this server: DN template over LDAPS, groups mapped."""
    doc: dict[str, Any] = {
        "url": s.ldaps_url,
        "ca_file": s.ca_file,
        "user_dn_template": f"uid={{username}},ou=people,{SUFFIX}",
        "group_search": {"base": f"ou=groups,{SUFFIX}", "filter": "(memberUid={username})"},
        "group_map": {LLM_USERS: "research", GPU_POWER: "gpu"},
        "required_group": LLM_USERS,
        "timeout_s": 10,  # generous: a busy 2-core CI box handshakes slowly
    }
    doc.update(over)
    return doc


def search_doc(s: Slapd, **over: Any) -> dict[str, Any]:
    """The same directory found by search-then-bind, over StartTLS."""
    doc = ldap_doc(s, url=s.ldap_url, start_tls=True, user_dn_template=None, search={
        "base": f"ou=people,{SUFFIX}", "filter": "(uid={username})",
        "bind_dn": f"cn=reader,{SUFFIX}", "bind_password": "reader-pw"})
    doc.update(over)
    return doc


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2 at its lowest cost here: the tests check behaviour, not the hash's strength."""
    from argon2 import PasswordHasher

    from fleetgate.auth import passwords

    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(passwords, "_hasher", cheap)
    monkeypatch.setattr(passwords, "_DUMMY", cheap.hash("dummy"))
