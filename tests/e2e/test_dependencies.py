"""Downstream nodes get their dependencies' results: summaries in the prompt, files mounted
read-only under /deps/<node> (Docker sandboxes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.models import NodeSpec, Plan, RunSpec
from swarm.runtime import run_in_process

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


async def test_dependency_files_are_mounted_read_only(runtime_factory, tmp_path: Path) -> None:
    plan = Plan(nodes=[
        NodeSpec(id="writer", title="Write notes", instructions="write notes"),
        NodeSpec(id="reader", kind="command", deps=["writer"], check=False,
                 command="cat /deps/writer/notes/writer-0.md; "
                         "touch /deps/writer/intruder 2>&1; echo touch=$?"),
    ])
    async with runtime_factory() as (rt, _sim):
        rec = await rt.store.create_run(RunSpec(goal="deps", plan=plan, simulate=True,
                                                sandbox="docker", output_dir=str(tmp_path / "o")))
        await run_in_process(rt, rec.id, slots=4)
        reader = await rt.store.get_node(rec.id, "reader")
        writer_ws = rt.settings.workspaces_dir / rec.id / "writer"
    assert reader.status == "done" and reader.result is not None
    out = reader.result.summary
    assert "notes of writer, step 0" in out  # the upstream file, read in the downstream box
    assert "Read-only file system" in out and "touch=1" in out
    assert not (writer_ws / "intruder").exists()
