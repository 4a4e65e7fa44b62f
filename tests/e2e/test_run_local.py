"""A goal becomes a DAG, runs over Redis with a worker pool, and merges (local sandboxes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.models import RunSpec
from swarm.runtime import run_in_process

pytestmark = pytest.mark.anyio


async def test_fan_out_fan_in_completes_and_merges(runtime_factory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with runtime_factory(sandbox="local") as (rt, _sim):
        spec = RunSpec(goal="Write a short guide in 5 parts", simulate=True, sandbox="local",
                       output_dir=str(out))
        rec = await rt.store.create_run(spec)
        await run_in_process(rt, rec.id, slots=8)
        final = await rt.store.get_run(rec.id)
        nodes = await rt.store.get_nodes(rec.id)
    assert final.status == "done", final.error
    assert len(nodes) == 6 and all(n.status == "done" for n in nodes.values())
    report = (out / "RESULT.md").read_text()
    assert "simulator" in report.lower()
    assert final.usage.llm_calls > 6
    # a node's steps are its LLM turns: 2 tool calls then finish, with the simulator's default
    assert {n.steps for nid, n in nodes.items() if nid != "merge"} == {3}
    # every part wrote its notes into its workspace; the merge put them in one tree
    notes = sorted(p.name for p in (out / "notes").iterdir())
    assert len([n for n in notes if n.startswith("part-")]) >= 5
