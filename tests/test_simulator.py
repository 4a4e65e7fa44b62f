"""The simulator, driven through the real openai client over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import openai
import pytest

from swarm import dag
from swarm.errors import UserError
from swarm.models import Plan
from swarm.simulator import SimConfig, SimulatorThread, parse_fault_spec, serve_simulator

pytestmark = pytest.mark.anyio
Factory = Callable[..., SimulatorThread]


def tool(name: str, **props: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {p: {"type": t} for p, t in props.items()}}}}


PLAN_TOOLS = [tool("submit_plan", nodes="array")]
ACT_TOOLS = [tool("shell", command="string"), tool("write_file", path="string", content="string"),
             tool("finish", summary="string", data="object")]


@asynccontextmanager
async def client(sim: SimulatorThread, wait_s: float = 10) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0,
                                  timeout=wait_s) as c:
        yield c


async def ask(c: openai.AsyncOpenAI, messages: list[dict[str, Any]],
              tools: list[dict[str, Any]] | None = None, run: str = "r1", node: str = "n1",
              **kw: Any) -> Any:
    params: dict[str, Any] = {"model": "anything", "messages": messages, **kw,
                              "extra_headers": {"X-Swarm-Run": run, "X-Swarm-Node": node}}
    if tools:
        params["tools"] = tools
    return await c.chat.completions.create(**params)


async def plan(sim: SimulatorThread, goal: str, *extra: dict[str, Any]) -> Plan:
    async with client(sim) as c:
        res = await ask(c, [{"role": "user", "content": goal}, *extra], PLAN_TOOLS, node="planner")
    msg = res.choices[0].message
    assert res.model == "swarm-sim" and msg.content.startswith("[simulated]")
    assert msg.tool_calls[0].function.name == "submit_plan"
    p = Plan.model_validate_json(msg.tool_calls[0].function.arguments)
    dag.validate(p, max_nodes=1000)
    return p


async def test_plan_for_n_parts(simulator: SimulatorThread) -> None:
    p = await plan(simulator, "Write a field guide to birds in 12 parts")
    ids = [n.id for n in p.nodes]
    assert ids[:2] == ["part-001", "part-002"] and len(ids) == 13
    merge = p.nodes[-1]
    assert merge.kind == "merge" and merge.role == "merger" and merge.deps == ids[:-1]
    assert all(n.deps == [] and n.kind == "agent" for n in p.nodes[:-1])


async def test_plan_for_a_list(simulator: SimulatorThread) -> None:
    p = await plan(simulator, "Compare these databases:\n- Redis\n- PostgreSQL\n1. SQLite")
    assert [n.title for n in p.nodes] == ["Redis", "PostgreSQL", "SQLite", "Merge"]
    p = await plan(simulator, "Summarise three cities: Paris, Berlin and Rome.")
    assert [n.title for n in p.nodes[:-1]] == ["Paris", "Berlin", "Rome"]
    assert p.nodes[0].id == "item-001-paris"


async def test_plan_otherwise_fans_out_and_in(simulator: SimulatorThread) -> None:
    p = await plan(simulator, "Explain how tides work")
    by = p.by_id()
    assert list(by) == ["research", "section-1", "section-2", "section-3", "merge"]
    assert by["section-2"].deps == ["research"]
    assert by["merge"].deps == ["section-1", "section-2", "section-3"]


async def test_plan_fits_a_limit_named_by_the_rejection(simulator: SimulatorThread) -> None:
    rejected: list[dict[str, Any]] = [{"role": "assistant", "content": "", "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "submit_plan", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1",
         "content": "plan invalid: plan has 51 nodes, over the limit of 8. Correct it."}]
    p = await plan(simulator, "Do it in 50 parts", *rejected)
    assert len(p.nodes) == 8


async def test_replan_keeps_nodes_and_retries_dead_ones(simulator: SimulatorThread) -> None:
    old = await plan(simulator, "Work in 3 parts")
    report = {"failed_node": "part-002", "reason": "boom", "dead": ["part-002"], "done": {},
              "plan": old.model_dump(mode="json", include={"nodes"})}
    p = await plan(simulator, "Work in 3 parts", {"role": "user", "content":
                   "REPLAN: node 'part-002' failed for good.\n" + json.dumps(report)})
    by = p.by_id()
    assert set(old.by_id()) < set(by) and "part-002-r1" in by
    assert by["merge"].deps == ["part-001", "part-002-r1", "part-003"]


async def run_agent(sim: SimulatorThread, tools: list[dict[str, Any]], node: str = "n1",
                    max_turns: int = 10) -> list[tuple[str, dict[str, Any]]]:
    """Play the agent loop: every tool 'succeeds'; returns the calls made up to finish."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Write notes on owls."}]
    calls: list[tuple[str, dict[str, Any]]] = []
    async with client(sim) as c:
        for _ in range(max_turns):
            msg = (await ask(c, messages, tools, node=node)).choices[0].message
            call = msg.tool_calls[0]
            calls.append((call.function.name, json.loads(call.function.arguments)))
            if call.function.name == "finish":
                return calls
            messages.append(msg.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "ok"})
    raise AssertionError("the simulated agent never finished")


