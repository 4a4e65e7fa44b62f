"""Resume, one crash window at a time: each test builds the state a crash at one precise
moment leaves in Redis, then resumes, and checks that the run continues where it stopped
without redoing anything. In-process (fast); the subprocess chaos is in test_kill_*.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

from swarm.commands import list_runs, wait_for_dead_leader
from swarm.coordinator import LostLeadership, leader_lease
from swarm.errors import UserError
from swarm.models import Completion, Job, NodeSpec, Plan, RunSpec, StepRecord, Usage
from swarm.node_kinds import run_merge_node
from swarm.replay import NodeRecorder, RecordedChat
from swarm.runtime import run_in_process
from swarm.store import Store

pytestmark = pytest.mark.anyio


def plan_of(*nodes: NodeSpec) -> Plan:
    return Plan(nodes=list(nodes))


async def started_run(store: Store, plan: Plan, **spec: Any) -> str:
    """A run as its leader leaves it right after planning: plan stored, nodes pending."""
    rec = await store.create_run(RunSpec(goal="resume test", sandbox="local", plan=plan,
                                         **spec))
    await store.save_plan(rec.id, plan)
    await store.set_run_status(rec.id, "running", expect={"planning"})
    return rec.id


def calls_of(sim: Any, run: str, node: str) -> int:
    return sum(c for key, c in sim.stats()["by_step"].items()
               if key.startswith(f"{run}/{node}/"))


async def done_completions(store: Store, run: str) -> Counter[str]:
    entries = await store._r.xrange(store.keys.done(run))
    return Counter(Completion.model_validate_json(f["c"]).node for _, f in entries
                   if Completion.model_validate_json(f["c"]).status == "done")


async def test_a_node_queued_without_its_job_is_requeued_once(runtime: Any, tmp_path: Any
                                                              ) -> None:
    """The window the old coordinator had: node moved to queued, crash, job never sent."""
    async with runtime() as (rt, sim):
        plan = plan_of(NodeSpec(id="a"), NodeSpec(id="b"))
        run = await started_run(rt.store, plan, output_dir=str(tmp_path / "out"))
        lost = await rt.store.transition(run, "a", expect_attempt=0, expect_status={"pending"},
                                         status="queued", attempt=1)  # and no job
        assert lost is not None and await rt.store.queued_jobs(run) == set()
        with anyio.fail_after(30):  # before the fix: waits forever for a job never sent
            await run_in_process(rt, run, slots=4)
        final = await rt.store.get_run(run)
        node = await rt.store.get_node(run, "a")
        assert final.status == "done", final.error
        assert node.status == "done" and node.attempt == 1  # the same attempt, not a new one
        assert (await done_completions(rt.store, run))["a"] == 1
        assert calls_of(sim, run, "a") == 3  # two tool steps and finish, each asked once


async def test_queue_transition_and_job_are_one_write(runtime: Any) -> None:
    async with runtime() as (rt, _sim):
        run = await started_run(rt.store, plan_of(NodeSpec(id="a")))
        moved = await rt.store.transition(run, "a", expect_attempt=0, expect_status={"pending"},
                                          status="queued", attempt=1,
                                          enqueue=Job(run=run, node="a", attempt=1))
        assert moved is not None and await rt.store.queued_jobs(run) == {("a", 1)}
        stale = await rt.store.transition(run, "a", expect_attempt=0, expect_status={"pending"},
                                          status="queued", attempt=1,
                                          enqueue=Job(run=run, node="a", attempt=1))
        assert stale is None and await rt.store.queued_jobs(run) == {("a", 1)}  # no second job


async def test_a_death_whose_replan_was_lost_is_replanned_on_resume(runtime: Any, tmp_path: Any
                                                                    ) -> None:
    """The leader marked a node dead, then died before storing the revised plan."""
    async with runtime() as (rt, _sim):
        plan = plan_of(NodeSpec(id="a"), NodeSpec(id="b"),
                       NodeSpec(id="merge", kind="merge", role="merger", deps=["a", "b"]))
        run = await started_run(rt.store, plan, output_dir=str(tmp_path / "out"))
        dead = await rt.store.transition(run, "b", expect_attempt=0, expect_status={"pending"},
                                         status="dead", attempt=3, error="failed 3 times")
        assert dead is not None
        with anyio.fail_after(30):
            await run_in_process(rt, run, slots=4)
        plans = await rt.store.plan_history(run)
        nodes = await rt.store.get_nodes(run)
        assert len(plans) == 2 and "b-r1" in plans[-1].by_id()
        assert nodes["b-r1"].status == "done" and nodes["merge"].status == "done"
        assert "b@3" in await rt.store.replanned(run)
        # a second resume owes nothing: no third plan
        await rt.store.set_run_status(run, "running", expect={"failed"})
        await run_in_process(rt, run, slots=4)
        assert len(await rt.store.plan_history(run)) == 2


async def test_merge_stage_rerun_replays_recorded_model_calls(runtime: Any, tmp_path: Any
                                                              ) -> None:
    """A crash in the merge stage: the rerun replays the synthesis and the merge agent's
    conflict resolution from their records instead of asking the model again."""
    goal_plan = plan_of(
        NodeSpec(id="left", instructions="Edit [sim:write shared.md]"),
        NodeSpec(id="right", instructions="Edit [sim:write shared.md]"),
        NodeSpec(id="solo"))  # three sinks: the stage synthesises them with the model
    async with runtime() as (rt, sim):
        out = tmp_path / "out"
        run = await started_run(rt.store, goal_plan, output_dir=str(out))
        await run_in_process(rt, run, slots=4)
        first = await rt.store.get_run(run)
        assert first.status == "done", first.error
        shared = (out / "shared.md").read_text()
        assert "<<<<<<<" not in shared
        keys = sim.stats()["by_step"]
        assert any("merge-agent" in k for k in keys)  # the conflict went to the merge agent
        assert any(f"{run}/merge:L0:0/" in k for k in keys)  # the sinks were synthesised
        calls, spent = sim.stats()["total"], first.usage
        # What a leader that died in the merge stage leaves: the run `merging`.
        await rt.store.set_run_status(run, "merging", expect={"done"})
        with anyio.fail_after(30):
            await rt.coordinator().lead(run)
        again = await rt.store.get_run(run)
        assert again.status == "done"
        assert sim.stats()["total"] == calls  # no model call repeated
        assert again.result_summary == first.result_summary
        assert (out / "shared.md").read_text() == shared
        assert again.usage == spent  # replays are not charged twice


async def test_merge_node_rerun_replays_its_recorded_calls(runtime: Any) -> None:
    """A worker killed in the middle of a merge node's tree of merger calls: the next
    attempt replays the calls recorded in the node's step stream."""
    async with runtime() as (rt, sim):
        inputs = {f"n{i:02d}": f"finding {i}" for i in range(20)}
        spec = NodeSpec(id="m", kind="merge", role="merger", deps=list(inputs))
        run = await started_run(rt.store, plan_of(spec))
        await rt.store.transition(run, "m", expect_attempt=0, expect_status={"pending"},
                                  status="queued", attempt=1,
                                  enqueue=Job(run=run, node="m", attempt=1))
        (claim,) = await rt.store.claim("w1", block_ms=0)
        rec = await rt.store.get_run(run)
        chat = RecordedChat(rt.llm, NodeRecorder(rt.store, claim))
        result, usage = await run_merge_node(chat, rec, spec, inputs)
        calls = sim.stats()["total"]
        assert calls == 4  # 20 inputs, fan-in 8: 3 merges, then 1
        steps = await rt.store.load_steps(run, "m")
        assert len(steps) == 4 and (await rt.store.get_run(run)).usage.llm_calls == 4
        # The worker dies; another worker runs the node again from its records.
        replay = RecordedChat(rt.llm, NodeRecorder(rt.store, claim))
        result2, usage2 = await run_merge_node(replay, rec, spec, inputs)
        assert sim.stats()["total"] == calls and replay.replayed == 4
        assert result2 == result and usage2 == usage
        assert (await rt.store.get_run(run)).usage.llm_calls == 4


