"""Pydantic models at every boundary: run specs, plans, node states, jobs, steps, events.

Pure: no I/O. Everything stored in Redis or printed as --json is one of these.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

NodeKind = Literal["agent", "command", "swarm", "merge"]
NodeStatus = Literal["pending", "queued", "running", "done", "failed", "retrying", "dead"]
RunStatus = Literal[
    "planning", "running", "merging", "done", "failed", "cancelled", "budget_exhausted"
]
Role = Literal["planner", "worker", "merger"]

NODE_STATUSES: tuple[NodeStatus, ...] = (
    "pending", "queued", "running", "done", "failed", "retrying", "dead",
)
TERMINAL_RUN_STATUSES: frozenset[str] = frozenset(
    {"done", "failed", "cancelled", "budget_exhausted"}
)
# A node in one of these states will not change again without the coordinator's say.
SETTLED_NODE_STATUSES: frozenset[str] = frozenset({"done", "dead"})

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def now() -> float:
    return time.time()


class Model(BaseModel):
    """Base for every boundary model: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Usage(Model):
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    llm_calls: int = 0
    steps: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            tokens_in=self.tokens_in + other.tokens_in,
            tokens_out=self.tokens_out + other.tokens_out,
            cost_usd=self.cost_usd + other.cost_usd,
            llm_calls=self.llm_calls + other.llm_calls,
            steps=self.steps + other.steps,
        )

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


class Budget(Model):
    """Limits for a whole run. None means unlimited."""

    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_wall_s: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, ge=1)

    def exceeded_by(self, usage: Usage, elapsed_s: float) -> str | None:
        """The name of the first limit `usage` has reached, or None."""
        if self.max_tokens is not None and usage.tokens >= self.max_tokens:
            return f"tokens {usage.tokens} >= {self.max_tokens}"
        if self.max_cost_usd is not None and usage.cost_usd >= self.max_cost_usd:
            return f"cost ${usage.cost_usd:.4f} >= ${self.max_cost_usd:.4f}"
        if self.max_wall_s is not None and elapsed_s >= self.max_wall_s:
            return f"wall time {elapsed_s:.0f}s >= {self.max_wall_s:.0f}s"
        if self.max_steps is not None and usage.steps >= self.max_steps:
            return f"steps {usage.steps} >= {self.max_steps}"
        return None


