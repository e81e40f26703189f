"""What every vLLM the tests start has in its environment, however it is started (directly, by
the gateway's local launcher, from a template or as a SLURM job): the model hub is never
reached, nothing is reported home, and the CPU KV cache is small enough for this machine."""

from __future__ import annotations

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
}