async def test_acting_alternates_tools_then_finishes(simulator_factory: Factory) -> None:
    sim = simulator_factory(tool_steps=3)
    calls = await run_agent(sim, ACT_TOOLS)
    assert [name for name, _ in calls] == ["write_file", "shell", "write_file", "finish"]
    assert calls[0][1]["path"] == "notes/n1-0.md" and "owls" in calls[0][1]["content"]
    assert calls[1][1] == {"command": "wc -c notes/*"}
    summary, data = calls[-1][1]["summary"], calls[-1][1]["data"]
    assert summary.startswith("[simulated]") and data["node"] == "n1" and data["steps"] == 3


async def test_acting_uses_only_offered_tools(simulator: SimulatorThread) -> None:
    calls = await run_agent(simulator, [ACT_TOOLS[0], ACT_TOOLS[2]])
    assert [name for name, _ in calls] == ["shell", "shell", "finish"]


async def synthesize(sim: SimulatorThread, *inputs: str) -> str:
    text = "Merge these.\n\n" + "\n\n".join(
        f"# result {i} of {len(inputs)}\n\n{t}" for i, t in enumerate(inputs, 1))
    async with client(sim) as c:
        res = await ask(c, [{"role": "system", "content": "merge"},
                            {"role": "user", "content": text}], node="merge")
    assert res.choices[0].finish_reason == "stop" and not res.choices[0].message.tool_calls
    return str(res.choices[0].message.content)


async def test_synthesis_is_a_function_of_its_inputs(simulator: SimulatorThread) -> None:
    inputs = ["owls hunt at night", "## detail\nhawks by day", "crows"]
    a = await synthesize(simulator, *inputs)
    assert a.startswith("[simulated] Synthesis of 3 inputs:") and "owls hunt at night" in a
    assert a == await synthesize(simulator, *inputs)
    assert a != await synthesize(simulator, "owls hunt at dusk", *inputs[1:])


async def test_streaming_tool_call_and_usage(simulator: SimulatorThread) -> None:
    async with client(simulator) as c:
        stream = await ask(c, [{"role": "user", "content": "go"}], ACT_TOOLS, stream=True,
                           stream_options={"include_usage": True})
        content, args, name, usage, finish = "", "", "", None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                content += choice.delta.content or ""
                for tc in choice.delta.tool_calls or ():
                    name += tc.function.name or ""
                    args += tc.function.arguments or ""
        assert content.startswith("[simulated]") and name == "write_file" and finish == "tool_calls"
        assert json.loads(args)["path"] == "notes/n1-0.md"
        assert usage is not None and usage.completion_tokens > 0
        text = ""
        async for chunk in await ask(c, [{"role": "user", "content": "a\n\nb"}], stream=True):
            text += "".join(ch.delta.content or "" for ch in chunk.choices)
        assert text.startswith("[simulated] Synthesis of 2 inputs")


async def test_fault_429_carries_retry_after(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_429=1.0, retry_after_s=0.5)
    async with client(sim) as c:
        with pytest.raises(openai.RateLimitError) as err:
            await ask(c, [{"role": "user", "content": "hi"}])
    assert err.value.response.headers["retry-after"] == "0.5"
    assert sim.stats()["faults"]["429"] == 1


async def test_fault_500(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_500=1.0)
    async with client(sim) as c:
        with pytest.raises(openai.InternalServerError):
            await ask(c, [{"role": "user", "content": "hi"}])


