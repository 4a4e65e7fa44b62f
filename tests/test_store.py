"""swarm.store against a real redis-server: CAS, fencing, reclaim, dead letters, leases."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from swarm import errors
from swarm.models import (
    Claim,
    Completion,
    Job,
    LogLine,
    NodeResult,
    NodeSpec,
    Plan,
    RunSpec,
    StepRecord,
    StepTaken,
    Usage,
)
from swarm.settings import Settings
from swarm.store import Store, new_run_id

pytestmark = pytest.mark.anyio


async def queued(store: Store, node: str = "a", attempt: int = 1, run: str | None = None) -> Job:
    """A run (unless given) with `node` moved to queued at `attempt` and its job enqueued."""
    if run is None:
        run = (await store.create_run(RunSpec(goal="test"))).id
    await store.init_nodes(run, [node])
    current = await store.get_node(run, node)
    moved = await store.transition(
        run,
        node,
        expect_attempt=current.attempt,
        expect_status={current.status},
        status="queued",
        attempt=attempt,
    )
    assert moved is not None
    job = Job(run=run, node=node, attempt=attempt)
    await store.enqueue(job)
    return job


async def claim_one(store: Store, consumer: str) -> Claim:
    claims = await store.claim(consumer, block_ms=0)
    assert len(claims) == 1, claims
    return claims[0]


def done(job: Job, summary: str = "ok") -> Completion:
    return Completion(
        run=job.run,
        node=job.node,
        attempt=job.attempt,
        status="done",
        result=NodeResult(summary=summary, data={"empty": [], "nested": {"l": []}}),
        usage=Usage(tokens_in=10, tokens_out=5, cost_usd=0.01, llm_calls=1, steps=2),
    )


async def event_types(store: Store, run: str) -> list[str]:
    return [e.type for _id, e in await store.read_events(run, count=10_000)]


# ---- runs, plans, nodes ----------------------------------------------------------------


async def test_runs_roundtrip_newest_first_and_unknown_id(store: Store) -> None:
    first = await store.create_run(RunSpec(goal="one"))
    await anyio.sleep(0.002)
    second = await store.create_run(RunSpec(goal="two", max_agents=3))
    assert first.id.startswith("r-") and first.id < second.id  # sortable by creation
    got = await store.get_run(second.id)
    assert got.spec.goal == "two" and got.spec.max_agents == 3 and got.status == "planning"
    assert [r.id for r in await store.list_runs()] == [second.id, first.id]
    with pytest.raises(errors.NotFound, match="unknown run id 'r-nope'"):
        await store.get_run("r-nope")
    with pytest.raises(errors.UserError, match="already exists"):
        await store.create_run(RunSpec(goal="again"), run_id=first.id)
    assert await event_types(store, first.id) == ["run_created"]


def test_run_ids_are_unique_and_sortable() -> None:
    ids = [new_run_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == len(ids[0]) for i in ids)


async def test_run_status_cas_and_finished_at(store: Store) -> None:
    run = (await store.create_run(RunSpec(goal="g"))).id
    assert not await store.set_run_status(run, "running", expect={"done"})
    assert (await store.get_run(run)).status == "planning"
    assert await store.set_run_status(run, "running", expect={"planning"})
    assert await store.set_run_status(run, "running")  # no change: applied, no event
    assert await store.set_run_status(run, "failed", error="boom", result_summary="half")
    rec = await store.get_run(run)
    assert rec.status == "failed" and rec.error == "boom" and rec.result_summary == "half"
    assert rec.finished_at is not None
    assert await store.set_run_status(run, "running", expect={"failed"})  # resume
    assert (await store.get_run(run)).finished_at is None
    assert (await event_types(store, run)).count("run_status") == 3
    with pytest.raises(errors.NotFound):
        await store.set_run_status("r-missing", "running")


async def test_run_usage_increments_are_atomic_under_concurrency(store: Store) -> None:
    run = (await store.create_run(RunSpec(goal="g"))).id
    one = Usage(tokens_in=3, tokens_out=2, cost_usd=0.25, llm_calls=1, steps=1)
    async with anyio.create_task_group() as tg:
        for _ in range(200):  # more coroutines than pool connections: the pool must wait
            tg.start_soon(store.add_run_usage, run, one)
    total = await store.add_run_usage(run, Usage())
    assert total == Usage(tokens_in=600, tokens_out=400, cost_usd=50.0, llm_calls=200, steps=200)
    assert (await store.get_run(run)).usage == total


async def test_plan_and_revisions(store: Store) -> None:
    run = (await store.create_run(RunSpec(goal="g"))).id
    assert await store.get_plan(run) is None
    p0 = Plan(nodes=[NodeSpec(id="a")])
    p1 = Plan(nodes=[NodeSpec(id="a"), NodeSpec(id="b", deps=["a"])], revision=1, note="split")
    await store.save_plan(run, p0)
    await store.save_plan(run, p1)
    assert await store.get_plan(run) == p1
    assert await store.plan_history(run) == [p0, p1]
    assert (await event_types(store, run)).count("plan") == 2


async def test_init_nodes_never_overwrites(store: Store) -> None:
    job = await queued(store, "a")
    await store.init_nodes(job.run, ["a", "b"])
    nodes = await store.get_nodes(job.run)
    assert nodes["a"].status == "queued" and nodes["b"].status == "pending"
    with pytest.raises(errors.NotFound):
        await store.get_node(job.run, "zzz")


async def test_transition_cas_rejects_stale_attempt_and_status(store: Store) -> None:
    job = await queued(store, "a", attempt=1)
    before = await store.get_node(job.run, "a")
    stale = await store.transition(
        job.run, "a", expect_attempt=0, expect_status={"queued"}, status="failed"
    )
    wrong_status = await store.transition(
        job.run, "a", expect_attempt=1, expect_status={"running"}, status="failed"
    )
    assert stale is None and wrong_status is None
    assert await store.get_node(job.run, "a") == before
    new = await store.transition(
        job.run,
        "a",
        expect_attempt=1,
        expect_status={"queued", "running"},
        status="retrying",
        error='fläky/"quoted"\n✓',
        result=NodeResult(summary="s", files=[]),
    )
    assert new is not None and new.status == "retrying" and new.error == 'fläky/"quoted"\n✓'
    assert new.result == NodeResult(summary="s", files=[])  # empty list survives Lua
    assert await store.get_node(job.run, "a") == new
    cleared = await store.transition(
        job.run, "a", expect_attempt=1, expect_status={"retrying"}, attempt=2, result=None
    )
    assert cleared is not None and cleared.attempt == 2 and cleared.result is None
    assert cleared.status == "retrying"
    with pytest.raises(ValidationError):
        await store.transition(job.run, "a", expect_attempt=2, expect_status={"x"}, status="nah")


# ---- the work queue --------------------------------------------------------------------


async def test_claim_start_fences_and_drops_stale_and_duplicate_jobs(store: Store) -> None:
    job = await queued(store, "a")
    await store.enqueue(job)  # duplicate of the same attempt
    await store.enqueue(Job(run=job.run, node="a", attempt=0))  # an older attempt
    claims = await store.claim("w1", count=10, block_ms=0)
    assert len(claims) == 1 and claims[0].job == job and claims[0].token > 0
    node = await store.get_node(job.run, "a")
    assert (node.status, node.token, node.worker) == ("running", claims[0].token, "w1")
    assert [p["id"] for p in await store.pending_jobs()] == [claims[0].entry_id]
    assert await store.claim("w2", block_ms=0) == []


async def test_claim_blocks_until_a_job_arrives(store: Store) -> None:
    job_box: list[Claim] = []

    async def take() -> None:
        job_box.extend(await store.claim("w1", block_ms=3000))

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.sleep(0.1)
        await queued(store, "a")
    assert len(job_box) == 1


VICTIM = """
import sys, anyio
from swarm.settings import Settings
from swarm.store import Store

