"""swarm: a long-horizon agent swarm orchestrator."""

__version__ = "0.1.0"