async def test_a_retried_append_is_recorded_and_charged_once(runtime: Any) -> None:
    """redis-py resends a command whose reply was lost with the connection: same step."""
    async with runtime() as (rt, _sim):
        run = await started_run(rt.store, plan_of(NodeSpec(id="a")))
        await rt.store.transition(run, "a", expect_attempt=0, expect_status={"pending"},
                                  status="queued", attempt=1,
                                  enqueue=Job(run=run, node="a", attempt=1))
        (claim,) = await rt.store.claim("w1", block_ms=0)
        step = StepRecord(n=0, kind="assistant", message={"role": "assistant", "content": "x"},
                          usage=Usage(llm_calls=1, steps=1, tokens_in=5))
        await rt.store.append_step(claim, step)
        await rt.store.append_step(claim, step)
        raw = await rt.store._r.xrange(rt.store.keys.steps(run, "a"))
        assert len(raw) == 1
        assert (await rt.store.get_run(run)).usage.llm_calls == 1
        assert (await rt.store.get_node(run, "a")).steps == 1


async def test_resume_waits_out_a_dead_leaders_lease_and_refuses_a_live_one(
    runtime: Any,
) -> None:
    async with runtime() as (rt, _sim):
        run = await started_run(rt.store, plan_of(NodeSpec(id="a")))
        lease = leader_lease(run)
        await rt.store.acquire_lease(lease, "dead-leader", 0.6)
        with anyio.fail_after(3):
            await wait_for_dead_leader(rt.store, run)  # returns once the lease ran out
        assert await rt.store.lease_owner(lease) is None

        async def live_leader() -> None:
            while True:
                await rt.store.acquire_lease(lease, "live-leader", 0.6)
                await anyio.sleep(0.15)

        async with anyio.create_task_group() as tg:
            tg.start_soon(live_leader)
            await anyio.sleep(0.05)
            with pytest.raises(UserError, match="live-leader"):
                await wait_for_dead_leader(rt.store, run)
            tg.cancel_scope.cancel()


