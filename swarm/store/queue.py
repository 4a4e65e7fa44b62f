"""The work queue (jobs stream, group `workers`), checkpoints and completions.

Delivery is at least once. Every write a worker makes about a job is fenced by the token it
got when it claimed the job (scripts.py), so duplicates and zombies cannot overwrite newer
state, and the job is acknowledged only inside the fenced completion.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from redis.exceptions import NoScriptError, ResponseError

from swarm.errors import FencedOut
from swarm.models import (
    Claim,
    Completion,
    Event,
    Job,
    LogLine,
    NodeStatusChanged,
    StepRecord,
    Usage,
    now,
)
from swarm.store.base import StoreBase
from swarm.store.keys import Keys

Entry = tuple[str, dict[str, str] | None]


def _fenced(claim: Claim, what: str) -> FencedOut:
    job = claim.job
    return FencedOut(
        f"{what}: node {job.node!r} attempt {job.attempt} of run {job.run!r} is no longer "
        f"held by token {claim.token}"
    )


def _parse_job(fields: dict[str, str] | None) -> Job | None:
    try:
        return Job.model_validate_json(fields["job"]) if fields else None
    except (KeyError, ValidationError):
        return None


class QueueStore(StoreBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (run, consumer) -> last pending completion id re-read; None once caught up.
        self._history: dict[tuple[str, str], str | None] = {}

    # ---- jobs --------------------------------------------------------------------------

    async def enqueue(self, job: Job) -> str:
        entry: str = await self._r.xadd(self.keys.jobs, {"job": job.model_dump_json()})
        return entry

    async def claim(self, consumer: str, count: int = 1, block_ms: int = 1000) -> list[Claim]:
        """New jobs for `consumer`, each fenced with a fresh token; stale ones are dropped.

        block_ms 0 means do not wait (unlike Redis, where 0 waits forever).
        """
        if count <= 0:
            return []
        entries = await self._read_group(
            self.keys.jobs, Keys.WORKERS, consumer, ">", count, block_ms
        )
        claims = []
        for entry_id, fields in entries:
            job = _parse_job(fields)
            if job is None:
                await self._bury(entry_id, fields, "malformed job entry")
                continue
            keys, args = self._job_call(job, entry_id, consumer)
            token = await self._lua.start(keys=keys, args=args)
            if token:
                claims.append(Claim(job=job, entry_id=entry_id, token=token))
        return claims

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = 50) -> list[Claim]:
        """Take over jobs whose holder stopped heartbeating; dead-letter the ones delivered
        more than settings.max_deliveries times (their node goes dead, with the reason)."""
        claims: list[Claim] = []
        cursor = "0-0"
        while len(claims) < count:
            reply = await self._r.xautoclaim(
                self.keys.jobs, Keys.WORKERS, consumer, min_idle_ms, cursor, count=count
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                claim = await self._reclaim_one(consumer, entry_id, fields)
                if claim:
                    claims.append(claim)
            if cursor == "0-0":
                break
        return claims

    async def _reclaim_one(
        self, consumer: str, entry_id: str, fields: dict[str, str] | None
    ) -> Claim | None:
        job = _parse_job(fields)
        if job is None:
            await self._bury(entry_id, fields, "malformed job entry")
            return None
        keys, args = self._job_call(job, entry_id, consumer)
        token, deliveries = await self._lua.reclaim(keys=keys, args=args)
        if token <= 0:
            return None
        return Claim(job=job, entry_id=entry_id, token=token, deliveries=deliveries)

    def _job_call(self, job: Job, entry_id: str, consumer: str) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV in the layout scripts.JOB_PRELUDE expects."""
        k = self.keys
        keys = [
            k.jobs,
            k.nodes(job.run),
            k.holders(job.run),
            k.fence,
            k.events(job.run),
            k.dead,
            k.done(job.run),
        ]
        args = [
            Keys.WORKERS,
            entry_id,
            job.run,
            job.node,
            job.attempt,
            consumer,
            now(),
            self._maxlen,
            self.settings.max_deliveries,
            job.model_dump_json(),
        ]
        return keys, args

    async def _bury(self, entry_id: str, fields: dict[str, str] | None, reason: str) -> None:
        """Move an entry nobody can run to the dead-letter stream, so it stops coming back."""
        raw = json.dumps(fields or {})
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dead, {"job": raw, "reason": reason, "entry": entry_id, "at": now()}
            )
            pipe.xack(self.keys.jobs, Keys.WORKERS, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            await pipe.execute()

    async def heartbeat(self, claim: Claim) -> bool:
        """Keep the job from being reclaimed. False: fenced out, stop working on it."""
        k, job = self.keys, claim.job
        ok = await self._lua.heartbeat(
            keys=[k.nodes(job.run), k.jobs],
            args=[job.node, claim.token, Keys.WORKERS, claim.entry_id],
        )
        return bool(ok)

    async def heartbeat_many(self, claims: list[Claim]) -> list[bool]:
        """`heartbeat` for every job a worker holds, in one round trip: one at a time, a
        busy worker's pass over hundreds of jobs can outlast the lease it is renewing."""
        if not claims:
            return []
        k = self.keys
        for attempt in (1, 2):
            try:
                async with self._r.pipeline(transaction=False) as pipe:
                    for claim in claims:
                        job = claim.job
                        await self._lua.heartbeat(
                            keys=[k.nodes(job.run), k.jobs],
                            args=[job.node, claim.token, Keys.WORKERS, claim.entry_id],
                            client=pipe,
                        )
                    replies = await pipe.execute()
                break
            except NoScriptError:
                # Redis restarted between the pipeline loading the script and running it
                # (redis-py resends a pipeline after a broken connection, but does not
                # load its scripts again): the next execute loads it.
                if attempt == 2:
                    raise
        return [bool(r) for r in replies]

    async def release(self, claim: Claim) -> None:
        """Hand the job back (worker shutting down): queued again, for any worker to take."""
        k, job = self.keys, claim.job
        event = NodeStatusChanged(
            run=job.run, node=job.node, status="queued", attempt=job.attempt, reason="released"
        )
        entry = await self._lua.release(
            keys=[k.nodes(job.run), k.holders(job.run), k.jobs, k.events(job.run)],
            args=[
                job.node,
                claim.token,
                now(),
                self._maxlen,
                Keys.WORKERS,
                claim.entry_id,
                job.model_dump_json(),
                event.model_dump_json(),
            ],
        )
        if entry is None:
            raise _fenced(claim, "release")

    async def complete(self, claim: Claim, completion: Completion) -> None:
        """Record the attempt's outcome, report it to the coordinator, ack the job: all or
        nothing, and nothing at all for a holder whose token is stale (FencedOut)."""
        k, job = self.keys, claim.job
        if (completion.run, completion.node, completion.attempt) != (
            job.run,
            job.node,
            job.attempt,
        ):
            raise ValueError(f"completion {completion!r} does not match claimed job {job!r}")
        event = NodeStatusChanged(
            run=job.run,
            node=job.node,
            status=completion.status,
            attempt=job.attempt,
            reason=completion.error,
        )
        result = completion.result.model_dump_json() if completion.result else ""
        recorded = await self._lua.complete(
            keys=[
                k.nodes(job.run),
                k.results(job.run),
                k.holders(job.run),
                k.done(job.run),
                k.jobs,
                k.events(job.run),
            ],
            args=[
                job.node,
                claim.token,
                now(),
                self._maxlen,
                Keys.WORKERS,
                claim.entry_id,
                completion.status,
                json.dumps(completion.error),
                completion.usage.model_dump_json(),
                result,
                completion.model_dump_json(),
                event.model_dump_json(),
            ],
        )
        if not recorded:
            raise _fenced(claim, "complete")

    async def finish_node(self, run_id: str, completion: Completion) -> bool:
        """Record the end of an attempt no worker claimed (a nested swarm node): like
        `complete`, as a compare-and-set on (attempt, running) instead of a fence.
        False when the node moved on."""
        if completion.run != run_id:
            raise ValueError(f"completion for run {completion.run!r} given for run {run_id!r}")
        k = self.keys
        event = NodeStatusChanged(
            run=run_id,
            node=completion.node,
            status=completion.status,
            attempt=completion.attempt,
            reason=completion.error,
        )
        result = completion.result.model_dump_json() if completion.result else ""
        recorded = await self._lua.finish_node(
            keys=[k.nodes(run_id), k.results(run_id), k.done(run_id), k.events(run_id)],
            args=[
                completion.node,
                completion.attempt,
                now(),
                self._maxlen,
                completion.status,
                json.dumps(completion.error),
                completion.usage.model_dump_json(),
                result,
                completion.model_dump_json(),
                event.model_dump_json(),
            ],
        )
        return bool(recorded)

    async def pending_jobs(self, count: int = 100) -> list[dict[str, Any]]:
        """Jobs delivered but not yet acknowledged, oldest first:
        {"id", "consumer", "idle_ms", "deliveries"} (for `doctor`, `status` and tests)."""
        rows = await self._r.xpending_range(
            self.keys.jobs, Keys.WORKERS, min="-", max="+", count=count
        )
        return [
            {
                "id": row["message_id"],
                "consumer": row["consumer"],
                "idle_ms": row["time_since_delivered"],
                "deliveries": row["times_delivered"],
            }
            for row in rows
        ]

    async def queued_jobs(self, run_id: str) -> set[tuple[str, int]]:
        """(node, attempt) of every job of the run still on the queue (waiting or held)."""
        out: set[tuple[str, int]] = set()
        cursor = "-"
        while True:
            entries = await self._r.xrange(self.keys.jobs, min=cursor, max="+", count=1000)
            for _entry_id, fields in entries:
                job = _parse_job(fields)
                if job is not None and job.run == run_id:
                    out.add((job.node, job.attempt))
            if len(entries) < 1000:
                return out
            cursor = "(" + entries[-1][0]

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: {"id", "job" (parsed), "reason", "entry", "deliveries", "at"}."""
        out = []
        for entry_id, fields in await self._r.xrevrange(self.keys.dead, count=limit):
            record: dict[str, Any] = {"id": entry_id, **fields}
            record["job"] = json.loads(fields.get("job", "null"))
            out.append(record)
        return out

    # ---- checkpoints -------------------------------------------------------------------

    async def append_step(self, claim: Claim, step: StepRecord,
                          event: Event | None = None) -> Usage:
        """The hot path: one round trip per agent step. The step's usage is charged to the
        node and the run in the same script, which answers with the run's new totals (what
        lets a worker stop at a budget without polling)."""
        k, job, u = self.keys, claim.job, step.usage
        totals = await self._lua.append_step(
            keys=[k.nodes(job.run), k.steps(job.run, job.node), k.events(job.run),
                  k.run(job.run)],
            args=[
                job.node,
                claim.token,
                now(),
                self._maxlen,
                step.model_dump_json(),
                event.model_dump_json() if event is not None else "",
                u.tokens_in,
                u.tokens_out,
                u.llm_calls,
                u.steps,
                repr(u.cost_usd),
            ],
        )
        if not totals:
            raise _fenced(claim, "append_step")
        tin, tout, calls, steps, cost = (v or 0 for v in totals)
        return Usage(tokens_in=int(tin), tokens_out=int(tout), llm_calls=int(calls),
                     steps=int(steps), cost_usd=float(cost))

    async def load_steps(self, run_id: str, node_id: str) -> list[StepRecord]:
        entries = await self._r.xrange(self.keys.steps(run_id, node_id))
        steps: list[StepRecord] = []
        last = None
        for _entry_id, fields in entries:
            # redis-py retries a command whose connection broke mid-flight, so the same
            # step can land twice in a row; an identical payload is that, not a new step.
            if fields["s"] != last:
                steps.append(StepRecord.model_validate_json(fields["s"]))
            last = fields["s"]
        return steps

    async def replace_steps(self, claim: Claim, steps: list[StepRecord]) -> None:
        """Compaction: the node's checkpoint stream becomes exactly `steps`."""
        k, job = self.keys, claim.job
        ok = await self._lua.replace_steps(
            keys=[k.nodes(job.run), k.steps(job.run, job.node)],
            args=[job.node, claim.token, *(s.model_dump_json() for s in steps)],
        )
        if not ok:
            raise _fenced(claim, "replace_steps")

    # ---- completions (coordinator side) ------------------------------------------------

    async def read_completions(
        self, run_id: str, consumer: str, count: int = 100, block_ms: int = 1000
    ) -> list[tuple[str, Completion]]:
        """Completions for the run's coordinator. A new Store (a restarted coordinator) first
        takes over and re-reads every unacked completion, then waits for new ones."""
        stream, group = self.keys.done(run_id), Keys.COORDINATOR
        key = (run_id, consumer)
        if key not in self._history:
            await self._adopt_pending(stream, consumer)
        cursor = self._history.get(key, "0")
        if cursor is not None:
            entries = await self._read_group(stream, group, consumer, cursor, count, 0)
            if entries:
                self._history[key] = entries[-1][0]
                return await self._completions(run_id, entries)
            self._history[key] = None
        entries = await self._read_group(stream, group, consumer, ">", count, block_ms)
        return await self._completions(run_id, entries)

    async def _adopt_pending(self, stream: str, consumer: str) -> None:
        """Move completions a previous coordinator read but never acked to `consumer`.

        One coordinator leads a run (a lease), so other consumers' entries are orphans.
        """
        await self._ensure_group(stream, Keys.COORDINATOR)
        cursor = "0-0"
        while True:
            reply = await self._r.xautoclaim(
                stream, Keys.COORDINATOR, consumer, 0, cursor, count=500
            )
            cursor = reply[0]
            if cursor == "0-0":
                return

    async def _completions(self, run_id: str, entries: list[Entry]) -> list[tuple[str, Completion]]:
        out = []
        for entry_id, fields in entries:
            try:
                out.append((entry_id, Completion.model_validate_json((fields or {})["c"])))
            except (KeyError, ValidationError) as e:
                # Trimmed or corrupt: ack it, or a restarted coordinator trips on it forever.
                await self.ack_completion(run_id, entry_id)
                await self.emit(
                    LogLine(run=run_id, level="error", message=f"bad completion {entry_id}: {e}")
                )
        return out

    async def ack_completion(self, run_id: str, entry_id: str) -> None:
        await self._r.xack(self.keys.done(run_id), Keys.COORDINATOR, entry_id)

    async def _read_group(
        self, stream: str, group: str, consumer: str, entry_id: str, count: int, block_ms: int
    ) -> list[Entry]:
        """XREADGROUP on one stream; recreates the group if Redis lost it (NOGROUP)."""
        for attempt in (1, 2):
            try:
                reply = await self._r.xreadgroup(
                    group, consumer, {stream: entry_id}, count=count, block=block_ms or None
                )
                break
            except ResponseError as e:
                if "NOGROUP" not in str(e) or attempt == 2:
                    raise
                await self._ensure_group(stream, group)
        return [entry for _stream, entries in reply or [] for entry in entries]
