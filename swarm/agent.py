"""One sub-agent: an LLM tool-calling loop, checkpointed after every step.

The loop is a step function that returns what happens next (ToolCalls | Final | GiveUp).
Order of writes, which is what makes resume exact:
  1. the model's turn is appended to the node's step stream (kind=assistant) before any of
     its tools run, so a crash after it repeats the tools, never the LLM call;
  2. the tools' results are appended (kind=tools) before the next LLM call.
A crash therefore repeats at most the one LLM call in flight, and tool calls whose results
were not recorded run again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from swarm.chat import ChatModel
from swarm.errors import SwarmError
from swarm.models import (
    Claim,
    NodeResult,
    NodeSpec,
    StepRecord,
    StepTaken,
    ToolCall,
    ToolResult,
    Usage,
)
from swarm.sandbox.base import Sandbox
from swarm.settings import Endpoint
from swarm.tools import (
    FINISH,
    BadCall,
    FinishArgs,
    execute,
    finish_result,
    parse_call,
    tool_schemas,
)
from swarm.transcript import INVALID, Transcript, call_key, calls_of

MAX_CORRECTIONS = 3  # consecutive turns of only invalid calls before the node gives up
REPEAT_WARN = 3  # identical call this many times: the model is told it is looping
REPEAT_FAIL = 5  # ... and this many: the node fails with the reason
COMPACT_AT = 0.7  # fraction of the context window at which older steps are summarised
COMPACT_KEEP = 6  # records kept verbatim after compaction


@dataclass
class ToolCalls:
    calls: list[ToolCall]


@dataclass
class Final:
    result: NodeResult


@dataclass
class GiveUp:
    reason: str


Next = ToolCalls | Final | GiveUp


class AgentFailed(SwarmError):
    """The agent gave up; the reason goes on the node and to the planner."""


class Halted(SwarmError):
    """The agent was asked to stop between steps (shutdown, cancel, budget); its last step
    is checkpointed, so the node can continue from there."""


class StepStore(Protocol):
    async def load_steps(self, run_id: str, node_id: str) -> list[StepRecord]: ...
    async def append_step(
        self, claim: Claim, step: StepRecord, event: StepTaken | None = None
    ) -> Usage: ...  # the run's usage totals after this step
    async def replace_steps(self, claim: Claim, steps: list[StepRecord]) -> None: ...


class AgentModel(ChatModel, Protocol):
    """An agent also needs its endpoint's context window, to know when to compact."""

    def endpoint_for(self, role: str) -> Endpoint: ...


SYSTEM_PROMPT = """You are a sub-agent in a swarm working on one part of a larger goal.
Your workspace is /workspace (your files persist there and are handed on). Results of the
tasks you depend on are summarised below; their files are mounted read-only under /deps/.
Use the tools to do the work. Be concrete and brief. When your part is done, call `finish`
with a summary of what you did and found (and optional structured `data`). If the task is
too big for your step limit, finish early and say how it should be split."""


def task_prompt(goal: str, spec: NodeSpec, inputs: dict[str, str]) -> str:
    """The node's own task first; inputs and the overall goal after it, as context."""
    parts = [f"Your task ({spec.id}): {spec.title}".rstrip(": ")]
    if spec.instructions:
        parts.append(spec.instructions)
    if spec.handoff:
        parts.append(f"Hand on: {spec.handoff}")
    for dep, summary in inputs.items():
        parts.append(f"Result of {dep}:\n{summary}")
    parts.append(f"Overall goal (context): {goal}")
    return "\n\n".join(parts)