async def test_ls_shows_unfinished_runs_without_a_leader_as_resumable(
    runtime: Any, capsys: Any
) -> None:
    import json

    async with runtime() as (rt, _sim):
        orphan = await started_run(rt.store, plan_of(NodeSpec(id="a")))
        led = await started_run(rt.store, plan_of(NodeSpec(id="a")))
        finished = await started_run(rt.store, plan_of(NodeSpec(id="a")))
        await rt.store.acquire_lease(leader_lease(led), "someone", 30)
        await rt.store.set_run_status(finished, "merging", expect={"running"})
        await rt.store.set_run_status(finished, "done", expect={"merging"})
        capsys.readouterr()
        await list_runs(rt.settings, as_json=True)
    rows = {r["run"]: r["resumable"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {orphan: True, led: False, finished: False}


async def test_a_leader_that_loses_its_lease_stops_with_lost_leadership(runtime: Any,
                                                                         tmp_path: Any) -> None:
    async with runtime() as (rt, _sim):  # a leader and no worker: the run waits, led
        plan = plan_of(*(NodeSpec(id=f"n{i}") for i in range(40)))
        run = await started_run(rt.store, plan, output_dir=str(tmp_path / "out"), max_agents=1)
        coordinator = rt.coordinator()

        async def steal() -> None:
            with anyio.fail_after(10):
                while True:  # until the coordinator leads
                    if await rt.store.lease_owner(leader_lease(run)) == coordinator.owner:
                        break
                    await anyio.sleep(0.02)
            await rt.store._r.set(rt.store.keys.lease(leader_lease(run)), "usurper", px=30_000)

        async with anyio.create_task_group() as tg:
            tg.start_soon(steal)
            with pytest.raises(LostLeadership, match="usurper"):
                await coordinator.lead(run)
        assert await rt.store.lease_owner(leader_lease(run)) == "usurper"


async def test_the_store_rides_out_a_redis_restart(redis_factory: Any, tmp_path: Any) -> None:
    """Within settings.redis_outage_s a call waits for Redis to come back instead of failing
    (a worker or leader then carries on as if nothing happened)."""
    import threading
    import time

    from swarm.settings import Settings

    server = redis_factory()
    settings = Settings(home=tmp_path, redis_url=server.url, redis_outage_s=5)
    store = await Store.connect(server.url, settings)
    try:
        rec = await store.create_run(RunSpec(goal="outage"))
        await anyio.sleep(1.1)  # appendfsync everysec: on disk
        server.kill()
        restart = threading.Thread(target=lambda: (time.sleep(1.0), server.start()))
        restart.start()
        with anyio.fail_after(10):
            got = await store.get_run(rec.id)  # issued while Redis is down
        restart.join()
        assert got.id == rec.id
    finally:
        await store.close()
