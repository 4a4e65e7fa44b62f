"""What resume relies on from Redis: AOF persistence and no eviction. `swarm doctor` says so
when the configured Redis has neither; the embedded one and docker-compose's have both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.doctor import check_redis
from swarm.settings import Settings

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


async def test_doctor_warns_about_no_aof_and_eviction(redis_factory: Any, tmp_path: Path
                                                      ) -> None:
    server = redis_factory()
    settings = Settings(home=tmp_path, redis_url=server.url)
    rows = {c.name: c for c in await check_redis(settings)}
    assert rows["redis persistence"].level == "OK" and rows["redis eviction"].level == "OK"

    server.command("CONFIG", "SET", "appendonly", "no")
    server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    rows = {c.name: c for c in await check_redis(settings)}
    assert rows["redis"].level == "OK"
    assert rows["redis persistence"].level == "WARN"
    assert "AOF is off" in rows["redis persistence"].detail
    assert rows["redis eviction"].level == "WARN"
    assert "allkeys-lru" in rows["redis eviction"].detail


def test_compose_redis_persists_and_never_evicts() -> None:
    # (tests/e2e/test_compose_stack.py asks the running service for the same settings)
    redis = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]
    assert redis["entrypoint"] == ["redis-server"]
    command = redis["command"]
    flags = dict(zip(command[0::2], command[1::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert flags["--appendfsync"] in ("everysec", "always")
