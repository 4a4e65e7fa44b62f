"""Composition: build the store, model client, sandbox backend, coordinator and workers from
Settings. Only surfaces (cli.py, benchmarks, tests) call this; engines never do."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from swarm.coordinator import Coordinator
from swarm.embedded_redis import ensure_embedded_redis
from swarm.errors import ModelUnavailable
from swarm.finalize import Finalizer
from swarm.llm import LLM
from swarm.planner import Planner
from swarm.sandbox import SandboxBackend, open_backend
from swarm.settings import Endpoint, Settings
from swarm.sim_model import MODEL as SIM_MODEL
from swarm.store import Store
from swarm.worker import Worker

SIM_ROLES = ("planner", "worker", "merger")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_name(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@asynccontextmanager
async def simulator_process(settings: Settings, *, faults: str = "") -> AsyncIterator[str]:
    """Start the built-in simulator as a child process (its CPU then stays off the
    orchestrator's core); yields its /v1 base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "swarm.cli", "sim", "--port", str(port),
           "--latency-ms", str(settings.sim_latency_ms), "--seed", str(settings.sim_seed)]
    if faults:
        cmd += ["--faults", faults]
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"simulator-{port}.log"
    url = f"http://127.0.0.1:{port}"
    log_file = await anyio.to_thread.run_sync(open, log_path, "ab")
    with log_file:
        proc = await anyio.open_process(cmd, stdout=log_file, stderr=log_file)
    try:
        await _wait_healthy(proc, port, log_path)
        yield f"{url}/v1"
    finally:
        with anyio.CancelScope(shield=True):
            proc.terminate()
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _wait_healthy(proc: anyio.abc.Process, port: int, log_path: Path) -> None:
    """Ready when the port accepts connections (uvicorn binds only once the app is up)."""
    with anyio.fail_after(20):
        while proc.returncode is None:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return
    tail = (await anyio.Path(log_path).read_text(errors="replace"))[-300:].strip()
    raise ModelUnavailable(f"the simulator did not start: {tail}")


def sim_endpoints(base_url: str) -> dict[str, Endpoint]:
    return {role: Endpoint(base_url=base_url, model=SIM_MODEL, context_window=128_000,
                           max_concurrency=2048, timeout_s=30)
            for role in SIM_ROLES}


async def connect_store(settings: Settings) -> Store:
    url = settings.redis_url or await ensure_embedded_redis(settings)
    return await Store.connect(url, settings)


async def pick_sandboxes(settings: Settings, wanted: str) -> SandboxBackend:
    """Docker when an engine answers (or when asked for); else the local backend, loudly.
    `async with` the result: a Docker backend keeps its warm pool inside that block."""
    chosen = settings if wanted == "auto" else settings.model_copy(update={"sandbox": wanted})
    return await open_backend(chosen, pool_size=settings.sandbox_pool_size)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    llm: LLM
    sandboxes: SandboxBackend
    simulated: bool

    def coordinator(self) -> Coordinator:
        planner = Planner(self.llm, max_nodes=self.settings.max_nodes)
        finalizer = Finalizer(self.store, self.llm, self.settings, sandboxes=self.sandboxes,
                              simulated=self.simulated)
        return Coordinator(self.store, planner, finalizer, self.settings,
                           process_name("coordinator"))

    def worker(self, slots: int) -> Worker:
        return Worker(self.store, self.llm, self.sandboxes, self.settings, slots=slots,
                      name=process_name("worker"))


@asynccontextmanager
async def open_runtime(settings: Settings, *, simulate: bool = False, sandbox: str = "auto",
                       faults: str = "") -> AsyncIterator[Runtime]:
    """Everything a process needs, torn down in reverse on exit."""
    async with AsyncExitStack() as stack:
        store = await connect_store(settings)
        stack.push_async_callback(store.close)
        sandboxes = await stack.enter_async_context(await pick_sandboxes(settings, sandbox))
        if simulate or not settings.endpoints:
            url = await stack.enter_async_context(simulator_process(settings, faults=faults))
            endpoints = sim_endpoints(url)
        else:
            endpoints = settings.endpoints
        llm = LLM(endpoints, on_event=store.emit)
        stack.push_async_callback(llm.aclose)
        # A simulator someone else serves (docker-compose.yml's) is simulated output too.
        simulated = all(e.model == SIM_MODEL for e in endpoints.values())
        yield Runtime(settings, store, llm, sandboxes, simulated=simulated)


async def run_in_process(rt: Runtime, run_id: str, *, slots: int,
                         interrupt: anyio.Event | None = None) -> bool:
    """Coordinator and a worker pool in one process, still talking through Redis.

    Setting `interrupt` stops gracefully: the coordinator lets go of the run (its lease is
    released at once, so `swarm resume` need not wait for it to expire), the agents finish
    the model call in flight, checkpoint it and hand their jobs back. Returns False when
    that happened, True when the run reached a terminal status."""
    stop = anyio.Event()
    interrupted = False
    lead_scope, watch_scope = anyio.CancelScope(), anyio.CancelScope()

    async def watch(event: anyio.Event) -> None:
        nonlocal interrupted
        with watch_scope:
            await event.wait()
            interrupted = True
            lead_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(rt.worker(slots).serve, stop)
        if interrupt is not None:
            tg.start_soon(watch, interrupt)
        try:
            with lead_scope:
                await rt.coordinator().lead(run_id)
        finally:
            watch_scope.cancel()
            stop.set()  # the worker drains: steps in flight end, their jobs go back
    return not interrupted


__all__ = ["Runtime", "open_runtime", "run_in_process"]
