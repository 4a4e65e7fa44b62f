"""llm.LLM against the real simulator over HTTP: retries, limits, usage, provider fields."""

from __future__ import annotations

import email.utils
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from swarm.errors import ModelError, ModelUnavailable
from swarm.llm import LLM, TokenBucket, retry_after_s
from swarm.models import Event, ModelWaiting
from swarm.settings import Endpoint
from swarm.simulator import SimulatorThread

pytestmark = pytest.mark.anyio
Factory = Callable[..., SimulatorThread]

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("shell", "write_file", "finish")]
TASK = [{"role": "system", "content": "You are a sub-agent."},
        {"role": "user", "content": "Write notes on owls."}]


def endpoint(sim: SimulatorThread | str, **kw: Any) -> Endpoint:
    url = sim if isinstance(sim, str) else sim.base_url
    return Endpoint(base_url=url, model="sim-model", **{"timeout_s": 5.0, **kw})


@asynccontextmanager
async def open_llm(ep: Endpoint, events: list[Event] | None = None,
                   **kw: Any) -> AsyncIterator[LLM]:
    async def record(event: Event) -> None:
        if events is not None:
            events.append(event)

    llm = LLM({"default": ep}, on_event=record, backoff_base_s=0.01, **kw)
    try:
        yield llm
    finally:
        await llm.aclose()


async def test_chat_returns_tool_calls_usage_and_cost(simulator: SimulatorThread) -> None:
    ep = endpoint(simulator, price_in_per_m=1.0, price_out_per_m=3.2)
    async with open_llm(ep) as llm:
        assert llm.endpoint_for("worker") == ep  # unlisted roles fall back to "default"
        res = await llm.chat("worker", TASK, TOOLS, run="run-1", node="n1")
    assert res.model == "swarm-sim" and res.finish_reason == "tool_calls"
    assert [c.name for c in res.tool_calls] == ["write_file"]
    assert res.message["role"] == "assistant"
    assert res.message["tool_calls"][0]["id"] == res.tool_calls[0].id
    assert res.content is not None and res.content.startswith("[simulated]")
    u = res.usage
    assert u.llm_calls == 1 and u.tokens_in > 0 and u.tokens_out > 0
    assert u.cost_usd == pytest.approx(u.tokens_in * 1.0 / 1e6 + u.tokens_out * 3.2 / 1e6)
    assert simulator.stats()["calls"] == {"run-1/n1": 1}  # the X-Swarm-* headers arrived


async def test_injected_faults_are_retried_until_success(simulator_factory: Factory) -> None:
    sim = simulator_factory(seed=1, rate_429=0.1, rate_500=0.1, retry_after_s=0.01)
    events: list[Event] = []
    async with open_llm(endpoint(sim, max_retries=8), events) as llm:
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(partial(llm.chat, "worker", TASK, TOOLS, run="r", node=f"n{i}"))
    stats = sim.stats()
    faults = stats["faults"]["429"] + stats["faults"]["500"]
    assert faults > 0 and stats["total"] == 30 + faults
    assert len(events) == faults and all(isinstance(e, ModelWaiting) for e in events)
    assert {e.node for e in events if isinstance(e, ModelWaiting)} <= {f"n{i}" for i in range(30)}


async def test_retry_after_is_honoured(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_429=1.0, fault_attempts=1, retry_after_s=0.4)
    events: list[Event] = []
    async with open_llm(endpoint(sim), events) as llm:
        start = time.monotonic()
        await llm.chat("worker", TASK, TOOLS, run="r", node="n")
        assert time.monotonic() - start >= 0.4
    assert len(events) == 1 and isinstance(events[0], ModelWaiting)
    assert events[0].wait_s == 0.4 and "429" in events[0].reason


