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


def _run_from_hash(run_id: str, h: dict[str, str]) -> RunRecord:
    usage = Usage(
        cost_usd=float(h.get("cost_usd", 0)), **{k: int(h.get(k, 0)) for k in _USAGE_INTS}
    )
    finished = h.get("finished_at")
    return RunRecord(
        id=run_id,
        spec=RunSpec.model_validate_json(h["spec"]),
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
        h = await self._r.hgetall(self.keys.run(run_id))
        if not h:
            raise NotFound(f"unknown run id {run_id!r}")
        return _run_from_hash(run_id, h)

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

    async def save_plan(self, run_id: str, plan: Plan) -> None:
        raw = plan.model_dump_json()
        event = PlanStored(run=run_id, revision=plan.revision, nodes=len(plan.nodes))
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.plan(run_id), raw)
            pipe.rpush(self.keys.plans(run_id), raw)
            pipe.xadd(
                self.keys.events(run_id),
                {"e": event.model_dump_json()},
                maxlen=self._maxlen,
                approximate=True,
            )
            await pipe.execute()

    async def get_plan(self, run_id: str) -> Plan | None:
        raw = await self._r.get(self.keys.plan(run_id))
        return Plan.model_validate_json(raw) if raw else None

    async def plan_history(self, run_id: str) -> list[Plan]:
        raws = await self._r.lrange(self.keys.plans(run_id), 0, -1)
        return [Plan.model_validate_json(r) for r in raws]

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
        **changes: Any,
    ) -> NodeState | None:
        """Compare-and-set on (attempt, status): the new state, or None when it was stale."""
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
            keys=[k.nodes(run_id), k.results(run_id), k.events(run_id)],
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
            ],
        )
        if not reply:
            return None
        raw, result_now = reply
        return load_node(raw, result_now)
