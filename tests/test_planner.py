"""The planner through the real model client and the simulator over HTTP."""

from __future__ import annotations

import pytest

from swarm import dag
from swarm.errors import PlanInvalid
from swarm.llm import LLM
from swarm.models import NodeResult, NodeSpec, NodeState, Plan
from swarm.planner import Planner
from swarm.settings import Endpoint
from swarm.simulator import SimulatorThread

pytestmark = pytest.mark.anyio


def planner_for(simulator: SimulatorThread, max_nodes: int) -> tuple[Planner, LLM]:
    llm = LLM({"planner": Endpoint(base_url=simulator.base_url, model="swarm-sim", timeout_s=5)})
    return Planner(llm, max_nodes=max_nodes), llm


async def test_goal_with_n_parts_becomes_a_fan_out_fan_in_dag(simulator) -> None:
    planner, llm = planner_for(simulator, 100)
    plan = await planner.plan("r-plan", "Write a guide in 7 parts")
    await llm.aclose()
    assert len(plan.nodes) == 8
    merge = plan.by_id()["merge"]
    assert merge.kind == "merge" and len(merge.deps) == 7
    assert dag.depths(plan)["merge"] == 1
    assert planner.usage.llm_calls == 1


async def test_invalid_plan_goes_back_with_the_error_and_is_corrected(simulator) -> None:
    planner, llm = planner_for(simulator, 10)  # 30 parts + merge is over the limit
    plan = await planner.plan("r-plan", "Write a guide in 30 parts")
    await llm.aclose()
    assert len(plan.nodes) <= 10
    assert planner.usage.llm_calls == 2  # the rejected plan, then the corrected one
    assert simulator.stats()["calls"]["r-plan/planner"] == 2


async def test_a_planner_that_never_fits_fails_with_the_reason(simulator) -> None:
    planner, llm = planner_for(simulator, 1)  # no fan-in plan fits in one node
    with pytest.raises(PlanInvalid, match=r"no valid plan after 3 tries.*over the limit of 1"):
        await planner.plan("r-plan", "Write a guide in 4 parts")
    await llm.aclose()


async def test_replan_keeps_started_nodes_and_routes_around_the_dead_one(simulator) -> None:
    planner, llm = planner_for(simulator, 100)
    plan = await planner.plan("r-plan", "Check these:\n- alpha\n- beta\n- gamma")
    ids = [n.id for n in plan.nodes]
    alpha, beta, gamma = ids[:3]
    states = {
        alpha: NodeState(id=alpha, status="done", attempt=1, result=NodeResult(summary="ok")),
        beta: NodeState(id=beta, status="dead", attempt=3, error="boom"),
        gamma: NodeState(id=gamma, status="running", attempt=1),
        "merge": NodeState(id="merge"),
    }
    revised = await planner.replan("r-plan", "Check these", plan, states, beta, "boom")
    await llm.aclose()
    assert revised.revision == plan.revision + 1
    by_id = revised.by_id()
    assert by_id[alpha] == plan.by_id()[alpha] and by_id[gamma] == plan.by_id()[gamma]
    assert beta not in by_id["merge"].deps  # never waits on the dead node's missing output
    assert any(n.id.startswith(beta) and n.id != beta for n in revised.nodes)
    dag.validate(revised, max_nodes=100)


def test_plan_tool_schema_is_the_plan_model() -> None:
    from swarm.planner import plan_tool

    params = plan_tool()["function"]["parameters"]
    assert "nodes" in params["properties"]
    Plan.model_validate({"nodes": [NodeSpec(id="a").model_dump()]})
