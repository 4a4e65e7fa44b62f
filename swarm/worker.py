"""A worker process: takes node jobs from Redis and runs many of them at once.

Every job it holds is heartbeated; a job whose fence was taken by another worker (after a
pause past its lease) is cancelled here at once, and the store refuses its writes anyway.
On shutdown it stops claiming, lets each agent finish the step in flight (which is
checkpointed), then hands the job back so another worker continues from that step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from swarm.agent import Agent, AgentFailed, Halted
from swarm.errors import FencedOut, RedisUnavailable, SwarmError
from swarm.llm import LLM
from swarm.models import (
    TERMINAL_RUN_STATUSES,
    Claim,
    Completion,
    NodeResult,
    NodeSpec,
    RunRecord,
    Usage,
)
from swarm.node_kinds import run_command_node, run_merge_node
from swarm.replay import NodeRecorder, RecordedChat
from swarm.sandbox.base import SandboxBackend
from swarm.settings import Settings
from swarm.store import Store

log = logging.getLogger(__name__)

RUN_REFRESH_S = 1.0  # how stale a worker's view of a run's status/budget may be


def uptime() -> float:
    """A clock that keeps counting while the process is stopped and while the machine
    sleeps (CLOCK_MONOTONIC stops during suspend on Linux), so a pause shows as one."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


@dataclass
class Held:
    claim: Claim
    scope: anyio.CancelScope
    completing: bool = False  # its completion is being written: a heartbeat must not cancel it
    beat_at: float = field(default_factory=uptime)  # the last time the fence was confirmed