async def main():
    url = sys.argv[1]
    store = await Store.connect(url, Settings(redis_url=url, home=sys.argv[2]))
    claims = await store.claim("victim", block_ms=5000)
    print(claims[0].model_dump_json(), flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


async def test_job_of_sigkilled_worker_is_reclaimed(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    job = await queued(store, "a")
    assert settings.redis_url
    async with await anyio.open_process(
        [sys.executable, "-c", VICTIM, settings.redis_url, str(tmp_path)]
    ) as proc:
        assert proc.stdout is not None
        line = b""
        with anyio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive()
        victim = Claim.model_validate_json(line)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert victim.job == job
    assert await store.reclaim("rescuer", min_idle_ms=60_000) == []  # not idle long enough
    await anyio.sleep(0.15)
    [rescued] = await store.reclaim("rescuer", min_idle_ms=100)
    assert rescued.job == job and rescued.deliveries == 2 and rescued.token > victim.token
    node = await store.get_node(job.run, "a")
    assert (node.worker, node.token) == ("rescuer", rescued.token)
    await store.complete(rescued, done(job))
    assert await store.pending_jobs() == []


async def test_zombie_is_fenced_out_after_its_job_is_reclaimed(store: Store) -> None:
    job = await queued(store, "a")
    zombie = await claim_one(store, "zombie")
    await store.append_step(zombie, StepRecord(n=0, kind="assistant"))
    await anyio.sleep(0.12)  # the zombie "pauses": no heartbeat
    [fresh] = await store.reclaim("fresh", min_idle_ms=100)
    before = await store.get_node(job.run, "a")
    steps_before = await store.load_steps(job.run, "a")

    assert not await store.heartbeat(zombie)
    with pytest.raises(errors.FencedOut):
        await store.append_step(zombie, StepRecord(n=1, kind="assistant"))
    with pytest.raises(errors.FencedOut):
        await store.replace_steps(zombie, [])
    with pytest.raises(errors.FencedOut):
        await store.complete(zombie, done(job, "zombie"))
    with pytest.raises(errors.FencedOut):
        await store.release(zombie)

    assert await store.get_node(job.run, "a") == before
    assert await store.load_steps(job.run, "a") == steps_before
    [pending] = await store.pending_jobs()
    assert (pending["id"], pending["consumer"]) == (fresh.entry_id, "fresh")
    assert await store.read_completions(job.run, "coord", block_ms=0) == []

    assert await store.heartbeat(fresh)
    await store.complete(fresh, done(job, "fresh"))
    node = await store.get_node(job.run, "a")
    assert node.status == "done" and node.result and node.result.summary == "fresh"


async def test_zombie_paused_between_reading_and_starting_a_job_cannot_take_it_back(
    store: Store,
) -> None:
    """Found by the SIGSTOP chaos test in CI: a worker stopped right after XREADGROUP handed
    it a job, before its start script ran. Another worker reclaimed and started the same
    entry; on waking, the zombie's start saw a running node held by that very entry and took
    a fresh token, fencing out the live worker and repeating its model call."""
    job = await queued(store, "a")
    from swarm.store.keys import Keys

    [(entry_id, _fields)] = await store._read_group(store.keys.jobs, Keys.WORKERS, "zombie",
                                                    ">", 1, 0)
    await anyio.sleep(0.12)
    [live] = await store.reclaim("live", min_idle_ms=100)
    assert live.entry_id == entry_id
    keys, args = store._job_call(job, entry_id, "zombie")
    assert await store._lua.start(keys=keys, args=args) == 0  # the zombie wakes: refused
    # ... nor can it reclaim the entry back without it being idle and handed over again
    assert await store._lua.reclaim(keys=keys, args=args) == [0, 0]
    node = await store.get_node(job.run, "a")
    assert (node.status, node.worker, node.token) == ("running", "live", live.token)
    assert await store.heartbeat(live)
    [pending] = await store.pending_jobs()
    assert (pending["id"], pending["consumer"]) == (entry_id, "live")  # not dropped either
    await store.complete(live, done(job, "live"))
    assert (await store.get_node(job.run, "a")).status == "done"


async def test_too_many_deliveries_go_to_dead_letters(store: Store, settings: Settings) -> None:
    job = await queued(store, "a")
    await claim_one(store, "w0")
    for i in range(1, settings.max_deliveries):  # deliveries 2..max are still handed out
        [c] = await store.reclaim(f"w{i}", min_idle_ms=0)
        assert c.deliveries == i + 1
    assert await store.reclaim("last", min_idle_ms=0) == []

    reason = f"delivered {settings.max_deliveries + 1} times; last holder stopped heartbeating"
    [letter] = await store.dead_letters()
    assert letter["reason"] == reason and letter["job"] == job.model_dump()
    node = await store.get_node(job.run, "a")
    assert (node.status, node.error) == ("dead", reason)
    [(_id, completion)] = await store.read_completions(job.run, "coord", block_ms=0)
    assert (completion.status, completion.error, completion.attempt) == ("dead", reason, 1)
    assert await store.pending_jobs() == []


async def test_heartbeat_keeps_a_job_from_being_reclaimed(store: Store) -> None:
    await queued(store, "a")
    holder = await claim_one(store, "holder")
    # Idle limit far above the heartbeat period: a loaded CI machine must not flake this.
    for _ in range(8):
        await anyio.sleep(0.05)
        assert await store.heartbeat(holder)
        assert await store.reclaim("thief", min_idle_ms=300) == []
    [pending] = await store.pending_jobs()
    assert pending["deliveries"] == 1  # heartbeats do not count as deliveries
    await anyio.sleep(0.35)
    assert len(await store.reclaim("thief", min_idle_ms=300)) == 1


async def test_tokens_never_repeat_after_the_fence_counter_rolls_back(
    store: Store, redis_server: Any
) -> None:
    await queued(store, "a")
    first = await claim_one(store, "w1")
    await store.release(first)
    redis_server.command("SET", store.keys.fence, "1")  # as if Redis lost its last writes
    second = await claim_one(store, "w2")
    assert second.token > first.token


async def test_release_hands_the_job_to_another_worker(store: Store) -> None:
    job = await queued(store, "a")
    leaving = await claim_one(store, "leaving")
    await store.release(leaving)
    node = await store.get_node(job.run, "a")
    assert (node.status, node.attempt, node.token, node.worker) == ("queued", 1, 0, None)
    taker = await claim_one(store, "taker")
    assert taker.job == job and taker.token > leaving.token and taker.deliveries == 1
    assert not await store.heartbeat(leaving)
    [pending] = await store.pending_jobs()
    assert (pending["id"], pending["consumer"]) == (taker.entry_id, "taker")


async def test_complete_is_atomic_and_idempotent_for_its_holder(store: Store) -> None:
    job = await queued(store, "a")
    claim = await claim_one(store, "w")
    await store.complete(claim, done(job))
    await store.complete(claim, done(job))  # a retried call that already landed
    node = await store.get_node(job.run, "a")
    assert node.status == "done" and node.usage.tokens_in == 10
    assert node.result == done(job).result  # empty lists inside data survive
    assert len(await store.read_completions(job.run, "coord", block_ms=0)) == 1
    assert await store.pending_jobs() == []
    with pytest.raises(ValueError, match="does not match"):
        await store.complete(claim, Completion(run=job.run, node="b", attempt=1, status="done"))


async def test_finish_node_is_a_cas_on_the_running_attempt(store: Store) -> None:
    run = (await store.create_run(RunSpec(goal="g"))).id
    await store.init_nodes(run, ["sub"])
    assert await store.transition(
        run, "sub", expect_attempt=0, expect_status={"pending"}, status="running", attempt=1
    )
    stale = Completion(run=run, node="sub", attempt=0, status="done")
    assert not await store.finish_node(run, stale)
    assert await store.finish_node(run, done(Job(run=run, node="sub", attempt=1)))
    assert not await store.finish_node(run, done(Job(run=run, node="sub", attempt=1)))
    node = await store.get_node(run, "sub")
    assert node.status == "done" and node.result and node.result.summary == "ok"
    [(_id, completion)] = await store.read_completions(run, "coord", block_ms=0)
    assert completion.node == "sub" and completion.status == "done"


async def test_steps_checkpoint_roundtrip_and_compaction(store: Store) -> None:
    job = await queued(store, "a")
    claim = await claim_one(store, "w")
    turn = Usage(tokens_in=100, tokens_out=20, cost_usd=0.5, llm_calls=1, steps=1)
    steps = [
        StepRecord(n=0, kind="assistant", message={"role": "assistant", "tool_calls": []},
                   usage=turn),
        StepRecord(n=0, kind="tools"),
        StepRecord(n=1, kind="assistant", message={"role": "assistant", "content": "x"},
                   usage=turn),
    ]
    for s in steps:
        await store.append_step(claim, s, StepTaken(run=job.run, node="a", n=s.n))
    assert await store.load_steps(job.run, "a") == steps
    # steps are LLM turns (a tools record is not one); their spend lands on node and run
    node = await store.get_node(job.run, "a")
    assert node.steps == 2
    assert node.usage.tokens_in == 200 and node.usage.cost_usd == pytest.approx(1.0)
    run_usage = (await store.get_run(job.run)).usage
    assert (run_usage.tokens_in, run_usage.llm_calls, run_usage.steps) == (200, 2, 2)
    assert run_usage.cost_usd == pytest.approx(1.0)
    assert (await event_types(store, job.run)).count("step") == 3
    compacted = [StepRecord(n=2, kind="compaction", summary="did things", upto=2)]
    await store.replace_steps(claim, compacted)
    assert await store.load_steps(job.run, "a") == compacted


# ---- completions, events, leases ---------------------------------------------------------


async def test_unacked_completions_are_redelivered_after_a_restart(
    store: Store, settings: Settings
) -> None:
    run = (await store.create_run(RunSpec(goal="g"))).id
    jobs = [await queued(store, n, run=run) for n in ("a", "b", "c")]
    for _ in jobs:
        claim = await claim_one(store, "w")
        await store.complete(claim, done(claim.job))
    got = await store.read_completions(run, "coord", count=2, block_ms=0)
    assert [c.node for _id, c in got] == ["a", "b"]
    await store.ack_completion(run, got[0][0])

    assert settings.redis_url
    restarted = await Store.connect(settings.redis_url, settings)
    successor = await Store.connect(settings.redis_url, settings)
    try:
        again = await restarted.read_completions(run, "coord", count=10, block_ms=0)
        assert [c.node for _id, c in again] == ["b"]  # its own unacked one first
        fresh = await restarted.read_completions(run, "coord", count=10, block_ms=0)
        assert [c.node for _id, c in fresh] == ["c"]
        await restarted.ack_completion(run, again[0][0])
        # A coordinator under another consumer name adopts what the old one left unacked.
        adopted = await successor.read_completions(run, "new", block_ms=0)
        assert [c.node for _id, c in adopted] == ["c"]
    finally:
        await restarted.close()
        await successor.close()


async def test_event_stream_is_capped(store: Store, settings: Settings) -> None:
    run = (await store.create_run(RunSpec(goal="g"))).id
    for i in range(1000):
        await store.emit(LogLine(run=run, message=f"line {i}"))
    events = await store.read_events(run, count=10_000)
    assert settings.event_stream_maxlen <= len(events) < 3 * settings.event_stream_maxlen
    last = events[-1][1]
    assert isinstance(last, LogLine) and last.message == "line 999"
    after = await store.read_events(run, after=events[-2][0])
    assert [e for _id, e in after] == [last]
    assert await store.read_events(run, after=events[-1][0], block_ms=50) == []


async def test_leases_are_exclusive_and_expire(store: Store) -> None:
    assert await store.acquire_lease("run:x", "a", ttl_s=0.5)
    assert not await store.acquire_lease("run:x", "b", ttl_s=5)
    assert await store.acquire_lease("run:x", "a", ttl_s=0.5)  # re-acquiring renews
    assert await store.renew_lease("run:x", "a", ttl_s=0.5)
    assert not await store.renew_lease("run:x", "b", ttl_s=5)
    await store.release_lease("run:x", "b")  # not the owner: no effect
    assert await store.lease_owner("run:x") == "a"
    await anyio.sleep(0.6)
    assert await store.lease_owner("run:x") is None
    assert not await store.renew_lease("run:x", "a", ttl_s=1)
    assert await store.acquire_lease("run:x", "b", ttl_s=5)
    await store.release_lease("run:x", "b")
    assert await store.lease_owner("run:x") is None


# ---- infrastructure ----------------------------------------------------------------------


async def test_info_reports_durability(store: Store) -> None:
    info = await store.info()
    assert info["aof_enabled"] is True and info["appendfsync"] == "everysec"
    assert info["redis_version"].startswith("7")


async def test_unreachable_redis_is_one_clear_error(settings: Settings) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:secret@127.0.0.1:{port}/0"
    with pytest.raises(errors.RedisUnavailable, match="cannot reach Redis at") as info:
        await Store.connect(url, settings)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(errors.UserError, match="invalid Redis URL"):
        await Store.connect("http://nope", settings)


async def test_store_survives_a_redis_crash_and_restart(
    redis_factory: Callable[[], Any], tmp_path: Path
) -> None:
    server = redis_factory()
    # No outage budget: this test wants the error a dead Redis gives, not a wait for it.
    settings = Settings(home=tmp_path, redis_url=server.url, redis_outage_s=0)
    store = await Store.connect(server.url, settings)
    try:
        job = await queued(store, "a")
        claim = await claim_one(store, "w")
        await anyio.sleep(1.1)  # let appendfsync everysec flush
        server.kill()
        with pytest.raises(errors.RedisUnavailable):
            await store.get_node(job.run, "a")
        server.start()
        assert (await store.get_node(job.run, "a")).token == claim.token  # AOF replayed
        await store.complete(claim, done(job))
        assert (await store.get_node(job.run, "a")).status == "done"
    finally:
        await store.close()
