"""One sub-agent end to end: the real model client over HTTP to the simulator, a real Docker
sandbox, checkpoints in a real Redis. Includes a SIGKILL of the process running the agent."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from swarm.agent import Agent, AgentFailed
from swarm.llm import LLM
from swarm.models import Claim, Job, NodeLimits, NodeSpec, Plan, RunSpec
from swarm.runtime import pick_sandboxes
from swarm.sandbox import SandboxBackend
from swarm.settings import Endpoint, Settings
from swarm.simulator import SimulatorThread
from swarm.store import Store
from tests.conftest import require
from tests.e2e.conftest import docker_engine_answers

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

RUN = "r-agent-test-01"


@pytest.fixture
async def sandboxes(settings: Settings) -> AsyncIterator[SandboxBackend]:
    require(docker_engine_answers(), "no Docker engine")
    async with await pick_sandboxes(settings, "docker") as backend:
        yield backend
        await backend.remove_run(RUN)
        # A SIGKILLed agent process (the resume test) cannot drain its warm pool: remove
        # what processes that died left in this home, as `swarm gc` would.
        await backend.gc(set())


def make_llm(sim: SimulatorThread, **endpoint: object) -> LLM:
    ep = Endpoint(base_url=sim.base_url, model="swarm-sim", timeout_s=5,
                  **endpoint)  # type: ignore[arg-type]
    return LLM({"worker": ep}, backoff_base_s=0.05, backoff_max_s=0.5)


async def queued_claim(store: Store, spec: NodeSpec, consumer: str = "w1") -> Claim:
    await queued_claim_only(store, spec)
    [claim] = await store.claim(consumer, count=1, block_ms=1000)
    return claim


async def run_agent(store: Store, llm: LLM, backend: SandboxBackend, spec: NodeSpec,
                    claim: Claim) -> tuple:
    sandbox = await backend.open(RUN, spec.id)
    agent = Agent(run=RUN, goal="test the agent", spec=spec, claim=claim, store=store,
                  llm=llm, sandbox=sandbox, inputs={})
    return await agent.run_to_end()


def workspace_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


async def test_a_node_finishes_with_its_result(store, sandboxes, simulator_factory,
                                               settings: Settings) -> None:
    sim = simulator_factory(latency_ms=5, tool_steps=4)
    llm = make_llm(sim)
    spec = NodeSpec(id="writer", title="Write notes", instructions="write two notes")
    claim = await queued_claim(store, spec)
    result, usage = await run_agent(store, llm, sandboxes, spec, claim)
    await llm.aclose()
    assert result.summary.startswith("[simulated] writer finished after 4 steps")
    assert usage.steps == 5 and usage.llm_calls == 5
    steps = await store.load_steps(RUN, "writer")
    assert [s.kind for s in steps] == ["assistant", "tools"] * 4 + ["assistant"]
    # the shell calls really ran in the container: their output is in the transcript
    shell_out = [r.content for s in steps if s.kind == "tools" for r in s.results
                 if r.name == "shell"]
    assert shell_out and all(o.startswith("[exit code 0]") for o in shell_out)
    ws = settings.workspaces_dir / RUN / "writer" / "notes"
    assert sorted(p.name for p in ws.iterdir()) == ["writer-0.md", "writer-2.md"]


async def test_twenty_percent_faults_still_finish(store, sandboxes, simulator_factory) -> None:
    sim = simulator_factory(latency_ms=5, tool_steps=6, rate_429=0.07, rate_500=0.07,
                            rate_malformed=0.06, retry_after_s=0.1, seed=3)
    llm = make_llm(sim)
    spec = NodeSpec(id="faulty", instructions="work through faults")
    claim = await queued_claim(store, spec)
    result, _usage = await run_agent(store, llm, sandboxes, spec, claim)
    await llm.aclose()
    assert "finished after 6 steps" in result.summary
    faults = sim.stats()["faults"]
    assert sum(faults.values()) > 0


async def test_loop_guard_fails_the_node_with_the_reason(store, sandboxes,
                                                         simulator_factory) -> None:
    sim = simulator_factory(latency_ms=1)
    llm = make_llm(sim)
    spec = NodeSpec(id="looper", title="Loop [sim:repeat]")
    claim = await queued_claim(store, spec)
    with pytest.raises(AgentFailed, match="loop guard"):
        await run_agent(store, llm, sandboxes, spec, claim)
    await llm.aclose()
    steps = await store.load_steps(RUN, "looper")
    warned = [r.content for s in steps if s.kind == "tools" for r in s.results]
    assert any("you have made this exact call" in c for c in warned)  # told before failing


async def test_compaction_keeps_a_long_node_going(store, sandboxes, simulator_factory) -> None:
    sim = simulator_factory(latency_ms=1, tool_steps=30)
    llm = make_llm(sim, context_window=2048)  # tiny: forces several compactions
    spec = NodeSpec(id="long", instructions="a long task", limits=NodeLimits(max_steps=40))
    claim = await queued_claim(store, spec)
    result, usage = await run_agent(store, llm, sandboxes, spec, claim)
    await llm.aclose()
    assert "finished after 30 steps" in result.summary  # the step count survived compaction
    steps = await store.load_steps(RUN, "long")
    assert steps[0].kind == "compaction"  # the stream was trimmed to its compacted form
    assert len(steps) < 30
    assert usage.steps == 31  # a summary carries the steps it replaced


AGENT_SCRIPT = textwrap.dedent("""
    import sys, anyio
    from swarm.agent import Agent
    from swarm.llm import LLM
    from swarm.models import NodeSpec
    from swarm.runtime import pick_sandboxes
    from swarm.settings import Endpoint, Settings
    from swarm.store import Store

    async def main(redis_url, home, base_url, spec_json):
        s = Settings(home=home, redis_url=redis_url)
        store = await Store.connect(redis_url, s)
        spec = NodeSpec.model_validate_json(spec_json)
        llm = LLM({"worker": Endpoint(base_url=base_url, model="swarm-sim", timeout_s=5)})
        [claim] = await store.claim("doomed", count=1, block_ms=2000)
        async with await pick_sandboxes(s, "docker") as backend:
            sandbox = await backend.open(claim.job.run, spec.id)
            await Agent(run=claim.job.run, goal="test the agent", spec=spec, claim=claim,
                        store=store, llm=llm, sandbox=sandbox, inputs={}).run_to_end()

    anyio.run(main, *sys.argv[1:])