class Worker:
    def __init__(self, store: Store, llm: LLM, sandboxes: SandboxBackend, settings: Settings,
                 *, slots: int, name: str) -> None:
        self.store, self.llm, self.sandboxes, self.settings = store, llm, sandboxes, settings
        self.slots, self.name = slots, name
        self.held: dict[str, Held] = {}
        self.stopping = False
        self._runs: dict[str, RunRecord] = {}
        self._room = anyio.Event()

    # ---- the process --------------------------------------------------------------------

    async def serve(self, stop: anyio.Event) -> None:
        """Run until `stop` is set, then drain gracefully."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats)
            tg.start_soon(self._refresh_runs)
            tg.start_soon(self._reclaimer, tg)
            tg.start_soon(self._claimer, tg, stop)
            await stop.wait()
            self.stopping = True
            while self.held:  # each job's end sets _room
                self._room = anyio.Event()
                await self._room.wait()
            tg.cancel_scope.cancel()

    async def _claimer(self, tg: anyio.abc.TaskGroup, stop: anyio.Event) -> None:
        while not stop.is_set():
            free = self.slots - len(self.held)
            if free <= 0:
                self._room = anyio.Event()
                with anyio.move_on_after(1):
                    await self._room.wait()
                continue
            for claim in await self.store.claim(self.name, count=min(free, 100), block_ms=500):
                self._start(tg, claim)

    async def _reclaimer(self, tg: anyio.abc.TaskGroup) -> None:
        idle_ms = int(self.settings.lease_ttl_s * 1000)
        while True:
            await anyio.sleep(self.settings.lease_ttl_s / 2)
            free = self.slots - len(self.held)
            if free > 0 and not self.stopping:
                for claim in await self.store.reclaim(self.name, idle_ms, count=free):
                    self._start(tg, claim)

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            batch = [(key, held) for key, held in self.held.items() if not held.completing]
            beats = await self.store.heartbeat_many([held.claim for _, held in batch])
            now = uptime()
            for (key, held), alive in zip(batch, beats, strict=True):
                if alive:
                    held.beat_at = now
                elif not held.completing and self.held.get(key) is held:
                    log.warning("fenced out of %s; stopping it", key)
                    held.scope.cancel()

    async def _guard(self, held: Held) -> None:
        """Before an agent spends a model call or runs tools: if the fence has not been
        confirmed for a while (this process was stopped, the machine slept, the loop
        stalled), confirm it first. A job reclaimed meanwhile stops here, before it acts."""
        stale_after = max(2 * self.settings.heartbeat_s, self.settings.lease_ttl_s / 2)
        if uptime() - held.beat_at < stale_after:
            return
        if not await self.store.heartbeat(held.claim):
            job = held.claim.job
            raise FencedOut(f"node {job.node!r} of run {job.run!r} was reclaimed while this "
                            "worker was paused")
        held.beat_at = uptime()

    async def _refresh_runs(self) -> None:
        while True:
            await anyio.sleep(RUN_REFRESH_S)
            for run_id in {h.claim.job.run for h in self.held.values()}:
                self._runs[run_id] = await self.store.get_run(run_id)

    def _start(self, tg: anyio.abc.TaskGroup, claim: Claim) -> None:
        key = f"{claim.job.run}/{claim.job.node}"
        old = self.held.get(key)
        if old is not None:  # reclaimed by this very worker (it stalled past its lease):
            old.scope.cancel()  # the old copy's token is stale; only the new one may write
        held = Held(claim, anyio.CancelScope())
        self.held[key] = held
        tg.start_soon(self._run_job, held, key)

    # ---- one job ------------------------------------------------------------------------

    async def _run_job(self, held: Held, key: str) -> None:
        claim = held.claim
        try:
            with held.scope:
                completion = await self._execute(claim, held)
                held.completing = True
                await self.store.complete(claim, completion)
        except FencedOut:
            log.warning("job %s was taken over by another worker; dropped it", key)
        except Halted as stop:
            await self._halted(claim, str(stop))
        except RedisUnavailable as exc:
            # Not the node's fault: record nothing. The job stays pending and is reclaimed
            # (by any worker, this one too) once Redis is back, from its last checkpoint.
            log.warning("job %s abandoned, Redis is unavailable: %s", key, exc)
        finally:
            if self.held.get(key) is held:
                del self.held[key]
            self._room.set()

    async def _halted(self, claim: Claim, reason: str) -> None:
        try:
            if self.stopping:
                await self.store.release(claim)  # another worker resumes from the last step
            else:
                await self.store.complete(claim, Completion(
                    run=claim.job.run, node=claim.job.node, attempt=claim.job.attempt,
                    status="failed", error=f"stopped: {reason}"))
        except FencedOut:
            pass

    async def _execute(self, claim: Claim, held: Held) -> Completion:
        job = claim.job
        base = Completion(run=job.run, node=job.node, attempt=job.attempt, status="failed")
        try:
            run = self._runs.get(job.run) or await self.store.get_run(job.run)
            self._runs[job.run] = run
            plan = await self.store.get_plan(job.run)
            if plan is None or job.node not in plan.by_id():
                return base.model_copy(update={"error": "node is not in the run's plan"})
            spec = plan.by_id()[job.node]
            result, usage = await self._dispatch(claim, run, spec, held)
            if spec.kind not in ("agent", "merge"):  # those charge the run as they checkpoint
                await self.store.add_run_usage(run.id, usage)
            return base.model_copy(update={"status": "done", "result": result, "usage": usage})
        except (FencedOut, Halted, RedisUnavailable):
            raise
        except AgentFailed as exc:
            return base.model_copy(update={"error": str(exc)})
        except SwarmError as exc:
            return base.model_copy(update={"error": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # the job boundary: any bug becomes a recorded failure
            log.exception("job %s/%s crashed", job.run, job.node)
            return base.model_copy(update={"error": f"internal error: {type(exc).__name__}: {exc}"})

    async def _dispatch(self, claim: Claim, run: RunRecord, spec: NodeSpec,
                        held: Held) -> tuple[NodeResult, Usage]:
        inputs = await self._inputs(run.id, spec)
        if spec.kind == "merge":
            # Each merger call is checkpointed in the node's step stream as it returns; a
            # rerun (after a crash) replays those and asks only for the rest.
            recorded = RecordedChat(self.llm, NodeRecorder(self.store, claim))
            return await run_merge_node(recorded, run, spec, inputs)
        if spec.kind == "swarm":
            raise AgentFailed(f"nested swarm depth limit of {self.settings.max_depth} reached")
        mounts = {f"/deps/{d}": self._workspace(run.id, d) for d in spec.deps}
        mounts.update({k: Path(v) for k, v in run.spec.mounts.items()})
        sandbox = await self.sandboxes.open(run.id, spec.id, network=spec.network, mounts=mounts)
        try:
            if spec.kind == "command":
                return await run_command_node(sandbox, spec)
            agent = Agent(run=run.id, goal=run.spec.goal, spec=spec, claim=claim,
                          store=self.store, llm=self.llm, sandbox=sandbox, inputs=inputs,
                          model=run.spec.models.get("worker"),
                          halt=lambda seen: self._halt(run.id, seen),
                          guard=lambda: self._guard(held))
            return await agent.run_to_end()
        finally:
            with anyio.CancelScope(shield=True):
                await self.sandboxes.close(sandbox)

    def _halt(self, run_id: str, seen: Usage | None = None) -> str | None:
        """Why an agent of this run should stop after its current step, if it should.
        `seen`: the run's usage as the agent's last step write returned it, fresher than
        the periodic refresh, so every agent of the run stops within a step of a budget."""
        if self.stopping:
            return "worker shutting down"
        run = self._runs.get(run_id)
        if run is None:
            return None
        if seen is not None and seen.steps > run.usage.steps:
            run = run.model_copy(update={"usage": seen})
            self._runs[run_id] = run
        if run.status in TERMINAL_RUN_STATUSES or run.status == "merging":
            return f"run is {run.status}"
        return run.spec.budget.exceeded_by(run.usage, run.elapsed_s)

    async def _inputs(self, run_id: str, spec: NodeSpec) -> dict[str, str]:
        out = {}
        for dep in spec.deps:
            state = await self.store.get_node(run_id, dep)
            out[dep] = state.result.summary if state.result else "(no result)"
        return out

    def _workspace(self, run_id: str, node: str) -> Path:
        return self.settings.workspaces_dir / run_id / node
