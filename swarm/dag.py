"""Pure DAG rules for plans: validation and readiness. No I/O."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from swarm.errors import PlanInvalid
from swarm.models import NodeSpec, NodeStatus, Plan


def validate(plan: Plan, *, max_nodes: int) -> None:
    """Raise PlanInvalid naming the first rule the plan breaks."""
    if not plan.nodes:
        raise PlanInvalid("plan has no nodes")
    if len(plan.nodes) > max_nodes:
        raise PlanInvalid(f"plan has {len(plan.nodes)} nodes, over the limit of {max_nodes}")
    seen: set[str] = set()
    for node in plan.nodes:
        if node.id in seen:
            raise PlanInvalid(f"duplicate node id {node.id!r}")
        seen.add(node.id)
    for node in plan.nodes:
        for dep in node.deps:
            if dep not in seen:
                raise PlanInvalid(f"node {node.id!r} depends on unknown node {dep!r}")
            if dep == node.id:
                raise PlanInvalid(f"cycle: {node.id} -> {node.id}")
        if node.kind == "command" and not node.command:
            raise PlanInvalid(f"command node {node.id!r} has no command")
        if node.kind == "swarm" and not (node.goal or node.instructions):
            raise PlanInvalid(f"swarm node {node.id!r} has no goal")
    cycle = find_cycle(plan.nodes)
    if cycle:
        raise PlanInvalid("cycle: " + " -> ".join(cycle))


def find_cycle(nodes: Iterable[NodeSpec]) -> list[str] | None:
    """One cycle as a closed path (`a -> b -> a`), or None. Iterative DFS: plans can be deep."""
    deps = {n.id: [d for d in n.deps] for n in nodes}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(deps, white)
    for root in deps:
        if color[root] != white:
            continue
        path: list[str] = [root]
        iters = [iter(deps[root])]
        color[root] = grey
        while iters:
            child = next(iters[-1], None)
            if child is None:
                color[path.pop()] = black
                iters.pop()
                continue
            if child not in color:
                continue
            if color[child] == grey:
                return [*path[path.index(child):], child]
            if color[child] == white:
                color[child] = grey
                path.append(child)
                iters.append(iter(deps[child]))
    return None


def ready(plan: Plan, statuses: Mapping[str, NodeStatus]) -> list[str]:
    """Nodes still pending whose dependencies are all done, in plan order.

    Only `done` unblocks: a failed or dead dependency never makes a dependent ready.
    """
    out = []
    for node in plan.nodes:
        if statuses.get(node.id, "pending") != "pending":
            continue
        if all(statuses.get(d) == "done" for d in node.deps):
            out.append(node.id)
    return out


def blocked_by_failure(plan: Plan, statuses: Mapping[str, NodeStatus]) -> set[str]:
    """Pending nodes that can never run because some ancestor is dead."""
    by_id = plan.by_id()
    memo: dict[str, bool] = {}

    def doomed(nid: str) -> bool:
        if nid in memo:
            return memo[nid]
        memo[nid] = False  # guards against cycles in unvalidated input
        result = any(
            statuses.get(d) == "dead" or (d in by_id and doomed(d)) for d in by_id[nid].deps
        )
        memo[nid] = result
        return result

    return {n.id for n in plan.nodes if statuses.get(n.id, "pending") == "pending" and doomed(n.id)}


def depths(plan: Plan) -> dict[str, int]:
    """Dependency depth of each node (roots are 0); the plan must be acyclic."""
    by_id = plan.by_id()
    out: dict[str, int] = {}
    for node in topological_order(plan):
        out[node] = 1 + max((out[d] for d in by_id[node].deps), default=-1)
    return out


def topological_order(plan: Plan) -> list[str]:
    indeg = {n.id: len(n.deps) for n in plan.nodes}
    children: dict[str, list[str]] = {n.id: [] for n in plan.nodes}
    for n in plan.nodes:
        for d in n.deps:
            children[d].append(n.id)
    queue = deque(n.id for n in plan.nodes if indeg[n.id] == 0)
    order: list[str] = []
    while queue:
        nid = queue.popleft()
        order.append(nid)
        for c in children[nid]:
            indeg[c] -= 1
            if indeg[c] == 0:
                queue.append(c)
    if len(order) != len(plan.nodes):
        raise PlanInvalid("plan has a cycle")
    return order
