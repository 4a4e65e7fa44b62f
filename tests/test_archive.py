"""swarm.archive: a finished run exported to one file and imported back, whole; retention."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anyio
import pytest

from swarm import commands
from swarm.archive import export_run, import_file, read_dumps
from swarm.errors import UserError
from swarm.models import (
    Completion,
    Job,
    LogLine,
    NodeResult,
    NodeSpec,
    Plan,
    RunSpec,
    StepRecord,
    Usage,
)
from swarm.settings import Settings
from swarm.store import Store

pytestmark = pytest.mark.anyio


async def finished_run(store: Store, out: Path, *, status: str = "done") -> str:
    """A small run taken through every kind of record an export must carry."""
    plan = Plan(nodes=[NodeSpec(id="a"), NodeSpec(id="b", deps=["a"])])
    rec = await store.create_run(RunSpec(goal="archive me", plan=plan, output_dir=str(out)))
    await store.save_plan(rec.id, plan)
    await store.save_plan(rec.id, plan.model_copy(update={"revision": 1}), replanned="x@1")
    await store.set_run_status(rec.id, "running", expect={"planning"})
    for nid in ("a", "b"):
        job = Job(run=rec.id, node=nid, attempt=1)
        await store.transition(rec.id, nid, expect_attempt=0, expect_status={"pending"},
                               status="queued", attempt=1, enqueue=job)
        (claim,) = await store.claim("w", block_ms=0)
        for n in range(2):
            await store.append_step(claim, StepRecord(
                n=n, kind="assistant", message={"role": "assistant", "content": f"{nid}{n}",
                                                "tool_calls": []},
                usage=Usage(tokens_in=3, llm_calls=1, steps=1)))
        await store.complete(claim, Completion(
            run=rec.id, node=nid, attempt=1, status="done",
            result=NodeResult(summary=f"{nid} done", data={"empty": [], "n": 1}),
            usage=Usage(tokens_in=6, llm_calls=2, steps=2)))
    await store.record_call(rec.id, "k", json.dumps({"content": "hi"}), Usage(llm_calls=1))
    await store.emit(LogLine(run=rec.id, message="hello"))
    await store.set_run_status(rec.id, "merging", expect={"running"})
    await store.set_run_status(rec.id, status, expect={"merging"},  # type: ignore[arg-type]
                               result_summary="the synthesis")
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    await anyio.Path(out / "RESULT.md").write_text("# result\n")
    return rec.id


async def snapshot(store: Store, run: str) -> dict:
    r = store._r  # the raw streams, ids included
    return {
        "run": (await store.get_run(run)).model_dump(),
        "plans": await store.plan_history(run),
        "plan": await store.get_plan(run),
        "nodes": await store.get_nodes(run),
        "steps": {n: await r.xrange(store.keys.steps(run, n)) for n in ("a", "b")},
        "events": await r.xrange(store.keys.events(run)),
        "done": await r.xrange(store.keys.done(run)),
        "replanned": await store.replanned(run),
        "call": json.loads(await store.recall_call(run, "k") or "null"),
    }


async def test_export_then_import_restores_the_run_whole(store: Store, settings: Settings,
                                                         tmp_path: Path) -> None:
    run = await finished_run(store, tmp_path / "out")
    before = await snapshot(store, run)
    path = tmp_path / "run.jsonl.gz"
    done = await export_run(store, settings, run, path)
    assert done.runs == [run] and done.expires_in_s == settings.finished_run_ttl_s
    ttl = await store.run_ttl_s(run)
    assert ttl is not None and 0 < ttl <= settings.finished_run_ttl_s
    for key in await store._run_keys(run):
        if await store._r.exists(key):
            assert await store._r.pttl(key) > 0, key  # every key of the run expires

    with gzip.open(path, "rt") as f:
        lines = [json.loads(line) for line in f]
    assert lines[0]["format"] == "swarm-run" and lines[0]["runs"] == [run]
    types = {rec["type"] for rec in lines}
    assert {"run", "plans", "node", "steps", "events", "completions", "report"} <= types
    node_a = next(r for r in lines if r["type"] == "node" and r["node"] == "a")
    assert node_a["result"]["data"] == {"empty": [], "n": 1}  # JSON, not escaped strings
    report = next(r for r in lines if r["type"] == "report")
    assert report["text"] == "# result\n"

    await store._r.flushall()
    assert await import_file(store, path) == [run]
    after = await snapshot(store, run)
    before["run"].pop("updated_at"), after["run"].pop("updated_at")
    assert after == before
    assert await store.run_ttl_s(run) is None  # an imported run stays until exported again
    with pytest.raises(UserError, match="already exists"):
        await import_file(store, path)


async def test_only_finished_runs_are_exported_and_keep_skips_expiry(
    store: Store, settings: Settings, tmp_path: Path
) -> None:
    rec = await store.create_run(RunSpec(goal="still going"))
    with pytest.raises(UserError, match="only a finished run"):
        await export_run(store, settings, rec.id, tmp_path / "x.jsonl")
    run = await finished_run(store, tmp_path / "out", status="failed")
    done = await export_run(store, settings, run, tmp_path / "x.jsonl", keep=True)
    assert done.expires_in_s is None and await store.run_ttl_s(run) is None
    assert read_dumps(tmp_path / "x.jsonl")[0].run == run  # plain JSON Lines without .gz


async def test_exported_runs_expire_and_leave_the_index(store: Store, settings: Settings,
                                                        tmp_path: Path) -> None:
    quick = settings.model_copy(update={"finished_run_ttl_s": 0.3})
    run = await finished_run(store, tmp_path / "out")
    await export_run(store, quick, run, tmp_path / "run.jsonl")
    await anyio.sleep(0.6)
    assert [r.id for r in await store.list_runs()] == []  # expired: skipped
    assert not await store._r.keys(f"swarm:run:{run}*")  # nothing of it is left
    assert await store.prune_run_index() == 1
    assert await store._r.zcard(store.keys.runs) == 0


async def test_a_reopened_run_no_longer_expires(store: Store, settings: Settings,
                                                tmp_path: Path) -> None:
    run = await finished_run(store, tmp_path / "out", status="failed")
    await export_run(store, settings, run, tmp_path / "run.jsonl")
    await store._r.hset(store.keys.nodes(run), "a", (await store._r.hget(
        store.keys.nodes(run), "a")).replace('"status":"done"', '"status":"dead"'))
    await store.request_retry(run, "a")
    assert await store.run_ttl_s(run) is None
    assert not await store._r.hexists(store.keys.run(run), "exported_at")


async def test_cli_export_and_import(store: Store, settings: Settings, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = await finished_run(store, tmp_path / "out")
    path = tmp_path / "cli.jsonl.gz"
    assert await commands.export(settings, run, path, keep=False) == 0
    assert f"exported {run} to {path}" in capsys.readouterr().out
    await store._r.flushall()
    assert await commands.import_(settings, path) == 0
    assert f"imported {run}" in capsys.readouterr().out
    assert (await store.get_run(run)).result_summary == "the synthesis"
    bad = tmp_path / "bad.jsonl"
    await anyio.Path(bad).write_text('{"type": "nope"}\n')
    with pytest.raises(UserError, match="not a swarm export file"):
        await commands.import_(settings, bad)