def test_retry_after_header_forms() -> None:
    assert retry_after_s({"Retry-After": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_s({"Retry-After": date}, now=1_000_000) == pytest.approx(30)
    assert retry_after_s({"Retry-After": "soon"}) is None
    assert retry_after_s({}) is None
    assert retry_after_s({"Retry-After": "86400"}) == 900.0  # parks, but not for a day


async def test_a_hang_times_out_and_is_retried(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_hang=1.0, fault_attempts=1)
    async with open_llm(endpoint(sim, timeout_s=0.3)) as llm:
        with anyio.fail_after(5):
            res = await llm.chat("worker", TASK, TOOLS, run="r", node="n")
    assert res.tool_calls
    stats = sim.stats()
    assert stats["faults"]["hang"] == 1 and stats["by_step"]["r/n/0"] == 2


async def test_exhausted_retries_raise_model_unavailable(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_500=1.0)
    async with open_llm(endpoint(sim, max_retries=2)) as llm:
        with pytest.raises(ModelUnavailable) as err:
            await llm.chat("worker", TASK, TOOLS, run="r", node="n")
    assert "HTTP 500" in str(err.value) and "\n" not in str(err.value)
    assert sim.stats()["total"] == 3


async def test_a_rejected_request_is_a_model_error_without_retry(
    simulator_factory: Factory,
) -> None:
    sim = simulator_factory(reasoning=True)  # a strict provider: 400 without reasoning_content
    transcript = [*TASK, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]
    async with open_llm(endpoint(sim)) as llm:
        with pytest.raises(ModelError) as err:
            await llm.chat("worker", transcript, TOOLS, run="r", node="n")
    assert "HTTP 400" in str(err.value) and sim.stats()["total"] == 1


async def test_garbage_responses_end_in_model_error(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_garbage=1.0)
    async with open_llm(endpoint(sim, max_retries=1)) as llm:
        with pytest.raises(ModelError) as err:
            await llm.chat("worker", TASK, TOOLS, run="r", node="n")
    assert "no choices" in str(err.value)  # the second answer; the first was HTML
    assert sim.stats()["total"] == 2


async def test_concurrency_limit_bounds_calls_in_flight(simulator_factory: Factory) -> None:
    sim = simulator_factory(latency_ms=100)
    async with open_llm(endpoint(sim, max_concurrency=3)) as llm:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(partial(llm.chat, "worker", TASK, None, run="r", node=f"n{i}"))
    stats = sim.stats()
    assert stats["total"] == 12 and stats["max_in_flight"] == 3


async def test_reasoning_content_round_trips(simulator_factory: Factory) -> None:
    sim = simulator_factory(reasoning=True)
    async with open_llm(endpoint(sim)) as llm:
        first = await llm.chat("worker", TASK, TOOLS, run="r", node="n")
        assert first.message["reasoning_content"].startswith("[simulated]")
        call = first.tool_calls[0]
        transcript = [*TASK, first.message,
                      {"role": "tool", "tool_call_id": call.id, "content": "ok"}]
        second = await llm.chat("worker", transcript, TOOLS, run="r", node="n")
    assert second.tool_calls[0].name == "shell"


async def test_unreachable_endpoint_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with open_llm(endpoint(f"http://127.0.0.1:{port}/v1", max_retries=2)) as llm:
        start = time.monotonic()
        with pytest.raises(ModelUnavailable) as err:
            await llm.chat("worker", TASK, TOOLS, run="r")
    assert time.monotonic() - start < 3
    assert "connection failed" in str(err.value)


async def test_token_bucket_waits_and_settles() -> None:
    bucket = TokenBucket(per_min=600, burst_s=1)  # 10 a second, bursting to 10
    start = time.monotonic()
    assert await bucket.take(50) == 10  # more than the bucket holds: goes alone
    await bucket.take(3)
    assert time.monotonic() - start >= 0.25
    bucket.settle(taken=0, actual=3)  # a call used more than estimated: the bucket owes it
    start = time.monotonic()
    await bucket.take(1)
    assert time.monotonic() - start >= 0.3


async def test_request_rate_limit_spaces_calls(simulator: SimulatorThread) -> None:
    # 240 a minute is 4 a second; a half-second burst lets 2 through at once.
    async with open_llm(endpoint(simulator, requests_per_min=240), rate_burst_s=0.5) as llm:
        start = time.monotonic()
        for _ in range(5):
            await llm.chat("worker", TASK, None, run="r")
    assert time.monotonic() - start >= 0.7


async def test_api_key_comes_from_the_named_variable_and_is_redacted(
    simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARM_TEST_KEY", "sk-very-secret-key-123")
    async with open_llm(endpoint(simulator, api_key_env="SWARM_TEST_KEY")) as llm:
        await llm.chat("worker", TASK, None, run="r")
        state = llm._state("worker")
        assert state.clients[0].api_key == "sk-very-secret-key-123"
        assert "secret" not in state.redact("bad key sk-very-secret-key-123 given")