class Agent:
    """Runs one attempt of an agent node to a result, resuming from its checkpoints."""

    def __init__(self, *, run: str, goal: str, spec: NodeSpec, claim: Claim, store: StepStore,
                 llm: AgentModel, sandbox: Sandbox, inputs: dict[str, str],
                 model: str | None = None,
                 halt: Callable[[Usage | None], str | None] = lambda _run_usage: None,
                 guard: Callable[[], Awaitable[None]] | None = None) -> None:
        """`guard`: awaited before every model call and every batch of tool calls; raises
        (FencedOut) when this attempt is no longer ours to continue. `halt` gets the run's
        usage as of this agent's last step and says why to stop, if it should."""
        self.run, self.spec, self.claim, self.halt = run, spec, claim, halt
        self.guard = guard
        self.store, self.llm, self.sandbox, self.model = store, llm, sandbox, model
        self.tools = tool_schemas(spec.tools)
        self.t = Transcript(system=SYSTEM_PROMPT, task=task_prompt(goal, spec, inputs))
        self.run_usage: Usage | None = None

    async def run_to_end(self) -> tuple[NodeResult, Usage]:
        """The node's result and the usage of this whole node (all attempts' steps)."""
        self.t.records = await self.store.load_steps(self.run, self.spec.id)
        with anyio.fail_after(self.spec.limits.wall_s):
            nxt = self._resume_point()
            while True:
                if isinstance(nxt, Final):
                    return nxt.result, self.t.usage
                if isinstance(nxt, GiveUp):
                    raise AgentFailed(nxt.reason)
                if isinstance(nxt, ToolCalls):
                    await self._check()
                    await self._run_tools(nxt.calls)
                reason = self.halt(self.run_usage)
                if reason:
                    raise Halted(reason)
                nxt = self._limits_reached() or await self.step()

    def _resume_point(self) -> Next | None:
        last = self.t.last_message()
        pending = self.t.pending_calls()
        if pending:
            return self._decide(last or {}, pending)
        return None

    def _limits_reached(self) -> GiveUp | None:
        limits = self.spec.limits
        if self.t.steps_taken >= limits.max_steps:
            return GiveUp(
                f"step limit of {limits.max_steps} reached before finishing; split this task"
            )
        if limits.max_tokens and self.t.usage.tokens >= limits.max_tokens:
            return GiveUp(f"token limit of {limits.max_tokens} reached before finishing")
        return None

    async def step(self) -> Next:
        """One LLM turn, checkpointed before anything acts on it."""
        await self._check()
        await self._maybe_compact()
        res = await self.llm.chat("worker", self.t.messages(), self.tools, run=self.run,
                                  node=self.spec.id, model=self.model)
        usage = res.usage.model_copy(update={"steps": 1})
        record = StepRecord(n=self.t.next_n, kind="assistant", message=res.message, usage=usage)
        event = StepTaken(run=self.run, node=self.spec.id, n=record.n,
                          tool_calls=[c.name for c in res.tool_calls], tokens=usage.tokens)
        self.run_usage = await self.store.append_step(self.claim, record, event)
        self.t.records.append(record)
        return self._decide(res.message, calls_of(res.message))

    async def _check(self) -> None:
        if self.guard is not None:
            await self.guard()

    def _decide(self, message: dict, calls: list[ToolCall]) -> Next:
        for call in calls:
            if call.name == FINISH:
                try:
                    args = parse_call(call, self.spec.tools)
                except BadCall:
                    continue  # the tools pass reports the problem to the model
                assert isinstance(args, FinishArgs)
                return Final(finish_result(args))
        if calls:
            return ToolCalls(calls)
        # A plain answer without tool calls: many real models end this way; take it as final.
        text = (message.get("content") or "").strip()
        if text:
            return Final(NodeResult(summary=text))
        return GiveUp("the model returned neither tool calls nor an answer")

    async def _run_tools(self, calls: list[ToolCall]) -> None:
        counts = self.t.call_counts()
        results: list[ToolResult] = []
        for call in calls:
            results.append(await self._run_one(call, counts[call_key(call)]))
        record = StepRecord(n=self.t.records[-1].n, kind="tools", results=results)
        await self.store.append_step(self.claim, record)
        self.t.records.append(record)
        if self.t.bad_streak() > MAX_CORRECTIONS:
            raise AgentFailed(f"the model kept making invalid tool calls: {results[-1].content}")
        repeated = max((counts[call_key(c)] for c in calls), default=0)
        if repeated >= REPEAT_FAIL:
            raise AgentFailed(
                f"loop guard: the same call was repeated {repeated} times ({calls[0].name})"
            )

    async def _run_one(self, call: ToolCall, seen: int) -> ToolResult:
        try:
            args = parse_call(call, self.spec.tools)
        except BadCall as exc:
            return ToolResult(call_id=call.id, name=call.name, content=f"{INVALID} {exc}",
                              ok=False)
        result = await execute(args, call, self.sandbox,
                               exec_timeout_s=self.spec.limits.exec_timeout_s)
        if seen >= REPEAT_WARN:
            result.content += (
                f"\n[note: you have made this exact call {seen} times; it will not give a new "
                "answer. Change approach or finish.]"
            )
        return result

    async def _maybe_compact(self) -> None:
        budget = int(self.llm.endpoint_for("worker").context_window * COMPACT_AT)
        if self.t.estimated_tokens() < budget:
            return
        cut = self.t.compaction_split(COMPACT_KEEP)
        if cut == 0:
            return
        old, kept = self.t.records[:cut], self.t.records[cut:]
        res = await self.llm.chat(
            "worker",
            [{"role": "system", "content": "Summarise these agent steps for the agent itself: "
              "what was done, files written, facts found, what remains. Be dense."},
             {"role": "user", "content": self.t.render(old)}],
            None, run=self.run, node=self.spec.id, model=self.model)
        # The summary carries the usage of what it replaces, so limits and totals stay true.
        spent = sum((r.usage for r in old), res.usage.model_copy(update={"steps": 0}))
        summary = StepRecord(n=old[-1].n, kind="compaction", summary=res.content or "",
                             upto=old[-1].n, usage=spent)
        await self.store.replace_steps(self.claim, [summary, *kept])
        self.t.records = [summary, *kept]
