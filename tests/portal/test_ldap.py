"""LDAP sign-in against a real slapd (LDAPS and StartTLS), directly through ``auth/ldap.py``.

Good and bad passwords, an empty password refused before any bind (the slapd log shows none),
injection user names in both the DN-template and the search-then-bind modes, certificate
validation on by default, and a directory that is down or silent: a clear error, no hang.
"""

from __future__ import annotations

import socket
import time

import pytest
from conftest import ldap_doc, search_doc
from ldap_server import GPU_POWER, LLM_USERS, Slapd, make_ca

from fleetgate.auth.ldap import Directory, LdapRefused, LdapUnavailable, norm_dn
from fleetgate.config import LdapSettings
from fleetgate.localnet import free_port

INJECTIONS = ("*)(uid=*", "admin)(|(uid=*", "alice\x00", "*", "alice)(objectClass=*")


def directory(doc: dict) -> Directory:
    return Directory(LdapSettings.model_validate(doc))


@pytest.fixture(params=["dn_template_ldaps", "search_starttls"])
def d(request: pytest.FixtureRequest, slapd: Slapd) -> Directory:
    return directory(ldap_doc(slapd) if request.param == "dn_template_ldaps" else search_doc(slapd))


def binds(s: Slapd) -> list[str]:
    return [line for line in s.log_text().splitlines() if " BIND dn=" in line]


def test_a_good_password_signs_in_with_the_users_groups(d: Directory) -> None:
    ident = d.authenticate("alice", "alice-pw")
    assert norm_dn(ident.dn) == "uid=alice,ou=people,dc=example,dc=org"
    assert set(ident.groups) == {norm_dn(LLM_USERS), norm_dn(GPU_POWER)}
    assert d.authenticate("bob", "bob-pw").groups == ()


@pytest.mark.parametrize("name,password", [("alice", "bob-pw"), ("alice", "alice-p"),
                                           ("nobody", "nobody-pw"), ("alice", "ALICE-PW")])
def test_a_wrong_password_or_unknown_user_is_refused(d: Directory, name: str, password: str) -> None:
    with pytest.raises(LdapRefused):
        d.authenticate(name, password)


@pytest.mark.parametrize("name,password", [("alice", ""), ("", "alice-pw"), ("", ""),
                                           (" alice", "alice-pw"), ("alice", "x\x00y")])
def test_empty_or_malformed_credentials_never_reach_a_bind(
    slapd: Slapd, d: Directory, name: str, password: str
) -> None:
    before = len(binds(slapd))
    with pytest.raises(LdapRefused, match="before any bind"):
        d.authenticate(name, password)
    time.sleep(0.05)  # slapd logs asynchronously; a bind would have shown up by now
    assert len(binds(slapd)) == before


@pytest.mark.parametrize("name", INJECTIONS)
def test_injection_user_names_match_nobody(slapd: Slapd, d: Directory, name: str) -> None:
    # The real passwords of people the filter would match, if it weren't escaped.
    for password in ("alice-pw", "admin-pw", "bob-pw"):
        with pytest.raises(LdapRefused):
            d.authenticate(name, password)


def test_injected_filters_reach_slapd_escaped(slapd: Slapd) -> None:
    d = directory(search_doc(slapd))
    with pytest.raises(LdapRefused):
        d.authenticate("*)(uid=*", "alice-pw")
    assert 'filter="(uid=\\2A\\29\\28uid=\\2A)"' in slapd.log_text()


def test_certificates_are_validated_by_default(slapd: Slapd, tmp_path) -> None:
    other_ca, _, _ = make_ca(tmp_path)  # a CA that did not sign slapd's certificate
    for doc in (ldap_doc(slapd, ca_file=str(other_ca)),
                search_doc(slapd, ca_file=str(other_ca))):
        with pytest.raises(LdapUnavailable, match="certificate"):
            directory(doc).authenticate("alice", "alice-pw")


def test_a_host_name_the_certificate_does_not_name_is_refused(slapd: Slapd) -> None:
    # The certificate names localhost and 127.0.0.1; 127.0.0.2 is the same server, unnamed.
    url = slapd.ldaps_url.replace("localhost", "127.0.0.2")
    with pytest.raises(LdapUnavailable):
        directory(ldap_doc(slapd, url=url)).authenticate("alice", "alice-pw")


def test_a_directory_that_is_down_is_a_clear_error_at_once(slapd: Slapd) -> None:
    d = directory(ldap_doc(slapd, url=f"ldaps://localhost:{free_port()}"))
    with pytest.raises(LdapUnavailable, match="can't be reached"):
        d.authenticate("alice", "alice-pw")


def test_a_directory_that_never_answers_times_out(slapd: Slapd) -> None:
    # A listener that accepts TCP connections (the kernel does, from the backlog) and never
    # speaks: the TLS handshake waits, and the receive timeout must end it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        d = directory(ldap_doc(slapd, url=f"ldaps://localhost:{port}", timeout_s=1))
        t0 = time.monotonic()
        with pytest.raises(LdapUnavailable):
            d.authenticate("alice", "alice-pw")
        # A bound, not a benchmark: without the timeout this would hang for good.
        assert time.monotonic() - t0 < 15
