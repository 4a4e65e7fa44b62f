"""Chaos fixtures: the undisturbed baseline every chaos run is compared with (computed once
per session), and an in-process runtime for the targeted resume tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from swarm.llm import LLM
from swarm.runtime import Runtime, pick_sandboxes, sim_endpoints
from swarm.settings import Settings
from swarm.simulator import SimConfig, SimulatorThread
from swarm.store import Store
from tests.chaos import harness
from tests.conftest import REDIS_SERVER, require

PARTS = 200  # the acceptance runs: 200 parts and their merge node, 201 nodes
SMALL = 100  # Redis restarts and Docker sandboxes: 101 nodes


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> harness.Outcome:
    """The run every chaos run must equal: same goal, seed and run id, nothing disturbed."""
    require(REDIS_SERVER is not None, "redis-server not installed")
    return harness.undisturbed(tmp_path_factory.mktemp("baseline"), PARTS)


@pytest.fixture(scope="session")
def baseline_small(tmp_path_factory: pytest.TempPathFactory) -> harness.Outcome:
    require(REDIS_SERVER is not None, "redis-server not installed")
    return harness.undisturbed(tmp_path_factory.mktemp("baseline-small"), SMALL)


@pytest.fixture
def chaos_root(tmp_path: Path) -> Path:
    require(REDIS_SERVER is not None, "redis-server not installed")
    return tmp_path


@pytest.fixture
def runtime(settings: Settings, redis_server: Any,
            simulator_factory: Callable[..., SimulatorThread]) -> Callable[..., Any]:
    """`async with runtime(**settings) as (rt, sim)`: a Runtime on a flushed Redis, local
    sandboxes, and its own simulator."""
    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[tuple[Runtime, SimulatorThread]]:
        simulator = simulator_factory(**SimConfig(latency_ms=2).model_dump())
        s = settings.model_copy(update={"lease_ttl_s": 1.0, "heartbeat_s": 0.2, **overrides})
        store = await Store.connect(s.redis_url or "", s)
        await store._r.flushall()  # tests own this redis
        llm = LLM(sim_endpoints(simulator.base_url), on_event=store.emit)
        try:
            async with await pick_sandboxes(s, "local") as sandboxes:  # type: ignore[attr-defined]
                yield Runtime(s, store, llm, sandboxes, simulated=True), simulator
        finally:
            await llm.aclose()
            await store.close()

    return make