class NodeLimits(Model):
    max_steps: int = Field(default=40, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    wall_s: float = Field(default=1800.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    exec_timeout_s: float = Field(default=120.0, gt=0)


class NodeSpec(Model):
    """One subtask of a plan."""

    id: str
    title: str = ""
    instructions: str = ""
    deps: list[str] = Field(default_factory=list)
    kind: NodeKind = "agent"
    role: Role = "worker"
    tools: list[str] = Field(
        default_factory=lambda: ["shell", "read_file", "write_file", "list_files", "finish"]
    )
    limits: NodeLimits = Field(default_factory=NodeLimits)
    handoff: str = Field(default="", description="What this node must hand on to dependents.")
    command: str | None = Field(default=None, description="Shell command for kind=command.")
    goal: str | None = Field(default=None, description="Goal of a nested run for kind=swarm.")
    network: bool = Field(default=False, description="Opt this node's sandbox into network.")
    check: bool = Field(
        default=True,
        description="kind=command: a non-zero exit fails the node. False hands the output on.",
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(
                f"node id {v!r} must be 1-100 chars of letters, digits, '_', '.', '-'"
            )
        return v


class Plan(Model):
    nodes: list[NodeSpec]
    revision: int = 0
    note: str = ""

    def by_id(self) -> dict[str, NodeSpec]:
        return {n.id: n for n in self.nodes}


class ModelOverride(Model):
    role: Role
    model: str


class RunSpec(Model):
    """What the user asked for. Stored once at creation, never mutated."""

    goal: str
    plan: Plan | None = Field(default=None, description="A given plan (workflow) skips planning.")
    max_agents: int = Field(default=64, ge=1)
    budget: Budget = Field(default_factory=Budget)
    models: dict[str, str] = Field(default_factory=dict, description="role -> model name")
    simulate: bool = False
    output_dir: str | None = None
    sandbox: Literal["docker", "local", "auto"] = "auto"
    parent_run: str | None = None
    depth: int = Field(default=0, ge=0)
    workflow_name: str | None = None
    mounts: dict[str, str] = Field(
        default_factory=dict,
        description="container path -> host path, mounted read-only into every sandbox",
    )


class RunRecord(Model):
    """A run as stored: its spec plus what changes over time."""

    id: str
    spec: RunSpec
    status: RunStatus = "planning"
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    finished_at: float | None = None
    usage: Usage = Field(default_factory=Usage)
    error: str | None = None
    result_summary: str | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or now()) - self.created_at


class NodeResult(Model):
    summary: str = ""
    data: dict[str, Any] | None = None
    files: list[str] = Field(default_factory=list)


class NodeState(Model):
    """A node's mutable state. Transitions are compare-and-set on (attempt, token)."""

    id: str
    status: NodeStatus = "pending"
    attempt: int = 0
    token: int = Field(default=0, description="Fencing token of the worker that owns it.")
    worker: str | None = None
    result: NodeResult | None = None
    error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    steps: int = 0
    updated_at: float = Field(default_factory=now)


class Job(Model):
    """A unit on the work queue: run one attempt of one node."""

    run: str
    node: str
    attempt: int


class Claim(Model):
    """A job a worker holds: the stream entry it came from and the fence it must present."""

    job: Job
    entry_id: str
    token: int
    deliveries: int = 1


class Completion(Model):
    """What a worker reports when an attempt ends, to the run's completion stream."""

    run: str
    node: str
    attempt: int
    status: Literal["done", "failed", "dead", "retry"]  # retry: a user asks to re-run a dead node
    result: NodeResult | None = None
    error: str | None = None
    usage: Usage = Field(default_factory=Usage)


class ToolCall(Model):
    id: str
    name: str
    arguments: str


class ToolResult(Model):
    call_id: str
    name: str
    content: str
    ok: bool = True


class StepRecord(Model):
    """One checkpointed step of an agent: the model's turn and the results of its tool calls.

    kind=assistant records the model's message before its tools run (so a crash repeats the
    tools, not the LLM call); kind=tools records their results; kind=compaction replaces
    steps [0, upto) with a summary.
    """

    n: int
    kind: Literal["assistant", "tools", "compaction"]
    message: dict[str, Any] | None = None
    results: list[ToolResult] = Field(default_factory=list)
    summary: str | None = None
    upto: int | None = None
    usage: Usage = Field(default_factory=Usage)
    at: float = Field(default_factory=now)


# ---- events: a discriminated union on `type` -------------------------------------------


class _Event(Model):
    run: str
    at: float = Field(default_factory=now)


class RunCreated(_Event):
    type: Literal["run_created"] = "run_created"
    goal: str


class RunStatusChanged(_Event):
    type: Literal["run_status"] = "run_status"
    status: RunStatus
    reason: str | None = None


class PlanStored(_Event):
    type: Literal["plan"] = "plan"
    revision: int
    nodes: int


class NodeStatusChanged(_Event):
    type: Literal["node_status"] = "node_status"
    node: str
    status: NodeStatus
    attempt: int
    reason: str | None = None


class StepTaken(_Event):
    type: Literal["step"] = "step"
    node: str
    n: int
    tool_calls: list[str] = Field(default_factory=list)
    tokens: int = 0


class ModelWaiting(_Event):
    type: Literal["model_wait"] = "model_wait"
    node: str | None = None
    endpoint: str
    wait_s: float
    reason: str


class LogLine(_Event):
    type: Literal["log"] = "log"
    level: Literal["info", "warning", "error"] = "info"
    message: str
    node: str | None = None


Event = Annotated[
    RunCreated
    | RunStatusChanged
    | PlanStored
    | NodeStatusChanged
    | StepTaken
    | ModelWaiting
    | LogLine,
    Field(discriminator="type"),
]


class StatusReport(Model):
    """`swarm status --json` (DESIGN.md CLI contract)."""

    run: str
    status: RunStatus
    counts: dict[NodeStatus, int]
    usage: Usage
    elapsed_s: float


EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(raw: str | bytes) -> Event:
    return EVENT_ADAPTER.validate_json(raw)
