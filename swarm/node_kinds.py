"""Nodes that are not LLM agents: `command` (a shell command in a sandbox) and `merge`
(a synthesis of the node's dependencies' results by the merger role)."""

from __future__ import annotations

from typing import Any

from swarm.errors import SandboxError
from swarm.merge import TextMerger
from swarm.models import NodeResult, NodeSpec, RunRecord, Usage
from swarm.sandbox.base import Sandbox
from swarm.tools import cap

COMMAND_OUTPUT_CAP = 16_000


async def run_command_node(sandbox: Sandbox, spec: NodeSpec) -> tuple[NodeResult, Usage]:
    assert spec.command is not None  # dag.validate guarantees it
    res = await sandbox.exec(spec.command, timeout_s=spec.limits.exec_timeout_s,
                             output_cap=COMMAND_OUTPUT_CAP)
    status = "timed out" if res.timed_out else f"exit code {res.exit_code}"
    if spec.check and (res.exit_code != 0 or res.timed_out):
        raise SandboxError(f"command {status}: {cap(res.output, 500)}")
    summary = f"$ {spec.command}\n[{status}]\n{cap(res.output, COMMAND_OUTPUT_CAP)}"
    data = {"exit_code": res.exit_code, "timed_out": res.timed_out}
    return NodeResult(summary=summary, data=data), Usage(steps=1)


async def run_merge_node(llm: Any, run: RunRecord, spec: NodeSpec,
                         inputs: dict[str, str]) -> tuple[NodeResult, Usage]:
    merger = TextMerger(llm, model=run.spec.models.get("merger"))
    goal = run.spec.goal
    if spec.instructions:
        goal = f"{goal}\n\nMerge instructions: {spec.instructions}"
    text, usage = await merger.synthesize(run.id, goal, list(inputs.items()))
    return NodeResult(summary=text, data={"inputs": len(inputs)}), usage
