"""swarm.dag: unit tests for each rule, property tests over random DAGs."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm import dag
from swarm.errors import PlanInvalid
from swarm.models import NODE_STATUSES, NodeSpec, NodeStatus, Plan

# No deadline: the machine is shared, and a slow example is not a wrong one.
props = settings(deadline=None, max_examples=150)


def plan(*edges: tuple[str, list[str]]) -> Plan:
    return Plan(nodes=[NodeSpec(id=i, deps=d) for i, d in edges])


# ---- unit tests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Plan(nodes=[]), "plan has no nodes"),
        (plan(("a", []), ("a", [])), "duplicate node id 'a'"),
        (plan(("a", ["ghost"])), "node 'a' depends on unknown node 'ghost'"),
        (plan(("a", ["a"])), "cycle: a -> a"),
        (plan(("a", ["b"]), ("b", ["a"])), "cycle: "),
        (Plan(nodes=[NodeSpec(id="c", kind="command")]), "command node 'c' has no command"),
        (Plan(nodes=[NodeSpec(id="s", kind="swarm")]), "swarm node 's' has no goal"),
    ],
)
def test_validate_names_the_broken_rule(bad: Plan, message: str) -> None:
    with pytest.raises(PlanInvalid, match=message.replace("(", r"\(")):
        dag.validate(bad, max_nodes=10)


def test_validate_enforces_the_node_limit() -> None:
    p = plan(*((f"n{i}", []) for i in range(4)))
    dag.validate(p, max_nodes=4)
    with pytest.raises(PlanInvalid, match="4 nodes, over the limit of 3"):
        dag.validate(p, max_nodes=3)


def test_validate_handles_deep_chains_without_recursion() -> None:
    n = 5000
    chain = plan(("n0", []), *((f"n{i}", [f"n{i - 1}"]) for i in range(1, n)))
    dag.validate(chain, max_nodes=n)
    looped = plan(("n0", [f"n{n - 1}"]), *((f"n{i}", [f"n{i - 1}"]) for i in range(1, n)))
    with pytest.raises(PlanInvalid, match="cycle"):
        dag.validate(looped, max_nodes=n)


DIAMOND = plan(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))


def test_ready_only_after_every_dependency_is_done() -> None:
    assert dag.ready(DIAMOND, {}) == ["a"]
    assert dag.ready(DIAMOND, {"a": "running"}) == []
    assert dag.ready(DIAMOND, {"a": "done"}) == ["b", "c"]
    assert dag.ready(DIAMOND, {"a": "done", "b": "done", "c": "running"}) == []
    assert dag.ready(DIAMOND, {"a": "done", "b": "done", "c": "done"}) == ["d"]


@pytest.mark.parametrize("status", ["failed", "dead", "retrying", "queued"])
def test_an_unfinished_or_failed_dependency_never_unblocks(status: NodeStatus) -> None:
    assert dag.ready(DIAMOND, {"a": "done", "b": "done", "c": status}) == []


def test_blocked_by_failure_covers_every_descendant_of_a_dead_node() -> None:
    assert dag.blocked_by_failure(DIAMOND, {"a": "dead"}) == {"b", "c", "d"}
    assert dag.blocked_by_failure(DIAMOND, {"a": "done", "b": "dead"}) == {"d"}
    assert dag.blocked_by_failure(DIAMOND, {"a": "done", "b": "failed"}) == set()


def test_depths_and_topological_order() -> None:
    assert dag.depths(DIAMOND) == {"a": 0, "b": 1, "c": 1, "d": 2}
    order = dag.topological_order(DIAMOND)
    assert order[0] == "a" and order[-1] == "d"
    with pytest.raises(PlanInvalid, match="cycle"):
        dag.topological_order(plan(("a", ["b"]), ("b", ["a"])))


# ---- property tests ----------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, max_nodes: int = 25) -> Plan:
    """A random acyclic plan: deps point to lower indices, then the order is shuffled."""
    n = draw(st.integers(1, max_nodes))
    ids = [f"n{i}" for i in range(n)]
    deps: list[list[str]] = [[]] + [
        sorted(set(draw(st.lists(st.sampled_from(ids[:i]), max_size=4)))) for i in range(1, n)
    ]
    order = draw(st.permutations(range(n)))
    return Plan(nodes=[NodeSpec(id=ids[i], deps=deps[i]) for i in order])


def any_statuses(p: Plan) -> st.SearchStrategy[dict[str, NodeStatus]]:
    return st.fixed_dictionaries(
        {}, optional={n.id: st.sampled_from(NODE_STATUSES) for n in p.nodes}
    )


def reachable_statuses(data: st.DataObject, p: Plan) -> dict[str, NodeStatus]:
    """Statuses a real run can reach: a node leaves `pending` only once its deps are done."""
    by_id, out = p.by_id(), dict[str, NodeStatus]()
    for nid in dag.topological_order(p):
        if all(out[d] == "done" for d in by_id[nid].deps):
            out[nid] = data.draw(st.sampled_from(NODE_STATUSES))
        else:
            out[nid] = "pending"
    return out


def ancestors(p: Plan, nid: str) -> set[str]:
    by_id, seen, todo = p.by_id(), set(), list(p.by_id()[nid].deps)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(by_id[d].deps)
    return seen


@props
@given(dags())
def test_validate_accepts_every_acyclic_plan(p: Plan) -> None:
    dag.validate(p, max_nodes=len(p.nodes))
    assert dag.find_cycle(p.nodes) is None


@props
@given(st.data())
def test_validate_rejects_an_injected_cycle_and_names_a_real_one(data: st.DataObject) -> None:
    p = data.draw(dags())
    ids = [n.id for n in p.nodes]
    ring = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=5, unique=True))
    deps = {n.id: set(n.deps) for n in p.nodes}
    for here, there in zip(ring, ring[1:] + ring[:1], strict=True):
        deps[here].add(there)
    cyclic = Plan(nodes=[NodeSpec(id=i, deps=sorted(deps[i])) for i in ids])
    with pytest.raises(PlanInvalid) as info:
        dag.validate(cyclic, max_nodes=len(ids))
    assert str(info.value).startswith("cycle: ")
    path = str(info.value).removeprefix("cycle: ").split(" -> ")
    assert len(path) >= 2 and path[0] == path[-1]
    for node, dep in pairwise(path):
        assert dep in deps[node], f"{node} -> {dep} is not an edge"


@props
@given(st.data())
def test_ready_is_exactly_the_pending_nodes_whose_deps_are_all_done(data: st.DataObject) -> None:
    p = data.draw(dags())
    statuses: Mapping[str, NodeStatus] = data.draw(any_statuses(p))
    ready = dag.ready(p, statuses)
    expected = [
        n.id
        for n in p.nodes
        if statuses.get(n.id, "pending") == "pending"
        and all(statuses.get(d) == "done" for d in n.deps)
    ]
    assert ready == expected
    for nid in ready:
        assert all(statuses.get(d) == "done" for d in p.by_id()[nid].deps)


@props
@given(st.data())
def test_a_failed_or_dead_dependency_keeps_dependents_not_ready(data: st.DataObject) -> None:
    p = data.draw(dags())
    statuses = dict(data.draw(any_statuses(p)))
    victim = data.draw(st.sampled_from(p.nodes))
    statuses[victim.id] = data.draw(st.sampled_from(["failed", "dead"]))
    dependents = {n.id for n in p.nodes if victim.id in n.deps}
    assert dependents.isdisjoint(dag.ready(p, statuses))


@props
@given(dags())
def test_topological_order_respects_every_dependency(p: Plan) -> None:
    order = dag.topological_order(p)
    assert sorted(order) == sorted(n.id for n in p.nodes)
    position = {nid: i for i, nid in enumerate(order)}
    for n in p.nodes:
        for d in n.deps:
            assert position[d] < position[n.id]
    depth = dag.depths(p)
    for n in p.nodes:
        assert depth[n.id] == 1 + max((depth[d] for d in n.deps), default=-1)


@props
@given(st.data())
def test_blocked_by_failure_is_the_pending_nodes_with_a_dead_ancestor(
    data: st.DataObject,
) -> None:
    p = data.draw(dags())
    statuses = reachable_statuses(data, p)
    blocked = dag.blocked_by_failure(p, statuses)
    expected = {
        n.id
        for n in p.nodes
        if statuses[n.id] == "pending" and any(statuses[a] == "dead" for a in ancestors(p, n.id))
    }
    assert blocked == expected
    assert blocked.isdisjoint(dag.ready(p, statuses))
