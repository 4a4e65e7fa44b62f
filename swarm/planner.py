"""The planner: a goal becomes a DAG through a `submit_plan` tool whose schema is the plan.

An invalid plan goes back to the model with the error, a bounded number of times. Replanning
revises only the part of the plan that has not started: finished work is never redone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from swarm import dag
from swarm.chat import ChatModel
from swarm.errors import PlanInvalid
from swarm.models import NodeState, Plan, Usage
from swarm.transcript import calls_of

SUBMIT_PLAN = "submit_plan"
MAX_PLAN_ATTEMPTS = 3
REPLAN_MARK = "REPLAN"  # the simulator recognises revision requests by this word

PLANNER_PROMPT = """You are the coordinator of a swarm of sub-agents. Decompose the user's
goal into a DAG of subtasks that can run in parallel where possible, and submit it with the
`submit_plan` tool. Each node: a short unique `id`, a `title`, precise `instructions` a
sub-agent can follow alone, `deps` (ids it needs results from), `kind` (`agent` for LLM work,
`command` for a plain shell command, `merge` to combine results, `swarm` for a large part
that needs its own sub-swarm), and `handoff` (what it must hand on). Prefer many small
independent nodes over a few big ones. End with one `merge` node that depends on the leaves."""


def plan_tool() -> dict[str, Any]:
    schema = Plan.model_json_schema()
    schema.pop("title", None)
    for prop in ("revision",):
        schema.get("properties", {}).pop(prop, None)
    return {
        "type": "function",
        "function": {
            "name": SUBMIT_PLAN,
            "description": "Submit the plan: the DAG of nodes that together reach the goal.",
            "parameters": schema,
        },
    }


class Planner:
    def __init__(self, llm: ChatModel, *, max_nodes: int, model: str | None = None) -> None:
        self.llm, self.max_nodes, self.model = llm, max_nodes, model
        self.usage = Usage()

    async def plan(self, run: str, goal: str) -> Plan:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": PLANNER_PROMPT},
            {"role": "user", "content": goal},
        ]
        return await self._ask(run, messages, check=lambda p: None)

    async def replan(self, run: str, goal: str, plan: Plan, states: Mapping[str, NodeState],
                     failed: str, reason: str) -> Plan:
        """A revised plan: started nodes kept as they are, the rest as the planner revises it."""
        started = {n.id for n in plan.nodes if states[n.id].status != "pending"}
        dead = {nid for nid, s in states.items() if s.status == "dead"}
        report = {
            "failed_node": failed,
            "reason": reason,
            "dead": sorted(dead),
            "done": {nid: (s.result.summary[:300] if s.result else "")
                     for nid, s in states.items() if s.status == "done"},
            "plan": plan.model_dump(mode="json", include={"nodes"}),
        }
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": PLANNER_PROMPT},
            {"role": "user", "content": goal},
            {"role": "user", "content": (
                f"{REPLAN_MARK}: node {failed!r} failed for good ({reason}). Submit the revised "
                "plan: keep every node that already started unchanged, do not depend on a dead "
                "node, and revise the nodes that have not started so the goal is still reached "
                "with what is known.\n" + json.dumps(report))},
        ]

        def check(new: Plan) -> None:
            ids = {n.id for n in new.nodes}
            missing = sorted(started - ids)
            if missing:
                raise PlanInvalid(f"revised plan drops started nodes: {', '.join(missing)}")
            for node in new.nodes:
                if node.id not in started and dead & set(node.deps):
                    raise PlanInvalid(f"node {node.id!r} depends on dead node(s) "
                                      f"{', '.join(sorted(dead & set(node.deps)))}")

        revised = await self._ask(run, messages, check=check)
        # Started nodes keep their original spec whatever the planner wrote for them.
        old = plan.by_id()
        nodes = [old[n.id] if n.id in started else n for n in revised.nodes]
        return Plan(nodes=nodes, revision=plan.revision + 1, note=f"revised after {failed} failed")

    async def _ask(self, run: str, messages: list[dict[str, Any]],
                   check: Callable[[Plan], None]) -> Plan:
        error = "no attempt made"
        for _ in range(MAX_PLAN_ATTEMPTS):
            res = await self.llm.chat("planner", messages, [plan_tool()], run=run,
                                      node="planner", model=self.model)
            self.usage = self.usage + res.usage
            messages.append(res.message)
            try:
                plan = self._parse(res.message)
                dag.validate(plan, max_nodes=self.max_nodes)
                check(plan)
                return plan
            except PlanInvalid as exc:
                error = str(exc)
            # Every tool call needs its answer; a turn without calls gets a user message.
            calls = calls_of(res.message)
            messages.extend({"role": "tool", "tool_call_id": call.id,
                             "content": f"plan invalid: {error}. Submit a corrected plan."}
                            for call in calls)
            if not calls:
                messages.append({"role": "user", "content": f"Plan rejected: {error}. "
                                 "Call submit_plan with a corrected plan."})
        raise PlanInvalid(f"planner gave no valid plan after {MAX_PLAN_ATTEMPTS} tries: {error}")

    @staticmethod
    def _parse(message: dict[str, Any]) -> Plan:
        calls = [c for c in calls_of(message) if c.name == SUBMIT_PLAN]
        if not calls:
            raise PlanInvalid("the planner did not call submit_plan")
        try:
            raw = json.loads(calls[0].arguments)
            raw.pop("revision", None)
            return Plan.model_validate(raw)
        except json.JSONDecodeError as exc:
            raise PlanInvalid(f"submit_plan arguments are not JSON: {exc.msg}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PlanInvalid(f"plan does not fit the schema at {where}: {first['msg']}") from None
