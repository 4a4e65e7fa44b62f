"""Runs, plans and node states."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection, Iterable
from typing import Any

from swarm.errors import NotFound, UserError
from swarm.models import (
    TERMINAL_RUN_STATUSES,
    Job,
    NodeResult,
    NodeState,
    NodeStatusChanged,
    Plan,
    PlanStored,
    RunCreated,
    RunRecord,
    RunSpec,
    RunStatus,
    RunStatusChanged,
    Usage,
    now,
)
from swarm.store.base import StoreBase

_USAGE_INTS = ("tokens_in", "tokens_out", "llm_calls", "steps")
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_run_id() -> str:
    """`r-` + milliseconds in base 36 (sorts by creation until the year 5188) + 7 random
    (create_run draws again on the rare collision)."""
    ms, digits = int(time.time() * 1000), []
    while ms:
        ms, d = divmod(ms, 36)
        digits.append(_B36[d])
    rand = "".join(secrets.choice(_B36) for _ in range(7))
    return "r-" + "".join(reversed(digits)) + rand


def node_json(state: NodeState) -> str:
    """A node state as stored in the nodes hash: everything but the result (Keys.results)."""
    return state.model_dump_json(exclude={"result"})


def load_node(raw: str, result: str | None) -> NodeState:
    state = NodeState.model_validate_json(raw)
    if result:
        state.result = NodeResult.model_validate_json(result)
    return state


_MOVING_FIELDS = ("status", "created_at", "updated_at", "finished_at", "error",
                  "result_summary", "cost_usd", *_USAGE_INTS)


def _run_from_hash(run_id: str, h: dict[str, str], spec: RunSpec | None = None) -> RunRecord:
    usage = Usage(
        cost_usd=float(h.get("cost_usd", 0)), **{k: int(h.get(k, 0)) for k in _USAGE_INTS}
    )
    finished = h.get("finished_at")
    return RunRecord(
        id=run_id,
        spec=spec if spec is not None else RunSpec.model_validate_json(h["spec"]),
        status=h["status"],
        created_at=float(h["created_at"]),
        updated_at=float(h.get("updated_at", h["created_at"])),
        finished_at=float(finished) if finished else None,
        usage=usage,
        error=h.get("error"),
        result_summary=h.get("result_summary"),
    )


class RunsStore(StoreBase):
    # ---- runs --------------------------------------------------------------------------

    async def create_run(self, spec: RunSpec, run_id: str | None = None) -> RunRecord:
        if run_id is not None:
            record = RunRecord(id=run_id, spec=spec)
            if not await self._try_create(record):
                raise UserError(f"run id {run_id!r} already exists")
            return record
        for _ in range(4):  # a generated id collides about never; then draw another
            record = RunRecord(id=new_run_id(), spec=spec)
            if await self._try_create(record):
                return record
        raise UserError("could not generate a fresh run id")

    async def _try_create(self, record: RunRecord) -> bool:
        """Store a new run atomically; False (nothing written) if the id is taken."""
        spec = record.spec
        fields: list[Any] = [
            "spec",
            spec.model_dump_json(),
            "status",
            record.status,
            "created_at",
            record.created_at,
            "updated_at",
            record.updated_at,
        ]
        event = RunCreated(run=record.id, goal=spec.goal).model_dump_json()
        k = self.keys
        created = await self._lua.create_run(
            keys=[k.run(record.id), k.runs, k.events(record.id)],
            args=[record.id, record.created_at, self._maxlen, event, *fields],
        )
        if created:
            await self._ensure_group(k.done(record.id), k.COORDINATOR)
        return bool(created)

    async def get_run(self, run_id: str) -> RunRecord:
        # A spec never changes once stored and can hold a whole plan: parse (and fetch) it
        # once per process, then read only the fields that move. Hot: workers, leaders and
        # readers poll runs every second.
        spec = self._spec_cache.get(run_id)
        if spec is None:
            h = await self._r.hgetall(self.keys.run(run_id))
            if not h:
                raise NotFound(f"unknown run id {run_id!r}")
            record = _run_from_hash(run_id, h)
            self._spec_cache[run_id] = record.spec
            return record
        values = await self._r.hmget(self.keys.run(run_id), _MOVING_FIELDS)
        h = {k: v for k, v in zip(_MOVING_FIELDS, values, strict=True) if v is not None}
        if "status" not in h:
            self._spec_cache.pop(run_id, None)
            raise NotFound(f"unknown run id {run_id!r}")
        return _run_from_hash(run_id, h, spec)

    async def list_runs(self, limit: int = 100) -> list[RunRecord]:
        """Newest first; ids whose record expired are skipped."""
        ids = await self._r.zrevrange(self.keys.runs, 0, limit - 1)
        async with self._r.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hgetall(self.keys.run(run_id))
            hashes = await pipe.execute()
        return [_run_from_hash(i, h) for i, h in zip(ids, hashes, strict=True) if h]

    async def set_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expect: Collection[str] | None = None,
        error: str | None = None,
        result_summary: str | None = None,
    ) -> bool:
        """Compare-and-set on the current status; False when it was not in `expect`."""
        event = RunStatusChanged(run=run_id, status=status, reason=error).model_dump_json()
        applied = await self._lua.set_run_status(
            keys=[self.keys.run(run_id), self.keys.events(run_id)],
            args=[
                status,
                json.dumps(sorted(expect)) if expect is not None else "",
                json.dumps(error),
                json.dumps(result_summary),
                now(),
                "1" if status in TERMINAL_RUN_STATUSES else "0",
                self._maxlen,
                event,
            ],
        )
        if applied == -1:
            raise NotFound(f"unknown run id {run_id!r}")
        return bool(applied)

    async def add_run_usage(self, run_id: str, usage: Usage) -> Usage:
        """Atomic increments, so many workers can add at once; returns the new total."""
        key = self.keys.run(run_id)
        async with self._r.pipeline(transaction=True) as pipe:
            for field in _USAGE_INTS:
                pipe.hincrby(key, field, getattr(usage, field))
            pipe.hincrbyfloat(key, "cost_usd", usage.cost_usd)
            totals = await pipe.execute()
        return Usage(cost_usd=float(totals[-1]), **dict(zip(_USAGE_INTS, totals[:-1], strict=True)))

    # ---- plans -------------------------------------------------------------------------

    async def save_plan(self, run_id: str, plan: Plan, *, replanned: str | None = None) -> None:
        """Store a plan (revision). `replanned`: the dead-node mark (see `mark_replanned`)
        of the failure this revision answers, recorded in the same transaction, together
        with a pending state for every new node."""
        raw = plan.model_dump_json()
        event = PlanStored(run=run_id, revision=plan.revision, nodes=len(plan.nodes))
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.plan(run_id), raw)
            pipe.rpush(self.keys.plans(run_id), raw)
            for node in plan.nodes:
                pipe.hsetnx(self.keys.nodes(run_id), node.id, node_json(NodeState(id=node.id)))
            if replanned is not None:
                pipe.sadd(self.keys.replanned(run_id), replanned)
            pipe.xadd(
                self.keys.events(run_id),
                {"e": event.model_dump_json()},
                maxlen=self._maxlen,
                approximate=True,
            )
            await pipe.execute()

    async def get_plan(self, run_id: str) -> Plan | None:
        """The current plan. Parsed once per revision per process (the revision count is
        read first, one cheap command): every job of a run reads it. Treat it as read-only."""
        revisions = await self._r.llen(self.keys.plans(run_id))
        cached = self._plan_cache.get(run_id)
        if cached is not None and cached[0] == revisions:
            return cached[1]
        raw = await self._r.get(self.keys.plan(run_id))
        if not raw:
            return None
        plan = Plan.model_validate_json(raw)
        self._plan_cache[run_id] = (revisions, plan)
        return plan

    async def plan_history(self, run_id: str) -> list[Plan]:
        raws = await self._r.lrange(self.keys.plans(run_id), 0, -1)
        return [Plan.model_validate_json(r) for r in raws]

    async def mark_replanned(self, run_id: str, mark: str) -> None:
        """Record that a dead node's death (mark `node@attempt`) was answered, also when no
        revision came of it (no replans left, the planner failed): it is never owed again."""
        await self._r.sadd(self.keys.replanned(run_id), mark)

    async def replanned(self, run_id: str) -> set[str]:
        """The marks of every dead node whose replan was done (see `mark_replanned`)."""
        marks: set[str] = await self._r.smembers(self.keys.replanned(run_id))
        return marks

    # ---- recorded model calls of the merge stage -----------------------------------------

    async def recall_call(self, run_id: str, key: str) -> str | None:
        """A model call's recorded answer (JSON), if that very call was made before."""
        raw: str | None = await self._r.hget(self.keys.calls(run_id), key)
        return raw

    async def record_call(self, run_id: str, key: str, answer: str, usage: Usage) -> None:
        """Record a model call's answer and charge its usage to the run, in one step."""
        key_run = self.keys.run(run_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.calls(run_id), key, answer)
            for name in _USAGE_INTS:
                pipe.hincrby(key_run, name, getattr(usage, name))
            pipe.hincrbyfloat(key_run, "cost_usd", usage.cost_usd)
            await pipe.execute()

    # ---- nodes -------------------------------------------------------------------------

    async def init_nodes(self, run_id: str, node_ids: Iterable[str]) -> None:
        """A pending state for each id not yet present; existing states are never touched."""
        key = self.keys.nodes(run_id)
        async with self._r.pipeline(transaction=True) as pipe:
            for node_id in node_ids:
                pipe.hsetnx(key, node_id, node_json(NodeState(id=node_id)))
            await pipe.execute()

    async def get_node(self, run_id: str, node_id: str) -> NodeState:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.nodes(run_id), node_id)
            pipe.hget(self.keys.results(run_id), node_id)
            raw, result = await pipe.execute()
        if raw is None:
            raise NotFound(f"unknown node {node_id!r} in run {run_id!r}")
        return load_node(raw, result)

    async def node_statuses(self, run_id: str) -> dict[str, str]:
        """Node id -> status, without building NodeState models: what counts and progress
        lines need, for a fraction of the CPU (polled every second or two on 1,000 nodes)."""
        raw = await self._r.hgetall(self.keys.nodes(run_id))
        return {nid: json.loads(value)["status"] for nid, value in raw.items()}

    async def get_nodes(self, run_id: str) -> dict[str, NodeState]:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.nodes(run_id))
            pipe.hgetall(self.keys.results(run_id))
            raws, results = await pipe.execute()
        return {nid: load_node(raw, results.get(nid)) for nid, raw in raws.items()}

    async def transition(
        self,
        run_id: str,
        node_id: str,
        *,
        expect_attempt: int,
        expect_status: Collection[str],
        enqueue: Job | None = None,
        **changes: Any,
    ) -> NodeState | None:
        """Compare-and-set on (attempt, status): the new state, or None when it was stale.

        `enqueue`: a job put on the work queue in the same atomic step, so a crash can never
        leave a node `queued` with no job to run it.
        """
        # Validate the changes against the model first: a typo or a bad status fails here.
        checked = NodeState(id=node_id, **changes).model_dump(mode="json", include=set(changes))
        result_mode, result_raw = "keep", ""
        if "result" in changes:
            result = checked.pop("result")
            result_mode = "clear" if result is None else "set"
            result_raw = json.dumps(result) if result is not None else ""
        for fixed in ("id", "updated_at"):
            checked.pop(fixed, None)
        event = ""
        if "status" in checked:
            event = NodeStatusChanged(
                run=run_id,
                node=node_id,
                status=checked["status"],
                attempt=checked.get("attempt", expect_attempt),
                reason=checked.get("error"),
            ).model_dump_json()
        k = self.keys
        reply = await self._lua.transition(
            keys=[k.nodes(run_id), k.results(run_id), k.events(run_id), k.jobs],
            args=[
                node_id,
                expect_attempt,
                json.dumps(sorted(expect_status)),
                json.dumps(checked),
                result_mode,
                result_raw,
                now(),
                self._maxlen,
                event,
                enqueue.model_dump_json() if enqueue is not None else "",
            ],
        )
        if not reply:
            return None
        raw, result_now = reply
        return load_node(raw, result_now)
