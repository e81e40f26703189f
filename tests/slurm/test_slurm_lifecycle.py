"""A SLURM replica's whole life: the handover before its time limit, a gateway restart that
adopts its jobs (and cancels one it has no record of), ``down`` that cancels, and submission
over SSH to a real ``sshd``."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster import Cluster
from e2e import Fleet, until
from slurm_helpers import Load, gateway_doc, job_ids, slurm_model


def test_a_job_near_its_time_limit_hands_over_to_a_successor_with_no_gap(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    """2-minute jobs, successor submitted 60 s before the limit: traffic moves over once it
    is ready, the old job drains and is cancelled, and no request fails."""
    m = slurm_model(
        tmp_path, "m", scaling={"min_replicas": 1, "max_replicas": 1},
        backend={"time_limit": "00:02:00", "handover_before_s": 60},
    )
    gw = fleet.gateway(gateway_doc(fleet, [m]))
    until(lambda: gw.replicas("m", "ready"), 60, "the first job ready")
    first = job_ids(gw, "m")[0]
    with Load(gw, "m") as load:
        started = time.monotonic()

        def handed_over() -> bool:
            ready = [str(r["job_id"]) for r in gw.replicas("m", "ready")]
            in_queue = {j["job_id"] for j in cluster.jobs()}
            return bool(ready) and first not in ready and first not in in_queue

        until(handed_over, 150, "the successor serving and the first job gone", every_s=0.2)
        time.sleep(2)
    gap = load.longest_gap(since=started)
    print(f"\nhandover: {len(load.ok)} streaming requests ok, {len(load.failed)} failed; the "
          f"longest gap between two successful requests (3 client threads) was {gap:.2f}s")
    assert load.ok and not load.failed, load.failed[:5]
    events = [e["reason"] for r in gw.status("m")["replicas"] for e in r["events"]]
    assert any("before its time limit" in e for e in events), events
    assert gap < 5, f"a {gap:.1f}s gap in service during the handover"


def test_a_restarted_gateway_adopts_its_jobs_and_cancels_strays(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    doc = gateway_doc(fleet, [slurm_model(tmp_path, "m", scaling={"min_replicas": 1})],
                      fleet={"gateway_id": "adopt1"})
    a = fleet.gateway(doc)
    until(lambda: a.replicas("m", "ready"), 60, "ready")
    job = job_ids(a, "m")[0]
    # A job with this gateway's prefix that it has no record of (say it crashed mid-submit).
    stray = subprocess.run(
        ["sbatch", "--parsable", "--job-name=fleetgate.adopt1.m.stray", "--mem=100M",
         f"--output={tmp_path}/stray-%j.log", "--wrap", "sleep 600"],
        capture_output=True, text=True, check=True, timeout=30, env=fleet.env,
    ).stdout.strip()
    a.kill()  # no clean-up at all
    b = fleet.gateway(doc)
    until(lambda: b.replicas("m", "ready"), 30, "adopted replica ready")
    st = b.status("m")
    assert st["launches"] == 0 and job_ids(b, "m") == [job]
    assert "adopted" in st["replicas"][0]["events"][1]["reason"]
    until(lambda: stray not in {j["job_id"] for j in cluster.jobs()}, 30, "the stray cancelled")
    out = b.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].message.content
    # `down` cancels the job.
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{b.url}/v1/fleet/down", json={"model": "m"},
                      headers={"authorization": f"Bearer {b.admin_key}"})
        assert r.status_code == 200, r.text
    until(lambda: not cluster.jobs(), 30, "the job cancelled by down")


@pytest.fixture
def sshd(tmp_path: Path, cluster: Cluster) -> Iterator[dict[str, str]]:
    """A real OpenSSH server on a loopback port, with a host key and a client key made here;
    its sessions get ``SLURM_CONF``, as a login node's would have its cluster's config."""
    from fleetgate.localnet import free_port

    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n"
        f"StrictModes no\nPidFile {d}/sshd.pid\nSetEnv SLURM_CONF={cluster.conf}\n"
    )
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))  # noqa: SIM115
    try:
        until(lambda: _answers(port), 20, "sshd listening")
        yield {"host": "127.0.0.1", "port": str(port), "user": "root",
               "key_file": str(d / "id"), "known_hosts": str(d / "known_hosts")}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_submission_over_ssh_to_a_login_node(
    sshd: dict[str, str], fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    # (sshd first: it must outlive the gateway, whose shutdown cancels the job over SSH)
    submit = {"via": "ssh", **sshd, "port": int(sshd["port"])}
    m = slurm_model(tmp_path, "m", scaling={"min_replicas": 1}, backend={"submit": submit})
    # A login node whose host key doesn't match is refused, not trusted on first use.
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd['port']} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    bad = slurm_model(
        tmp_path, "spoofed", backend={"submit": {**submit, "known_hosts": str(wrong)}},
        restart={"max_restarts": 0},
    )
    gw = fleet.gateway(gateway_doc(fleet, [m, bad]))
    ready = until(lambda: (gw.replicas("m", "ready") or [None])[0], 90, "ready over SSH")
    assert ready["job_id"] in {j["job_id"] for j in cluster.jobs()}
    out = gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].message.content
    httpx.post(f"{gw.url}/v1/fleet/up", json={"model": "spoofed"},
               headers={"authorization": f"Bearer {gw.admin_key}"}, timeout=10)
    until(lambda: gw.status("spoofed")["status"] == "failed", 30, "spoofed host refused")
    assert "host key verification failed" in gw.status("spoofed")["last_failure"].lower()
