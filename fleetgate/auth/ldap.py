"""LDAP sign-in for the portal: one blocking function, run in a worker thread, never on the loop.

:meth:`Directory.authenticate` answers an :class:`LdapIdentity` (the user's DN and the DNs of the
groups found for them), or raises:

* :class:`LdapRefused`: wrong password, unknown user, a search that finds zero or several
  entries, or a name or password refused before any bind (empty, too long, control characters:
  an empty password is an *anonymous* bind, which succeeds);
* :class:`LdapUnavailable`: the server can't be reached, TLS fails (certificate validation is
  always on), or it doesn't answer within ``ldap.timeout_s`` (connect and each receive).

The user name goes into a DN through ``escape_rdn`` and into a filter through
``escape_filter_chars``, so ``*)(uid=*`` is a name, not a filter. Every connection is opened
with StartTLS or LDAPS and closed before returning. Nothing is logged with a password in it.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from dataclasses import dataclass

from ldap3 import NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from fleetgate.config import LdapSettings

MAX_NAME = 256
MAX_PASSWORD = 1024
MAX_GROUPS = 1000


class LdapRefused(Exception):
    """The credentials were not accepted (the message never says which part was wrong)."""


class LdapUnavailable(Exception):
    """The directory couldn't be asked; the message says why, for the person signing in."""


@dataclass(frozen=True, slots=True)
class LdapIdentity:
    username: str
    dn: str
    groups: tuple[str, ...]  # group DNs, lower-cased for comparison


def valid_username(username: str) -> bool:
    return (
        0 < len(username) <= MAX_NAME
        and username == username.strip()
        and all(c.isprintable() for c in username)
    )


def norm_dn(dn: str) -> str:
    """DNs compare case-insensitively and without spaces around separators, here."""
    return ",".join(part.strip() for part in dn.split(",")).lower()


class Directory:
    """One configured directory. Holds no connection between calls."""

    def __init__(self, settings: LdapSettings) -> None:
        self.s = settings
        # ldap3 packs the receive timeout into a socket option that takes whole seconds.
        self.timeout = max(1, math.ceil(settings.timeout_s))
        tls = Tls(
            validate=ssl.CERT_REQUIRED,
            version=ssl.PROTOCOL_TLS_CLIENT,
            ca_certs_file=settings.ca_file,
        )
        self.server = Server(
            settings.url,
            use_ssl=settings.url.startswith("ldaps://"),
            tls=tls,
            connect_timeout=self.timeout,
            get_info=NONE,
        )

    def _connect(self, user: str | None, password: str | None) -> Connection:
        """An open, TLS-protected connection, bound as ``user`` (raises LdapRefused if not)."""
        conn = Connection(
            self.server, user=user, password=password, receive_timeout=self.timeout,
            raise_exceptions=False, read_only=True,
        )
        try:
            conn.open()
            if self.s.start_tls and not self.s.url.startswith("ldaps://") and not conn.start_tls():
                _close(conn)
                raise LdapUnavailable("The directory refused StartTLS.")
            if not conn.bind():
                _close(conn)
                raise LdapRefused("bind refused")
        except LDAPException as e:
            _close(conn)
            raise LdapUnavailable(_why(e)) from None
        return conn

    def _find_dn(self, username: str) -> str:
        search = self.s.search
        assert search is not None
        conn = self._connect(search.bind_dn, search.bind_password)
        try:
            conn.search(
                search.base, search.filter.replace("{username}", escape_filter_chars(username)),
                SUBTREE, attributes=[], size_limit=2,
            )
            found = [e for e in conn.response or () if e.get("type") == "searchResEntry"]
        except LDAPException as e:
            raise LdapUnavailable(_why(e)) from None
        finally:
            _close(conn)
        if len(found) != 1:  # nobody, or a filter that matched several: refuse both
            raise LdapRefused("not exactly one entry")
        return str(found[0]["dn"])

    def authenticate(self, username: str, password: str) -> LdapIdentity:
        if not valid_username(username) or not password or len(password) > MAX_PASSWORD \
                or "\x00" in password:
            raise LdapRefused("refused before any bind")
        if self.s.user_dn_template is not None:
            dn = self.s.user_dn_template.replace("{username}", escape_rdn(username))
        else:
            dn = self._find_dn(username)
        conn = self._connect(dn, password)
        if self.s.search is not None and self.s.group_search is not None:
            # Many directories let only service accounts search groups: use the reader's.
            _close(conn)
            conn = self._connect(self.s.search.bind_dn, self.s.search.bind_password)
        try:
            groups = self._groups(conn, username, dn)
        finally:
            _close(conn)
        return LdapIdentity(username, dn, groups)

    def _groups(self, conn: Connection, username: str, dn: str) -> tuple[str, ...]:
        gs = self.s.group_search
        if gs is None:
            return ()
        flt = gs.filter.replace("{username}", escape_filter_chars(username)).replace(
            "{dn}", escape_filter_chars(dn))
        try:
            conn.search(gs.base, flt, SUBTREE, attributes=[], size_limit=MAX_GROUPS)
        except LDAPException as e:
            raise LdapUnavailable(_why(e)) from None
        return tuple(sorted({
            norm_dn(str(e["dn"])) for e in conn.response or ()
            if e.get("type") == "searchResEntry"
        }))


def _close(conn: Connection) -> None:
    # A connection that broke half-way (a failed TLS handshake) can fail to close as well.
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()


def _why(e: LDAPException) -> str:
    text = type(e).__name__
    if "Certificate" in str(e) or "SSL" in text or "TLS" in text or "certificate" in str(e):
        return "The directory's TLS certificate could not be verified; ask an admin."
    if "Timeout" in text or "timed out" in str(e).lower() or "Receive" in text:
        return "The directory did not answer in time; try again in a few minutes."
    return "The directory can't be reached right now; try again in a few minutes."
