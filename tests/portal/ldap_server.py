"""A real OpenLDAP server (Debian's ``slapd``) for the portal tests, on free loopback ports.

:func:`running_slapd` makes a CA and a server certificate (``cryptography``), a ``slapd.conf``,
and a small directory loaded with ``slapadd``, then runs ``slapd`` in the foreground with the
``stats`` log level (every connection and BIND is logged to ``slapd.log``), serving LDAPS on one
port and plain LDAP (for StartTLS) on another. It stops the server when the block ends.

The directory: ``dc=example,dc=org`` with people ``alice`` (in llm-users and gpu-power),
``bob`` (in no group), ``carol`` (in llm-users), ``admin`` (in llm-users; the name of FleetGate's
built-in local admin) and ``cn=reader`` (the read-only search account); every password is
``<name>-pw``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import stop  # tests/ is on the path (tests/conftest.py)

from fleetgate.localnet import free_port

SUFFIX = "dc=example,dc=org"
PEOPLE = ("alice", "bob", "carol", "admin")
GROUPS = {"llm-users": ("alice", "carol", "admin"), "gpu-power": ("alice",)}
LLM_USERS = f"cn=llm-users,ou=groups,{SUFFIX}"
GPU_POWER = f"cn=gpu-power,ou=groups,{SUFFIX}"


@dataclass(frozen=True)
class Slapd:
    ldaps_url: str
    ldap_url: str  # plain, for StartTLS
    ca_file: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def available() -> bool:
    return all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists() for c in ("slapd", "slapadd"))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def make_ca(d: Path, *, hosts: tuple[str, ...] = ("localhost",),
            ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``hosts``/``ips``; returns (ca, cert, key) paths."""
    now = dt.datetime.now(dt.UTC)
    ca_key, srv_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FleetGate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    san = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
           .issuer_name(ca_name).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
           .add_extension(x509.SubjectAlternativeName(san), critical=False)
           .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(srv_key))
    paths[2].chmod(0o600)
    return paths


def _ldif() -> str:
    out = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
           "o: Example\n",
           f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n",
           f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n",
           f"dn: cn=reader,{SUFFIX}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
           "cn: reader\nuserPassword: reader-pw\n"]
    for i, u in enumerate(PEOPLE):
        out.append(f"dn: uid={u},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\n"
                   f"objectClass: posixAccount\nuid: {u}\ncn: {u.title()}\nsn: {u.title()}\n"
                   f"uidNumber: {2000 + i}\ngidNumber: 2000\nhomeDirectory: /home/{u}\n"
                   f"userPassword: {u}-pw\n")
    for i, (g, members) in enumerate(GROUPS.items()):
        out.append(f"dn: cn={g},ou=groups,{SUFFIX}\nobjectClass: posixGroup\ncn: {g}\n"
                   f"gidNumber: {3000 + i}\n" + "".join(f"memberUid: {m}\n" for m in members))
    return "\n".join(out)


@contextlib.contextmanager
def running_slapd(d: Path) -> Iterator[Slapd]:
    ca, cert, key = make_ca(d)
    db = d / "db"
    db.mkdir()
    conf = d / "slapd.conf"
    conf.write_text(f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "cn=root,{SUFFIX}"
directory {db}
access to attrs=userPassword by anonymous auth by self read by * none
access to * by users read by * none
""")
    (d / "data.ldif").write_text(_ldif())
    subprocess.run(["slapadd", "-f", str(conf), "-l", str(d / "data.ldif")], check=True,
                   capture_output=True, timeout=60)
    ldaps, plain = free_port(), free_port()
    log = d / "slapd.log"
    logf = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["slapd", "-f", str(conf), "-d", "stats",
         "-h", f"ldaps://127.0.0.1:{ldaps}/ ldap://127.0.0.1:{plain}/"],
        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "slapd starting" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("slapd did not start:\n" + log.read_text(errors="replace"))
            time.sleep(0.05)
        yield Slapd(f"ldaps://localhost:{ldaps}", f"ldap://localhost:{plain}", str(ca), log)
    finally:
        stop(proc)
        logf.close()
