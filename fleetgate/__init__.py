"""FleetGate: an authenticating, OpenAI-compatible gateway for fleets of vLLM servers."""

__version__ = "0.1.0"