async def test_fault_hang_outlasts_client_timeout(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_hang=1.0)
    start = time.monotonic()
    async with client(sim, wait_s=0.3) as c:
        with pytest.raises(openai.APITimeoutError):
            await ask(c, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5
    for _ in range(100):  # the server notices the client left and frees the request
        if not sim.stats()["in_flight"]:
            break
        await anyio.sleep(0.05)
    assert sim.stats()["in_flight"] == 0
    assert sim.stats()["faults"]["hang"] == 1


async def test_fault_garbage_body(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_garbage=1.0)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        assert raw.http_response.text.startswith("<html>")


async def test_fault_malformed_arguments_then_repair(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_malformed=1.0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    async with client(sim) as c:
        msg = (await ask(c, messages, ACT_TOOLS)).choices[0].message
        call = msg.tool_calls[0]
        with pytest.raises(json.JSONDecodeError):
            json.loads(call.function.arguments)
        messages += [msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id,
                     "content": "error: arguments are not valid JSON"}]
        repaired = (await ask(c, messages, ACT_TOOLS)).choices[0].message.tool_calls[0]
    json.loads(repaired.function.arguments)
    assert sim.stats()["faults"]["malformed"] == 1


async def test_fault_unknown_tool(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_unknown_tool=1.0)
    async with client(sim) as c:
        msg = (await ask(c, [{"role": "user", "content": "go"}], ACT_TOOLS)).choices[0].message
    offered = {t["function"]["name"] for t in ACT_TOOLS}
    assert msg.tool_calls[0].function.name not in offered
    assert sim.stats()["faults"]["unknown_tool"] == 1


async def test_a_retried_request_eventually_succeeds(simulator_factory: Factory) -> None:
    sim = simulator_factory(rate_429=0.5, rate_500=0.3, retry_after_s=0)
    async with client(sim) as c:
        failures = 0
        while True:
            try:
                await ask(c, [{"role": "user", "content": "hi"}], node="retry")
                break
            except (openai.RateLimitError, openai.InternalServerError):
                failures += 1
                assert failures < 40
    stats = sim.stats()
    assert failures >= 1 and stats["by_step"]["r1/retry/0"] == failures + 1
    assert stats["faults"]["429"] + stats["faults"]["500"] == failures


async def transcript_outputs(sim: SimulatorThread) -> list[str]:
    """Many nodes at once, in whatever order requests arrive; every output and fault."""
    results: dict[str, str] = {}

    async def one(node: str) -> None:
        async with client(sim) as c:
            for _ in range(20):
                try:
                    res = await ask(c, [{"role": "user", "content": f"task {node}"}], ACT_TOOLS,
                                    node=node)
                    results[node] = res.choices[0].message.model_dump_json(include={"tool_calls"})
                    return
                except openai.APIStatusError as e:
                    results[node] = results.get(node, "") + str(e.status_code)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, f"node-{i}")
    return [results[k] for k in sorted(results)]


async def test_same_seed_same_outputs_under_concurrency(simulator_factory: Factory) -> None:
    cfg = {"seed": 7, "rate_429": 0.2, "rate_malformed": 0.3, "retry_after_s": 0}
    first = await transcript_outputs(simulator_factory(**cfg))
    assert first == await transcript_outputs(simulator_factory(**cfg))
    assert first != await transcript_outputs(simulator_factory(**{**cfg, "seed": 8}))


async def test_stats_count_by_run_node_and_step(simulator: SimulatorThread) -> None:
    async with client(simulator) as c:
        await ask(c, [{"role": "user", "content": "x"}], run="a", node="n")
        await ask(c, [{"role": "user", "content": "x"}], run="a", node="n")
        await ask(c, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                      {"role": "user", "content": "z"}], run="a", node="n")
        await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    stats = simulator.stats()
    assert stats["total"] == 4
    assert stats["calls"] == {"a/n": 3, "-/-": 1}
    assert stats["by_step"] == {"a/n/0": 2, "a/n/1": 1, "-/-/0": 1}
    simulator.reset()
    assert simulator.stats()["total"] == 0


async def test_reasoning_is_emitted_and_required_back(simulator_factory: Factory) -> None:
    sim = simulator_factory(reasoning=True)
    async with client(sim) as c:
        msg = (await ask(c, [{"role": "user", "content": "go"}], ACT_TOOLS)).choices[0].message
        kept = msg.model_dump(exclude_none=True)
        assert kept["reasoning_content"].startswith("[simulated]")
        result = {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "ok"}
        await ask(c, [{"role": "user", "content": "go"}, kept, result], ACT_TOOLS)
        kept.pop("reasoning_content")
        with pytest.raises(openai.BadRequestError):
            await ask(c, [{"role": "user", "content": "go"}, kept, result], ACT_TOOLS)


async def test_models_and_health(simulator: SimulatorThread) -> None:
    async with client(simulator) as c:
        models = await c.models.list()
        assert [m.id for m in models.data] == ["swarm-sim"]
        health = await c.get(f"{simulator.url}/healthz", cast_to=dict)
        assert health["simulated"] is True


async def test_serve_in_process_and_stop_with_a_request_hanging() -> None:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_simulator, SimConfig(rate_hang=1.0, hang_s=600))
            url = f"http://127.0.0.1:{port}/v1"
            async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as c:

                async def hang() -> None:
                    with pytest.raises(openai.APIError):
                        await c.chat.completions.create(
                            model="m", messages=[{"role": "user", "content": "hi"}])

                tg.start_soon(hang)
                await anyio.sleep(0.3)
                tg.cancel_scope.cancel()


def test_fault_spec() -> None:
    assert parse_fault_spec("429=0.1, 500=0.05,hang=0.01,malformed=0.05,unknown_tool=0.05") == {
        "rate_429": 0.1, "rate_500": 0.05, "rate_hang": 0.01, "rate_malformed": 0.05,
        "rate_unknown_tool": 0.05}
    cfg = SimConfig.from_spec("429=0.2,retry_after=2", seed=3, latency_ms=10)
    assert (cfg.rate_429, cfg.retry_after_s, cfg.seed) == (0.2, 2.0, 3)
    for bad in ("429", "teapot=0.1", "500=lots", "429=0.7,500=0.6"):
        with pytest.raises(UserError):
            SimConfig.from_spec(bad)
