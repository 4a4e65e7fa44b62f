"""A run's keys, whole: dumped for `swarm export`, restored by `swarm import`, expired after.

The dump is raw (the JSON strings Redis holds, stream entries with their ids), so a restore
is faithful; swarm/archive.py turns it into the readable file format and back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from redis.exceptions import ResponseError

from swarm.errors import NotFound, UserError
from swarm.models import now
from swarm.store.base import StoreBase
from swarm.store.keys import Keys


class Entry(BaseModel):
    id: str
    fields: dict[str, str]


class RunDump(BaseModel):
    run: str
    fields: dict[str, str]  # the run hash
    plan: str | None = None
    plans: list[str] = Field(default_factory=list)
    nodes: dict[str, str] = Field(default_factory=dict)
    results: dict[str, str] = Field(default_factory=dict)
    replanned: list[str] = Field(default_factory=list)
    calls: dict[str, str] = Field(default_factory=dict)
    done: list[Entry] = Field(default_factory=list)
    events: list[Entry] = Field(default_factory=list)
    steps: dict[str, list[Entry]] = Field(default_factory=dict)


class ArchiveStore(StoreBase):
    async def dump_run(self, run_id: str) -> RunDump:
        k, r = self.keys, self._r
        fields = await r.hgetall(k.run(run_id))
        if not fields:
            raise NotFound(f"unknown run id {run_id!r}")
        nodes = await r.hgetall(k.nodes(run_id))
        return RunDump(
            run=run_id, fields=fields, plan=await r.get(k.plan(run_id)),
            plans=await r.lrange(k.plans(run_id), 0, -1), nodes=nodes,
            results=await r.hgetall(k.results(run_id)),
            replanned=sorted(await r.smembers(k.replanned(run_id))),
            calls=await r.hgetall(k.calls(run_id)),
            done=await self._entries(k.done(run_id)),
            events=await self._entries(k.events(run_id)),
            steps={nid: await self._entries(k.steps(run_id, nid)) for nid in nodes},
        )

    async def _entries(self, stream: str) -> list[Entry]:
        out: list[Entry] = []
        cursor = "-"
        while True:
            batch = await self._r.xrange(stream, min=cursor, max="+", count=1000)
            out += [Entry(id=i, fields=f) for i, f in batch]
            if len(batch) < 1000:
                return out
            cursor = "(" + batch[-1][0]

    async def run_exists(self, run_id: str) -> bool:
        return bool(await self._r.exists(self.keys.run(run_id)))

    async def restore_run(self, dump: RunDump) -> None:
        """Write a dumped run back; refuses a run id that exists (UserError)."""
        k, run = self.keys, dump.run
        if await self._r.exists(k.run(run)):
            raise UserError(f"run {run} already exists in this Redis; not imported")
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(k.run(run), mapping=dump.fields)
            pipe.zadd(k.runs, {run: float(dump.fields.get("created_at", now()))})
            if dump.plan is not None:
                pipe.set(k.plan(run), dump.plan)
            if dump.plans:
                pipe.rpush(k.plans(run), *dump.plans)
            for key, mapping in ((k.nodes(run), dump.nodes), (k.results(run), dump.results),
                                 (k.calls(run), dump.calls)):
                if mapping:
                    pipe.hset(key, mapping=mapping)
            if dump.replanned:
                pipe.sadd(k.replanned(run), *dump.replanned)
            streams = [(k.done(run), dump.done), (k.events(run), dump.events)]
            streams += [(k.steps(run, nid), entries) for nid, entries in dump.steps.items()]
            for stream, entries in streams:
                for entry in entries:
                    pipe.xadd(stream, entry.fields, id=entry.id)
            await pipe.execute()
        # Completions in the file were all applied: the group starts after them.
        try:
            await self._r.xgroup_create(k.done(run), Keys.COORDINATOR, id="$", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _run_keys(self, run_id: str) -> list[str]:
        nodes = await self._r.hkeys(self.keys.nodes(run_id))
        return self.keys.run_keys(run_id, nodes)

    async def expire_run(self, run_id: str, ttl_s: float) -> None:
        """Every key of the run goes away in `ttl_s` (retention after export)."""
        ms = max(1, round(ttl_s * 1000))
        keys = await self._run_keys(run_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.run(run_id), "exported_at", now())
            for key in keys:
                pipe.pexpire(key, ms)
            await pipe.execute()

    async def persist_run(self, run_id: str) -> None:
        """Undo expire_run (a finished run reopened)."""
        keys = await self._run_keys(run_id)
        async with self._r.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.persist(key)
            pipe.hdel(self.keys.run(run_id), "exported_at")
            await pipe.execute()

    async def run_ttl_s(self, run_id: str) -> float | None:
        """Seconds until the run expires from Redis; None if it does not."""
        ms: int = await self._r.pttl(self.keys.run(run_id))
        return ms / 1000 if ms >= 0 else None

    async def prune_run_index(self) -> int:
        """Drop ids of runs whose record expired from the runs index; returns how many."""
        ids: list[str] = await self._r.zrange(self.keys.runs, 0, -1)
        gone: list[Any] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            async with self._r.pipeline(transaction=False) as pipe:
                for run_id in chunk:
                    pipe.exists(self.keys.run(run_id))
                found = await pipe.execute()
            gone += [i for i, there in zip(chunk, found, strict=True) if not there]
        if gone:
            await self._r.zrem(self.keys.runs, *gone)
        return len(gone)
