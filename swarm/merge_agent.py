"""The merge agent: resolves git merge conflicts between nodes' files in a sandbox.

It is an ordinary Agent whose task shows the conflicted files; it writes resolved versions
into its own workspace, which are then copied back into the merge repository. Its steps are
kept in memory only: the merge stage is rerun from scratch after a crash, so checkpointing
them would buy nothing. Its spend is charged to the run.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from swarm.agent import Agent, AgentFailed, AgentModel
from swarm.errors import SandboxError
from swarm.models import Claim, Job, NodeLimits, NodeSpec, StepRecord, StepTaken, Usage
from swarm.sandbox.base import SandboxBackend
from swarm.store import Store

MAX_FILE_CHARS = 60_000  # a conflicted file bigger than this is left to the union fallback


def conflict_prompt(node: str, texts: dict[str, str]) -> str:
    blocks = "\n".join(f"=== conflicted file: {path} ===\n{body.rstrip()}\n=== end ==="
                       for path, body in texts.items())
    return (f"Merging the files of node {node!r} into the result conflicted. Each file below "
            "has git conflict markers. For every file, write the resolved content (no conflict "
            "markers; keep the intent of both sides) to the same path with write_file, then "
            f"call finish.\n\n{blocks}")


class MemorySteps:
    """A StepStore that keeps steps in memory and sums their usage."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.usage = Usage()

    async def load_steps(self, run_id: str, node_id: str) -> list[StepRecord]:
        return list(self.steps)

    async def append_step(self, claim: Claim, step: StepRecord,
                          event: StepTaken | None = None) -> Usage:
        self.steps.append(step)
        self.usage = self.usage + step.usage
        return self.usage  # the merge agent's own spend is all this store sees

    async def replace_steps(self, claim: Claim, steps: list[StepRecord]) -> None:
        self.steps = list(steps)


class AgentResolver:
    def __init__(self, store: Store, llm: AgentModel, sandboxes: SandboxBackend, *,
                 run: str, goal: str, model: str | None = None, charge: bool = True) -> None:
        """charge=False: `llm` charges the run itself (replay.RecordedChat does)."""
        self.store, self.llm, self.sandboxes = store, llm, sandboxes
        self.run, self.goal, self.model, self.charge = run, goal, model, charge

    async def resolve(self, repo: Path, node: str, files: list[str]) -> bool:
        texts = await self._read(repo, files)
        if texts is None:
            return False
        spec = NodeSpec(id=f"merge-agent.{node}"[:100], title=f"Resolve conflicts of {node}",
                        instructions=conflict_prompt(node, texts), role="merger",
                        tools=["read_file", "write_file", "list_files", "finish"],
                        limits=NodeLimits(max_steps=len(files) * 3 + 5))
        sandbox = await self.sandboxes.open(self.run, spec.id)
        steps = MemorySteps()
        try:
            for path, body in texts.items():
                await sandbox.write_file(path, body.encode())
            agent = Agent(run=self.run, goal=self.goal, spec=spec,
                          claim=Claim(job=Job(run=self.run, node=spec.id, attempt=1),
                                      entry_id="0-0", token=0),
                          store=steps, llm=self.llm, sandbox=sandbox, inputs={},
                          model=self.model)
            await agent.run_to_end()
            for path in texts:
                await self._write(repo, path, await sandbox.read_file(path))
            return True
        except (AgentFailed, SandboxError, OSError):
            return False
        finally:
            if self.charge:
                await self.store.add_run_usage(self.run, steps.usage)
            await self.sandboxes.close(sandbox)

    @staticmethod
    async def _read(repo: Path, files: list[str]) -> dict[str, str] | None:
        texts = {}
        for rel in files:
            target = _inside(repo, rel)
            if target is None:
                return None
            try:
                body = await anyio.Path(target).read_text()
            except (OSError, UnicodeDecodeError):
                return None  # binary or unreadable: the union fallback handles it
            if len(body) > MAX_FILE_CHARS:
                return None
            texts[rel] = body
        return texts

    @staticmethod
    async def _write(repo: Path, rel: str, data: bytes) -> None:
        target = _inside(repo, rel)
        if target is None:
            raise SandboxError(f"refusing to write {rel!r} outside the merge repository")
        await anyio.Path(target).write_bytes(data)


def _inside(repo: Path, rel: str) -> Path | None:
    """The path of `rel` in `repo`, or None if it would land outside it (or via a symlink)."""
    root = repo.resolve()
    target = (root / rel).resolve()
    if target != root and root in target.parents and not (root / rel).is_symlink():
        return target
    return None
