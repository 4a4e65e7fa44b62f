"""Every shipped workflow runs end to end (simulator over HTTP, Docker sandboxes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.models import RunSpec
from swarm.runtime import run_in_process
from swarm.workflow import load_workflow

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.yaml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
async def test_shipped_workflow_runs(runtime_factory, path: Path, tmp_path: Path) -> None:
    wf = load_workflow(path, cwd=ROOT)
    out = tmp_path / "out"
    async with runtime_factory() as (rt, _sim):
        rec = await rt.store.create_run(RunSpec(
            goal=wf.goal, plan=wf.plan, mounts=wf.mounts, workflow_name=wf.name,
            simulate=True, sandbox="docker", max_agents=64, output_dir=str(out)))
        await run_in_process(rt, rec.id, slots=64)
        final = await rt.store.get_run(rec.id)
        nodes = await rt.store.get_nodes(rec.id)
    assert final.status == "done", final.error
    assert all(n.status == "done" for n in nodes.values())
    commands = [n for n in wf.plan.nodes if n.kind == "command"]
    for spec in commands:  # command nodes really ran in the sandbox and handed on output
        assert nodes[spec.id].result is not None
        assert nodes[spec.id].result.data is not None
        assert "exit_code" in nodes[spec.id].result.data
    assert (out / "RESULT.md").is_file()
