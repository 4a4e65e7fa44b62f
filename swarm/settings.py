"""Settings, read once by the CLI (the composition root) and passed down.

Environment variables use the SWARM_ prefix; nested fields use `__`, e.g.
SWARM_ENDPOINTS__WORKER__BASE_URL=http://localhost:8000/v1. Nothing else reads os.environ,
except llm.py resolving an endpoint's API key from the variable it names (so the key itself
never sits in settings, a log, or a sandbox).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Endpoint(BaseModel):
    """One OpenAI-compatible endpoint used for a role."""

    base_url: str
    model: str
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable holding the API key."
    )
    max_concurrency: int = Field(default=64, ge=1)
    requests_per_min: float | None = Field(default=None, gt=0)
    tokens_per_min: float | None = Field(default=None, gt=0)
    price_in_per_m: float = Field(default=0.0, ge=0, description="USD per million input tokens")
    price_out_per_m: float = Field(default=0.0, ge=0, description="USD per million output tokens")
    context_window: int = Field(default=128_000, ge=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SWARM_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".swarm")

    # Redis. Unset: swarm starts (or reuses) its own redis-server under `home`.
    redis_url: str | None = None
    redis_appendfsync: Literal["everysec", "always"] = "everysec"
    redis_max_connections: int = Field(default=64, ge=1)
    # How long a running process rides out a Redis restart (retrying) before it gives up.
    redis_outage_s: float = Field(default=10.0, ge=0)
    # Retention: a finished run is deleted from Redis this long after it was exported
    # (`swarm export`); 0 keeps it until deleted by hand.
    finished_run_ttl_s: float = Field(default=7 * 24 * 3600.0, ge=0)

    # Work queue semantics.
    lease_ttl_s: float = Field(default=30.0, gt=0)
    heartbeat_s: float = Field(default=5.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
    event_stream_maxlen: int = Field(default=20_000, ge=100)

    # Plans and runs.
    max_nodes: int = Field(default=1000, ge=1)
    max_depth: int = Field(default=2, ge=0)
    max_agents: int = Field(default=64, ge=1)

    # Models: role -> endpoint. Empty means "use the built-in simulator".
    endpoints: dict[str, Endpoint] = Field(default_factory=dict)

    # Sandboxes.
    sandbox: Literal["docker", "local", "auto"] = "auto"
    sandbox_image: str = "swarm-sandbox:latest"
    docker_threads: int = Field(default=16, ge=1)
    sandbox_pool_size: int = Field(default=8, ge=0, description="warm containers kept ready")

    # Simulator defaults (used when no endpoint is configured or --simulate).
    sim_latency_ms: int = Field(default=50, ge=0)
    sim_seed: int = 0

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def workspaces_dir(self) -> Path:
        return self.home / "workspaces"
