"""What the watcher shows, computed from one read of the store. Pure: no I/O.

One `Snapshot` holds the run record, the plan and every node state read in the same poll, so
the counts are taken from exactly the rows the table shows and always add up to the total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm import dag
from swarm.errors import PlanInvalid
from swarm.models import NODE_STATUSES, NodeState, NodeStatus, Plan, RunRecord

# The name each node status goes by on screen (DESIGN.md's status --json says "planned").
COUNT_LABELS: dict[NodeStatus, str] = {
    "pending": "planned",
    "queued": "queued",
    "running": "running",
    "done": "done",
    "failed": "failed",
    "retrying": "retrying",
    "dead": "dead-lettered",
}
# Words a filter accepts for a status: its own name and its label (plus a short form).
STATUS_WORDS: dict[str, NodeStatus] = {
    **{s: s for s in NODE_STATUSES},
    **{label: s for s, label in COUNT_LABELS.items()},
    "dead-letter": "dead",
}


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node as the plan table shows it."""

    id: str
    depth: int  # -1: in the node states but not in the current plan
    status: NodeStatus
    kind: str
    role: str
    attempt: int
    max_attempts: int
    steps: int
    tokens: int
    updated_at: float | None
    title: str
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    run: RunRecord
    plan: Plan | None
    rows: tuple[NodeRow, ...]  # by dependency depth, then plan order
    counts: dict[NodeStatus, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def revision(self) -> int:
        return self.plan.revision if self.plan else -1

    def row(self, node_id: str) -> NodeRow | None:
        return next((r for r in self.rows if r.id == node_id), None)


def plan_depths(plan: Plan | None) -> dict[str, int]:
    if plan is None:
        return {}
    try:
        return dag.depths(plan)
    except (PlanInvalid, KeyError):  # a broken plan is still shown, flat
        return {n.id: 0 for n in plan.nodes}


def build_snapshot(run: RunRecord, plan: Plan | None, nodes: dict[str, NodeState]) -> Snapshot:
    """Rows for every planned node (a planned node with no state yet is `pending`) and for
    every node state the plan no longer names, so no work drops out of sight."""
    depths = plan_depths(plan)
    rows: list[tuple[int, int, NodeRow]] = []
    specs = plan.nodes if plan else []
    for index, spec in enumerate(specs):
        state = nodes.get(spec.id) or NodeState(id=spec.id, updated_at=0.0)
        row = _row(state, depths.get(spec.id, 0), spec.kind, spec.role,
                   spec.limits.max_attempts, spec.title)
        rows.append((row.depth, index, row))
    planned = {spec.id for spec in specs}
    for index, (nid, state) in enumerate(sorted(nodes.items())):
        if nid not in planned:
            rows.append((1 << 30, index, _row(state, -1, "?", "?", 0, "(not in the plan)")))
    rows.sort(key=lambda t: (t[0], t[1]))
    ordered = tuple(r for _, _, r in rows)
    return Snapshot(run=run, plan=plan, rows=ordered, counts=count_statuses(ordered))


def _row(state: NodeState, depth: int, kind: str, role: str, max_attempts: int,
         title: str) -> NodeRow:
    return NodeRow(
        id=state.id, depth=depth, status=state.status, kind=kind, role=role,
        attempt=state.attempt, max_attempts=max_attempts, steps=state.steps,
        tokens=state.usage.tokens, updated_at=state.updated_at or None, title=title,
        error=state.error,
    )


def count_statuses(rows: tuple[NodeRow, ...] | list[NodeRow]) -> dict[NodeStatus, int]:
    counts: dict[NodeStatus, int] = dict.fromkeys(NODE_STATUSES, 0)
    for row in rows:
        counts[row.status] += 1
    return counts


@dataclass(frozen=True)
class Filter:
    """Rows whose status is one of `statuses` (any, when empty) and whose id, title, kind or
    role contains every word in `words`. Parsed from what the user types: status names
    ("running", "dead", "planned", "status:done") and free text."""

    statuses: frozenset[NodeStatus] = frozenset()
    words: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Filter:
        statuses: set[NodeStatus] = set()
        words: list[str] = []
        for token in text.lower().split():
            word = token.removeprefix("status:").removeprefix("s:")
            if word in STATUS_WORDS:
                statuses.add(STATUS_WORDS[word])
            else:
                words.append(token)
        return cls(frozenset(statuses), tuple(words))

    def __bool__(self) -> bool:
        return bool(self.statuses or self.words)

    def matches(self, row: NodeRow) -> bool:
        if self.statuses and row.status not in self.statuses:
            return False
        if not self.words:
            return True
        hay = f"{row.id}\n{row.title}\n{row.kind}\n{row.role}".lower()
        return all(w in hay for w in self.words)

    def apply(self, rows: tuple[NodeRow, ...]) -> list[NodeRow]:
        return [r for r in rows if self.matches(r)] if self else list(rows)

    def describe(self) -> str:
        parts = sorted(COUNT_LABELS[s] for s in self.statuses) + [f'"{w}"' for w in self.words]
        return " ".join(parts)
