"""The coordinator: one leader per run plans it, schedules ready nodes, absorbs failures, merges.

It holds the run's leadership lease (renewed; lost lease = stop writing at once), keeps an
in-memory mirror of node statuses fed by its own transitions and by the run's completion
stream, and only ever changes node state through compare-and-set on (node, attempt), so a
second coordinator or a duplicate completion cannot double-schedule anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import anyio
import anyio.abc

from swarm import dag
from swarm.errors import PlanInvalid, SwarmError
from swarm.models import (
    TERMINAL_RUN_STATUSES,
    Completion,
    Job,
    LogLine,
    NodeResult,
    NodeState,
    Plan,
    RunRecord,
    RunSpec,
)
from swarm.planner import Planner
from swarm.settings import Settings
from swarm.store import Store

log = logging.getLogger(__name__)

IN_FLIGHT = frozenset({"queued", "running"})
DRAIN_TIMEOUT_S = 120.0  # how long a stopping run waits for running steps to end
MAX_REPLANS = 10  # a planner that keeps planning failing work must not loop forever
REFRESH_S = 5.0  # how often the leader re-reads node states (at most every lease TTL)


def backoff_s(attempt: int) -> float:
    return min(30.0, 0.5 * 2 ** max(0, attempt - 1))


def leader_lease(run_id: str) -> str:
    return f"run:{run_id}:leader"


def _mark(node: NodeState) -> str:
    """Names one death of a node: a retried node that dies again is owed a new replan."""
    return f"{node.id}@{node.attempt}"


class LostLeadership(SwarmError):
    """Another coordinator leads this run now."""


@dataclass
class RunState:
    """What the leader knows about its run between reads."""

    record: RunRecord
    plan: Plan
    nodes: dict[str, NodeState]
    retry_at: dict[str, float] = field(default_factory=dict)
    replanned: set[str] = field(default_factory=set)  # dead-node marks already answered
    stop_reason: str | None = None
    final_status: str | None = None
    tasks: anyio.abc.TaskGroup | None = None  # where nested runs of this run live

    def statuses(self) -> dict[str, str]:
        return {nid: self.nodes[nid].status for nid in self.plan.by_id() if nid in self.nodes}

    def in_flight(self) -> int:
        return sum(1 for s in self.statuses().values() if s in IN_FLIGHT)

    def active(self) -> bool:
        # A stopping run retries nothing, so retries it still has scheduled keep it open no
        # longer (they would only hold it until the drain deadline).
        return self.in_flight() > 0 or (bool(self.retry_at) and self.stop_reason is None)


# The merge stage, given the final run state; returns the result summary.
Finisher = Callable[[RunState], Awaitable[str]]
SUBRUN_PREFIX = "sub-swarm:"  # node.worker of a swarm node names its child run


class Coordinator:
    def __init__(self, store: Store, planner: Planner, finisher: Finisher, settings: Settings,
                 owner: str) -> None:
        self.store, self.planner, self.finisher = store, planner, finisher
        self.settings, self.owner = settings, owner

    async def lead(self, run_id: str) -> RunRecord:
        """Drive a run to a terminal status; returns its final record.

        Raises LostLeadership if another live coordinator holds the run.
        """
        lease, ttl = leader_lease(run_id), self.settings.lease_ttl_s
        if not await self.store.acquire_lease(lease, self.owner, ttl):
            holder = await self.store.lease_owner(lease)
            if holder != self.owner:
                raise LostLeadership(f"run {run_id} is led by {holder}")
        record: RunRecord | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, lease, tg.cancel_scope)
                record = await self._drive(run_id)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.release_lease(lease, self.owner)
        if record is None:  # _keep_lease stopped us: someone else leads the run now
            raise LostLeadership(f"lost the lead of run {run_id} to "
                                 f"{await self.store.lease_owner(lease)}")
        return record

    async def _keep_lease(self, lease: str, scope: anyio.CancelScope) -> None:
        ttl = self.settings.lease_ttl_s
        while True:
            await anyio.sleep(ttl / 3)
            # Renew; a lease that expired meanwhile (a Redis restart, a long pause) is taken
            # again if nobody else took it: every write of ours is a compare-and-set anyway.
            if not await self.store.acquire_lease(lease, self.owner, ttl):
                log.error("lost the lease %s; stopping", lease)
                scope.cancel()
                return

    async def _drive(self, run_id: str) -> RunRecord:
        rec = await self.store.get_run(run_id)
        if rec.status in TERMINAL_RUN_STATUSES:
            return rec
        if rec.status == "planning":
            await self._plan(rec)
        state = await self._load(run_id)
        if state.record.status == "running":
            async with anyio.create_task_group() as tasks:
                state.tasks = tasks
                for nid, node in state.nodes.items():
                    if node.status == "running" and (node.worker or "").startswith(SUBRUN_PREFIX):
                        tasks.start_soon(self._follow_subrun, state, nid,
                                         node.worker.removeprefix(SUBRUN_PREFIX))  # type: ignore[union-attr]
                await self._schedule_loop(state)
                tasks.cancel_scope.cancel()
        return await self._finish(state)

    async def _plan(self, rec: RunRecord) -> None:
        plan = await self.store.get_plan(rec.id)
        if plan is None:
            try:
                plan = rec.spec.plan or await self.planner.plan(rec.id, rec.spec.goal)
                dag.validate(plan, max_nodes=self.settings.max_nodes)
            except PlanInvalid as exc:
                await self.store.set_run_status(rec.id, "failed", expect={"planning"},
                                                error=f"planning failed: {exc}")
                raise
            finally:
                await self._charge_planner(rec.id)
            await self.store.save_plan(rec.id, plan)
        await self.store.init_nodes(rec.id, [n.id for n in plan.nodes])
        await self.store.set_run_status(rec.id, "running", expect={"planning"})

    async def _charge_planner(self, run_id: str) -> None:
        if self.planner.usage.llm_calls:
            await self.store.add_run_usage(run_id, self.planner.usage)
            self.planner.usage = type(self.planner.usage)()

    async def _load(self, run_id: str) -> RunState:
        """The run's state as Redis has it: what a new leader (a resume) starts from."""
        rec = await self.store.get_run(run_id)
        plan = await self.store.get_plan(run_id)
        if plan is None:
            raise PlanInvalid(f"run {run_id} has no plan stored")
        await self.store.init_nodes(run_id, [n.id for n in plan.nodes])
        nodes = await self.store.get_nodes(run_id)
        # Nodes caught between attempts when the last leader died get their retry now.
        retry_at = {nid: 0.0 for nid, s in nodes.items() if s.status in ("retrying", "failed")}
        state = RunState(record=rec, plan=plan, nodes=nodes, retry_at=retry_at,
                         replanned=await self.store.replanned(run_id))
        await self._requeue_orphans(state)
        return state

    async def _requeue_orphans(self, state: RunState) -> None:
        """Put a job back for every queued node that has none on the queue (a node queued by
        an older swarm, whose leader died between the transition and the enqueue). A job
        that does exist is never doubled; if one did, the fence would run it once."""
        run_id = state.record.id
        queued = {(nid, n.attempt) for nid, n in state.nodes.items() if n.status == "queued"}
        if not queued:
            return
        for nid, attempt in sorted(queued - await self.store.queued_jobs(run_id)):
            new = await self.store.transition(run_id, nid, expect_attempt=attempt,
                                              expect_status={"queued"},
                                              enqueue=Job(run=run_id, node=nid, attempt=attempt))
            if new is not None:
                await self._note(run_id, f"re-queued {nid} (attempt {attempt}): its job was lost",
                                 level="warning")

    async def _refresh(self, state: RunState) -> None:
        """Re-read every node from Redis into the mirror. The mirror can only drift from
        Redis when Redis lost recent writes (a restart with appendfsync everysec): a node
        the mirror has as queued that Redis has as pending would otherwise wait forever."""
        run_id = state.record.id
        state.nodes = await self.store.get_nodes(run_id)
        state.replanned |= await self.store.replanned(run_id)
        later = anyio.current_time() + self.settings.lease_ttl_s
        for nid, node in state.nodes.items():
            # A failed node's completion normally arrives first and schedules its retry;
            # this is the fallback for one whose completion was applied but whose retry
            # transition was lost.
            if node.status in ("retrying", "failed") and nid not in state.retry_at:
                state.retry_at[nid] = later
        await self._requeue_orphans(state)
        await self._replan_owed(state)

    async def _replan_owed(self, state: RunState) -> None:
        """Replan for every dead node whose death was never answered (its leader died
        between marking it dead and storing the revision)."""
        for nid in [n.id for n in state.plan.nodes]:
            node = state.nodes.get(nid)
            if node is not None and node.status == "dead" and _mark(node) not in state.replanned:
                await self._replan(state, nid, node.error or "dead")

    # ---- the loop ------------------------------------------------------------------------

    async def _schedule_loop(self, state: RunState) -> None:
        run_id = state.record.id
        drain_deadline = math.inf
        refresh_every = min(REFRESH_S, self.settings.lease_ttl_s)
        next_refresh = anyio.current_time() + refresh_every
        await self._replan_owed(state)
        while True:
            state.record = await self.store.get_run(run_id)
            self._check_stop(state)
            if anyio.current_time() >= next_refresh:
                await self._refresh(state)
                next_refresh = anyio.current_time() + refresh_every
            if state.stop_reason is None:
                await self._retry_due(state)
                await self._admit(state)
            elif drain_deadline == math.inf:
                drain_deadline = anyio.current_time() + DRAIN_TIMEOUT_S
                await self._note(run_id, f"stopping: {state.stop_reason}")
            idle = not state.active() and (state.stop_reason or not self._ready(state))
            # An idle run still drains its completion stream once (block 0) before it ends:
            # it may hold a retry request or a completion a dead leader never applied.
            block = 0 if idle else 50 if self._ready(state) else 500
            batch = await self.store.read_completions(run_id, self.owner, count=500,
                                                      block_ms=block)
            for entry_id, done in batch:
                await self._apply(state, done)
                await self.store.ack_completion(run_id, entry_id)
            if idle and not batch:
                await self._settle_blocked(state)
                return
            if state.stop_reason and anyio.current_time() > drain_deadline:
                await self._note(run_id, "gave up waiting for running nodes", level="warning")
                return

    def _check_stop(self, state: RunState) -> None:
        rec = state.record
        if rec.status == "cancelled":
            state.stop_reason, state.final_status = "cancelled by user", "cancelled"
            return
        over = rec.spec.budget.exceeded_by(rec.usage, rec.elapsed_s)
        if over and state.stop_reason is None:
            state.stop_reason, state.final_status = f"budget reached: {over}", "budget_exhausted"

    def _ready(self, state: RunState) -> list[str]:
        return dag.ready(state.plan, state.statuses())  # type: ignore[arg-type]

    async def _admit(self, state: RunState) -> None:
        room = state.record.spec.max_agents - state.in_flight()
        if room <= 0:
            return
        specs = state.plan.by_id()
        # Concurrently: under load every awaited round trip waits a whole event-loop cycle
        # behind hundreds of agents, so queueing one node after another crawls (measured:
        # ~75 nodes/s with 300 agents in flight). Each transition is its own CAS.
        async with anyio.create_task_group() as tg:
            for nid in self._ready(state)[:room]:
                if specs[nid].kind == "swarm":
                    tg.start_soon(self._start_subrun, state, nid)
                else:
                    tg.start_soon(partial(self._queue, state, nid, expect="pending"))

    async def _queue(self, state: RunState, nid: str, *, expect: str) -> None:
        cur = state.nodes.get(nid) or NodeState(id=nid)
        attempt = cur.attempt + 1
        # The job goes on the queue in the same atomic step as the transition: a crash
        # between the two would leave a node queued that nothing ever runs.
        new = await self.store.transition(state.record.id, nid, expect_attempt=cur.attempt,
                                          expect_status={expect}, status="queued",
                                          attempt=attempt, error=None,
                                          enqueue=Job(run=state.record.id, node=nid,
                                                      attempt=attempt))
        if new is None:  # someone moved it on: re-read instead of guessing
            state.nodes[nid] = await self.store.get_node(state.record.id, nid)
            return
        state.nodes[nid] = new

    async def _retry_due(self, state: RunState) -> None:
        now = anyio.current_time()
        for nid, at in list(state.retry_at.items()):
            if at <= now:
                del state.retry_at[nid]
                cur = state.nodes[nid]
                if cur.status == "failed":  # a leader died between failed and retrying
                    await self._fail_or_retry(state, nid, cur.error or "failed")
                else:
                    await self._queue(state, nid, expect="retrying")

    async def _apply(self, state: RunState, done: Completion) -> None:
        cur = state.nodes.get(done.node)
        if done.status == "retry":
            if cur is not None and cur.status == "dead" and state.stop_reason is None:
                await self._note(state.record.id, f"retrying dead node {done.node} on request")
                await self._queue(state, done.node, expect="dead")
            return
        if cur is None or done.attempt != cur.attempt:
            return  # a completion of an older attempt
        if done.status == "dead":  # dead-lettered: the mirror may already say so (a refresh)
            state.nodes[done.node] = await self.store.get_node(state.record.id, done.node)
            await self._replan_owed(state)
            return
        if cur.status in ("done", "dead"):
            return  # already applied
        state.nodes[done.node] = await self.store.get_node(state.record.id, done.node)
        if done.status == "failed":
            await self._fail_or_retry(state, done.node, done.error or "failed")

    async def _fail_or_retry(self, state: RunState, nid: str, error: str) -> None:
        cur = state.nodes[nid]
        limit = state.plan.by_id()[nid].limits.max_attempts
        if state.stop_reason is None and cur.attempt < limit:
            new = await self.store.transition(state.record.id, nid, expect_attempt=cur.attempt,
                                              expect_status={"failed"}, status="retrying")
            if new is not None:
                state.nodes[nid] = new
                state.retry_at[nid] = anyio.current_time() + backoff_s(cur.attempt)
            return
        if state.stop_reason is not None:
            return  # a stopping run does not retry; the node stays failed
        new = await self.store.transition(state.record.id, nid, expect_attempt=cur.attempt,
                                          expect_status={"failed"}, status="dead",
                                          error=f"failed {cur.attempt} times; last: {error}")
        if new is not None:
            state.nodes[nid] = new
            await self._replan(state, nid, error)

    async def _replan(self, state: RunState, nid: str, reason: str) -> None:
        """Answer a node's death once: a plan revision, stored together with the mark that
        says this death was answered (so a leader that dies midway leaves it owed, and the
        next one replans; see _replan_owed)."""
        run_id, mark = state.record.id, _mark(state.nodes[nid])
        if mark in state.replanned:
            return
        if state.plan.revision >= MAX_REPLANS:
            await self._note(run_id, f"node {nid} is dead ({reason}); no replans left",
                             level="warning")
            await self._answered(state, mark)
            return
        await self._note(run_id, f"node {nid} is dead ({reason}); revising the plan")
        try:
            revised = await self.planner.replan(run_id, state.record.spec.goal, state.plan,
                                                state.nodes, nid, reason)
            dag.validate(revised, max_nodes=self.settings.max_nodes)
        except PlanInvalid as exc:
            await self._note(run_id, f"replanning failed: {exc}", level="warning")
            await self._answered(state, mark)
            return
        finally:
            await self._charge_planner(run_id)
        await self.store.save_plan(run_id, revised, replanned=mark)
        state.replanned.add(mark)
        state.plan = revised
        state.nodes = await self.store.get_nodes(run_id)

    async def _answered(self, state: RunState, mark: str) -> None:
        await self.store.mark_replanned(state.record.id, mark)
        state.replanned.add(mark)

    async def _settle_blocked(self, state: RunState) -> None:
        """Pending nodes behind a dead one can never run: say so (they stay pending)."""
        blocked = dag.blocked_by_failure(state.plan, state.statuses())  # type: ignore[arg-type]
        if blocked:
            await self._note(state.record.id,
                             f"{len(blocked)} node(s) never ran: a dependency is dead",
                             level="warning")

    # ---- nested swarms ----------------------------------------------------------------

    async def _start_subrun(self, state: RunState, nid: str) -> None:
        spec, parent, cur = state.plan.by_id()[nid], state.record, state.nodes[nid]
        attempt = cur.attempt + 1
        if parent.spec.depth + 1 > self.settings.max_depth:
            new = await self.store.transition(
                parent.id, nid, expect_attempt=cur.attempt, expect_status={"pending"},
                status="dead", attempt=attempt,
                error=f"nested swarm depth limit of {self.settings.max_depth} reached")
            if new is not None:
                state.nodes[nid] = new
                await self._replan(state, nid, new.error or "depth limit")
            return
        budget = parent.spec.budget  # the child's spend is added to the parent's on return
        child = await self.store.create_run(RunSpec(
            goal=spec.goal or spec.instructions, max_agents=parent.spec.max_agents,
            budget=budget, models=parent.spec.models, simulate=parent.spec.simulate,
            sandbox=parent.spec.sandbox, parent_run=parent.id, depth=parent.spec.depth + 1,
            mounts=parent.spec.mounts))
        new = await self.store.transition(parent.id, nid, expect_attempt=cur.attempt,
                                          expect_status={"pending"}, status="running",
                                          attempt=attempt, worker=SUBRUN_PREFIX + child.id)
        if new is None:
            await self.store.set_run_status(child.id, "cancelled", error="parent moved on")
            return
        state.nodes[nid] = new
        assert state.tasks is not None
        state.tasks.start_soon(self._follow_subrun, state, nid, child.id)

    async def _follow_subrun(self, state: RunState, nid: str, child_id: str) -> None:
        """Lead the child run to its end, then report it as the swarm node's completion."""
        child_planner = Planner(self.planner.llm, max_nodes=self.settings.max_nodes,
                                model=self.planner.model)
        sub = Coordinator(self.store, child_planner, self.finisher, self.settings, self.owner)
        try:
            record = await sub.lead(child_id)
            ok, error = record.status == "done", record.error
        except SwarmError as exc:
            record, ok, error = await self.store.get_run(child_id), False, str(exc)
        await self.store.add_run_usage(state.record.id, record.usage)
        attempt = state.nodes[nid].attempt
        result = NodeResult(summary=record.result_summary or "", data={"run": child_id})
        await self.store.finish_node(state.record.id, Completion(
            run=state.record.id, node=nid, attempt=attempt, status="done" if ok else "failed",
            result=result, error=None if ok else f"sub-swarm {child_id}: {error}",
            usage=record.usage))

    # ---- the end -------------------------------------------------------------------------

    async def _finish(self, state: RunState) -> RunRecord:
        run_id = state.record.id
        state.nodes = await self.store.get_nodes(run_id)
        statuses = state.statuses()
        all_done = all(s == "done" for s in statuses.values())
        if state.final_status is None and not all_done and state.record.status == "merging":
            self._check_stop(state)  # a resume that starts at the merge: why did it stop?
        if state.final_status is None:
            state.final_status = "done" if all_done else "failed"
        if state.record.status != "merging":
            await self.store.set_run_status(run_id, "merging",
                                            expect={"running", "cancelled", "planning"})
        summary = await self.finisher(state)
        error = None
        if state.final_status == "failed":
            bad = sorted(n for n, s in statuses.items() if s != "done")
            error = f"{len(bad)} node(s) did not finish: {', '.join(bad[:10])}"
        elif state.final_status != "done":
            error = state.stop_reason
        await self.store.set_run_status(run_id, state.final_status,  # type: ignore[arg-type]
                                        expect={"merging"}, error=error,
                                        result_summary=summary)
        return await self.store.get_run(run_id)

    async def _note(self, run_id: str, message: str,
                    level: Literal["info", "warning", "error"] = "info") -> None:
        await self.store.emit(LogLine(run=run_id, message=message, level=level))