""")


async def test_sigkill_mid_run_then_resume_repeats_at_most_one_call(
    store, sandboxes, simulator_factory, settings: Settings, tmp_path: Path
) -> None:
    sim = simulator_factory(latency_ms=60, tool_steps=8)
    spec = NodeSpec(id="victim", instructions="survive a crash")
    ws = settings.workspaces_dir / RUN / "victim"

    # The undisturbed run: what the workspace must end up as.
    llm = make_llm(sim)
    claim = await queued_claim(store, spec)
    expected_result, _ = await run_agent(store, llm, sandboxes, spec, claim)
    expected = workspace_files(ws)
    await sandboxes.remove_run(RUN, workspaces=True)
    await store._r.flushall()  # the same run and node ids again, from nothing
    sim.reset()

    # The same node in a separate process, SIGKILLed at a random step.
    await queued_claim_only(store, spec)
    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), settings.redis_url or "",
                             str(settings.home), sim.base_url, spec.model_dump_json()], env=env)
    kill_at = random.Random(11).randint(3, 12)  # records: assistant/tools, so mid-step too
    with anyio.fail_after(60):
        while len(await store.load_steps(RUN, "victim")) < kill_at:
            assert proc.poll() is None, "the agent process ended before it was killed"
            await anyio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(await store.load_steps(RUN, "victim"))

    # Resume: another worker reclaims the job and continues from the checkpoints.
    [claim] = await store.reclaim("survivor", min_idle_ms=0, count=1)
    result, _ = await run_agent(store, llm, sandboxes, spec, claim)
    await llm.aclose()
    by_step = {k: v for k, v in sim.stats()["by_step"].items()
               if k.startswith(f"{RUN}/victim/")}
    repeated = sum(v - 1 for v in by_step.values())
    assert before >= kill_at
    assert repeated <= 1, by_step
    assert result.summary == expected_result.summary
    assert workspace_files(ws) == expected


async def queued_claim_only(store: Store, spec: NodeSpec) -> None:
    """Create and queue the node, leaving the claim to another process."""
    plan = Plan(nodes=[spec])
    await store.create_run(RunSpec(goal="test the agent", plan=plan, sandbox="docker"),
                           run_id=RUN)
    await store.save_plan(RUN, plan)
    await store.init_nodes(RUN, [spec.id])
    await store.transition(RUN, spec.id, expect_attempt=0, expect_status={"pending"},
                           status="queued", attempt=1,
                           enqueue=Job(run=RUN, node=spec.id, attempt=1))
