"""Config builders for the SLURM tier: models whose replicas are SLURM jobs running
``fleetgate sim``, and a gateway config that tells those jobs where to call back."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
from e2e import Fleet, Gateway

SIM_JOB = [
    sys.executable, "-c", "from fleetgate.cli.main import main; main()", "sim",
    "--host", "{host}", "--port", "{port}", "--model", "{served_name}",
]


def slurm_backend(tmp: Path, *sim_args: str, **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "type": "slurm",
        "command": [*SIM_JOB, "--ttft-ms", "0", "--tokens-per-s", "0", *sim_args],
        "callback_url": "http://127.0.0.1:1",  # replaced by gateway_doc with the real port
        "log_dir": str(tmp / "joblogs"),
        "cpus_per_task": 1,
        "mem": "1000M",
        "poll_interval_s": 2,
        "start_timeout_s": 60,
        "health_interval_s": 1,
        "stop_grace_s": 5,
    }
    b.update(over)
    return b


def slurm_model(tmp: Path, name: str, *sim_args: str, **policy: Any) -> dict[str, Any]:
    backend = slurm_backend(tmp, *sim_args, **policy.pop("backend", {}))
    return {"name": name, "backend": backend, **policy}


def gateway_doc(f: Fleet, models: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A gateway config whose SLURM jobs call back to that gateway's own port."""
    doc = f.config(models, **sections)
    url = f"http://127.0.0.1:{doc['server']['port']}"
    for m in doc["models"]:
        b = m["backend"]
        if b["type"] == "slurm" and b.get("discovery", "callback") == "callback":
            b["callback_url"] = url
    return doc


def block_node(tmp: Path, mem_mb: int = 19500) -> str:
    """A job that takes (almost) all the node's memory, so ours wait with reason Resources."""
    out = subprocess.run(
        ["sbatch", "--parsable", "--job-name=blocker", f"--mem={mem_mb}M",
         f"--output={tmp}/blocker-%j.log", "--wrap", "sleep 600"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return out.stdout.strip().split(";")[0]


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, timeout=30)


def job_ids(gw: Gateway, model: str) -> list[str]:
    return [str(r["job_id"]) for r in gw.replicas(model) if r.get("job_id")]


class Load:
    """Streaming chat requests through the official client, back to back on a few threads,
    until stopped: every outcome with its time, so a test can count failures and find gaps."""

    def __init__(self, gw: Gateway, model: str, threads: int = 3) -> None:
        self.gw, self.model = gw, model
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self) -> None:
        client: openai.OpenAI = self.gw.client(max_retries=0, timeout=30)
        while not self._stop.is_set():
            try:
                stream = client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=8,
                    stream=True,
                )
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                if not text:
                    raise AssertionError("empty stream")
                self.ok.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every failure is the result being measured
                self.failed.append((time.monotonic(), f"{type(e).__name__}: {e}"[:300]))
                time.sleep(0.2)
            time.sleep(0.05)

    def longest_gap(self, since: float = 0.0) -> float:
        """The longest stretch between two successful requests (seconds)."""
        ts = sorted(t for t in self.ok if t >= since)
        return max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0)
