"""``fleetgate sim``: run the OpenAI-compatible engine simulator (a stand-in for vLLM, not a model).

A thin layer: flags become one :class:`~fleetgate.sim.options.SimOptions`, and
:func:`fleetgate.sim.server.run` serves it. Bad flag values fail before anything listens.
"""

from __future__ import annotations

import sys

import click

from fleetgate.sim.options import SimOptions

_EPILOG = """\b
Examples:
  fleetgate sim --port 8100 --model demo
  fleetgate sim --port 8100 --model demo --ttft-ms 0 --tokens-per-s 0    # instant answers
  fleetgate sim --port 8100 --model demo --startup-delay-s 5            # slow "weight loading"
  fleetgate sim --port 8100 --model demo --api-key upstream-secret
  fleetgate sim --port 8100 --model demo --fail-mid-stream-after 3      # cut streams
  fleetgate sim --port 8100 --model demo --crash-after-requests 10      # exit 3 after 10

\b
Besides the OpenAI routes it serves GET /health, GET /sim/stats, GET /sim/last-request
and POST /sim/reset. See docs/simulator.md.
"""


@click.command(
    "sim",
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option("--port", type=int, default=8100, help="TCP port (0 = any free port).")
@click.option("--host", default="127.0.0.1", help="Interface to bind.")
@click.option(
    "--model",
    "--served-model-name",
    "models",
    multiple=True,
    default=("sim-model",),
    help="Served model name; repeat to serve aliases (the first is the primary).",
)
@click.option("--ttft-ms", type=float, default=50.0, help="Delay before the first token, in ms.")
@click.option(
    "--tokens-per-s",
    type=float,
    default=50.0,
    help="Token rate; 0 or negative = as fast as possible.",
)
@click.option(
    "--startup-delay-s", type=float, default=0.0, help="Sleep this long before binding the port."
)
@click.option("--embedding-dim", type=int, default=16, help="Length of embedding vectors.")
@click.option(
    "--api-key",
    envvar="FLEETGATE_SIM_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1/* (like vLLM's --api-key).",
)
@click.option(
    "--crash-after-requests",
    type=int,
    default=None,
    help="Exit with status 3 once N inference requests have finished.",
)
@click.option(
    "--crash-probability",
    type=float,
    default=0.0,
    help="Each inference request exits the process (status 3) with this probability.",
)
@click.option("--seed", type=int, default=None, help="Seed for --crash-probability.")
@click.option("--hang-on-start", is_flag=True, help="Never bind the port (a stuck engine).")
@click.option(
    "--fail-mid-stream-after",
    type=int,
    default=None,
    help="Close the connection after N token chunks, without [DONE].",
)
@click.option("--max-model-len", type=int, default=8192, help="Reported in /v1/models only.")
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
def sim(
    port: int,
    host: str,
    models: tuple[str, ...],
    ttft_ms: float,
    tokens_per_s: float,
    startup_delay_s: float,
    embedding_dim: int,
    api_key: str | None,
    crash_after_requests: int | None,
    crash_probability: float,
    seed: int | None,
    hang_on_start: bool,
    fail_mid_stream_after: int | None,
    max_model_len: int,
    access_log: bool,
) -> None:
    """Run an OpenAI-compatible engine SIMULATOR (fake tokens, no model) for demos and tests.

    It answers /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models with
    "tok0 tok1 ..." text at a configurable pace, and can simulate slow start-up, crashes and
    broken streams.
    """
    from fleetgate.sim.server import run

    try:
        options = SimOptions(
            models=models,
            host=host,
            port=port,
            ttft_ms=ttft_ms,
            tokens_per_s=tokens_per_s,
            startup_delay_s=startup_delay_s,
            embedding_dim=embedding_dim,
            api_key=api_key,
            crash_after_requests=crash_after_requests,
            crash_probability=crash_probability,
            seed=seed,
            hang_on_start=hang_on_start,
            fail_mid_stream_after=fail_mid_stream_after,
            max_model_len=max_model_len,
            access_log=access_log,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        run(options)
    except OSError as e:  # e.g. the port is taken
        raise click.ClickException(f"cannot serve on {host}:{port}: {e}") from e
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # python -m fleetgate.cli.sim
    sim()
