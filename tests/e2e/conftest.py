"""End-to-end fixtures: a Runtime wired exactly as the CLI wires it, on the test session's
redis-server, a simulator over HTTP, and a real sandbox backend."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from swarm.llm import LLM
from swarm.runtime import Runtime, pick_sandboxes, sim_endpoints
from swarm.settings import Settings
from swarm.simulator import SimConfig, SimulatorThread
from swarm.store import Store
from tests.conftest import require

RuntimeFactory = Callable[..., Any]


def docker_engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def runtime_factory(settings: Settings, redis_server: Any,
                    simulator_factory: Callable[..., SimulatorThread]) -> RuntimeFactory:
    @asynccontextmanager
    async def make(*, sandbox: str = "docker", sim: SimConfig | None = None,
                   **overrides: Any) -> AsyncIterator[tuple[Runtime, SimulatorThread]]:
        cfg = (sim or SimConfig(latency_ms=5)).model_dump()
        simulator = simulator_factory(**cfg)
        # Production-like queue timings: the shared `settings` fixture's 1 s lease suits
        # queue unit tests, not hundreds of agents on two cores.
        realistic = {"lease_ttl_s": 15.0, "heartbeat_s": 2.0, "max_deliveries": 5,
                     "event_stream_maxlen": 50_000}
        s = settings.model_copy(update={**realistic, **overrides})
        store = await Store.connect(s.redis_url or "", s)
        await store._r.flushall()  # the tests own this redis
        if sandbox == "docker":
            require(docker_engine_answers(), "no Docker engine")
        llm = LLM(sim_endpoints(simulator.base_url), on_event=store.emit)
        try:
            async with await pick_sandboxes(s, sandbox) as sandboxes:
                yield Runtime(s, store, llm, sandboxes, simulated=True), simulator
        finally:
            await llm.aclose()
            await store.close()

    return make
