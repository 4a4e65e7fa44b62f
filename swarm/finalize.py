"""The end of a run: synthesise the results, merge the nodes' files, write RESULT.md.

Rerunnable from scratch (a crash mid-merge is resumed by doing it again): the file merge
rebuilds the output repo deterministically, and every model call of the stage (synthesis,
merge agent) is recorded as it returns (replay.py), so a rerun replays the calls already made
instead of repeating them. Recording charges the run, so nothing here charges it again.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from swarm import dag
from swarm.agent import AgentModel
from swarm.coordinator import RunState
from swarm.errors import SwarmError
from swarm.merge import (
    ConflictResolver,
    FileMergeReport,
    NodeReportRow,
    TextMerger,
    merge_workspaces,
    render_report,
)
from swarm.merge_agent import AgentResolver
from swarm.models import LogLine
from swarm.replay import RecordedChat, RunRecorder
from swarm.sandbox.base import SandboxBackend
from swarm.settings import Settings
from swarm.store import Store


def sinks(state: RunState) -> list[str]:
    """Done nodes that no done node consumes: the run's outputs. A consumer that never
    finished (a run stopped by its budget, a dead node) does not absorb its inputs, so a
    partial run still synthesises what its finished nodes produced."""
    def done(nid: str) -> bool:
        node = state.nodes.get(nid)
        return node is not None and node.status == "done"

    used = {d for n in state.plan.nodes if done(n.id) for d in n.deps}
    return [n.id for n in state.plan.nodes if n.id not in used and done(n.id)]


def output_dir_for(settings: Settings, state: RunState) -> Path:
    given = state.record.spec.output_dir
    return Path(given) if given else settings.home / "output" / state.record.id


class Finalizer:
    def __init__(self, store: Store, llm: AgentModel, settings: Settings, *,
                 sandboxes: SandboxBackend | None = None, simulated: bool = False) -> None:
        self.store, self.llm, self.settings, self.sandboxes = store, llm, settings, sandboxes
        # The run's spec says simulated when its submitter chose the simulator; this says
        # so when the process merging it has no other model (a run submitted to a stack).
        self.simulated = simulated

    def _resolver(self, state: RunState, llm: AgentModel) -> ConflictResolver | None:
        if self.sandboxes is None:
            return None  # conflicts then get the deterministic union fallback
        spec = state.record.spec
        return AgentResolver(self.store, llm, self.sandboxes, run=state.record.id,
                             goal=spec.goal, model=spec.models.get("merger"), charge=False)

    async def __call__(self, state: RunState) -> str:
        rec = state.record
        llm = RecordedChat(self.llm, RunRecorder(self.store, rec.id))
        if rec.spec.parent_run:  # a nested run hands its synthesis up; the parent writes files
            text = await self._synthesise(state, llm)
            await self._reap(rec.id)
            return text
        out = output_dir_for(self.settings, state)
        files = await self._merge_files(state, out, llm)
        await self._note(rec.id, f"merge stage: files of {len(files.merged)} node(s) merged, "
                                 f"{files.files} file(s), commit {files.commit}")
        text = await self._synthesise(state, llm)
        await self._note(rec.id, f"merge stage: synthesis done ({llm.replayed} recorded "
                                 "model call(s) replayed)")
        rec = await self.store.get_run(rec.id)
        report = render_report(
            run_id=rec.id, goal=rec.spec.goal, status=state.final_status or rec.status,
            synthesis=text, nodes=self._rows(state), files=files, usage=rec.usage,
            elapsed_s=rec.elapsed_s, simulated=rec.spec.simulate or self.simulated,
        )
        await anyio.Path(out / "RESULT.md").write_text(report)
        await self.store.emit(LogLine(run=rec.id, message=f"result written to {out}"))
        await self._reap(rec.id)
        return text

    async def _note(self, run_id: str, message: str) -> None:
        await self.store.emit(LogLine(run=run_id, message=message))

    async def _reap(self, run_id: str) -> None:
        """Remove every sandbox container the run still has: no node of it runs any more,
        and what is left belongs to workers that died (their workspaces stay)."""
        if self.sandboxes is None:
            return
        try:
            removed = await self.sandboxes.remove_run(run_id)
        except SwarmError as exc:  # the result stands; `swarm gc` can finish the job
            await self.store.emit(LogLine(run=run_id, level="warning",
                                          message=f"could not remove the run's sandboxes: {exc}"))
            return
        if removed:
            await self._note(run_id, f"removed {removed} leftover sandbox container(s)")

    async def _synthesise(self, state: RunState, llm: AgentModel) -> str:
        outs = sinks(state)
        results = [(nid, state.nodes[nid].result.summary)  # type: ignore[union-attr]
                   for nid in outs if state.nodes[nid].result]
        if not results:
            return "(no node finished: nothing to synthesise)"
        if len(results) == 1:  # a plan that ends in one merge node already synthesised
            return results[0][1]
        merger = TextMerger(llm, model=state.record.spec.models.get("merger"))
        text, _usage = await merger.synthesize(state.record.id, state.record.spec.goal, results)
        return text

    async def _merge_files(self, state: RunState, out: Path, llm: AgentModel) -> FileMergeReport:
        order = dag.topological_order(state.plan)
        root = self.settings.workspaces_dir / state.record.id
        workspaces = [(nid, root / nid) for nid in order
                      if state.nodes.get(nid) and state.nodes[nid].status == "done"
                      and (root / nid).is_dir()]
        return await merge_workspaces(out, workspaces, resolver=self._resolver(state, llm))

    @staticmethod
    def _rows(state: RunState) -> list[NodeReportRow]:
        rows = []
        for spec in state.plan.nodes:
            node = state.nodes.get(spec.id)
            if node is None:
                continue
            rows.append(NodeReportRow(
                id=spec.id, title=spec.title, status=node.status, attempts=node.attempt,
                steps=node.steps, tokens=node.usage.tokens,
                summary=node.result.summary if node.result else "", error=node.error))
        return rows
