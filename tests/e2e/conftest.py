"""End-to-end fixtures: a Runtime wired exactly as the CLI wires it, on the test session's
redis-server, a simulator over HTTP, and a real sandbox backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from swarm.llm import LLM
from swarm.runtime import Runtime, pick_sandboxes, sim_endpoints
from swarm.settings import Settings
from swarm.simulator import SimConfig, SimulatorThread
from swarm.store import Store

RuntimeFactory = Callable[..., Any]


@pytest.fixture
def runtime_factory(settings: Settings, redis_server: Any,
                    simulator_factory: Callable[..., SimulatorThread]) -> RuntimeFactory:
    @asynccontextmanager
    async def make(*, sandbox: str = "local", sim: SimConfig | None = None,
                   **overrides: Any) -> AsyncIterator[tuple[Runtime, SimulatorThread]]:
        cfg = (sim or SimConfig(latency_ms=5)).model_dump()
        simulator = simulator_factory(**cfg)
        s = settings.model_copy(update=overrides)
        store = await Store.connect(s.redis_url or "", s)
        await store._r.flushall()  # noqa: SLF001 - tests own this redis
        sandboxes = await pick_sandboxes(s, sandbox)
        llm = LLM(sim_endpoints(simulator.base_url), on_event=store.emit)
        try:
            yield Runtime(s, store, llm, sandboxes, simulated=True), simulator
        finally:
            await llm.aclose()
            await sandboxes.aclose()
            await store.close()

    return make
