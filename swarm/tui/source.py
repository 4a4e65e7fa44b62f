"""The watcher's only way to the run: reads through `Store` (state and the event stream), and
the two explicit commands it may send (cancel the run, retry a dead node)."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread

from swarm.coordinator import leader_lease
from swarm.errors import NotFound
from swarm.models import (
    TERMINAL_RUN_STATUSES,
    Event,
    NodeSpec,
    NodeState,
    NodeStatusChanged,
    PlanStored,
    StepRecord,
)
from swarm.settings import Settings
from swarm.store import Store
from swarm.tui.snapshot import Snapshot, build_snapshot

LIVE_RUN_STATUSES = frozenset({"planning", "running", "merging"})
MAX_FILES = 300


@dataclass
class NodeHistory:
    """Status changes per node, as seen on the event stream (the latest few per node)."""

    per_node: int = 12
    by_node: dict[str, deque[NodeStatusChanged]] = field(default_factory=dict)

    def add(self, events: list[tuple[str, Event]]) -> None:
        for _entry, ev in events:
            if isinstance(ev, NodeStatusChanged):
                self.by_node.setdefault(ev.node, deque(maxlen=self.per_node)).append(ev)

    def of(self, node_id: str) -> list[NodeStatusChanged]:
        return list(self.by_node.get(node_id, ()))


@dataclass
class NodeDetail:
    run_id: str
    node_id: str
    spec: NodeSpec | None
    state: NodeState | None
    steps: list[StepRecord]
    files: list[tuple[str, int]] | None  # None: the workspace is not on this host
    workspace: Path
    sandbox: str
    history: list[NodeStatusChanged]


class RunSource:
    def __init__(self, store: Store, settings: Settings, run_id: str, *,
                 event_batch: int = 1000, max_batches: int = 5) -> None:
        self.store, self.settings, self.run_id = store, settings, run_id
        self.after = "0-0"
        self.event_batch, self.max_batches = event_batch, max_batches
        self.history = NodeHistory()
        self._plan_stale = True
        self._snapshot: Snapshot | None = None

    async def snapshot(self) -> Snapshot:
        """The run, its plan and all node states. The plan (large, rarely changing) is read
        again only after a `plan` event, or while the run has none yet."""
        run = await self.store.get_run(self.run_id)
        plan = self._snapshot.plan if self._snapshot else None
        if self._plan_stale or plan is None:
            plan = await self.store.get_plan(self.run_id)
            self._plan_stale = plan is None
        nodes = await self.store.get_nodes(self.run_id)
        self._snapshot = build_snapshot(run, plan, nodes)
        return self._snapshot

    async def new_events(self) -> tuple[list[tuple[str, Event]], bool]:
        """Events since the last call (at most max_batches * event_batch of them) and
        whether more are waiting."""
        out: list[tuple[str, Event]] = []
        more = False
        for _ in range(self.max_batches):
            batch = await self.store.read_events(self.run_id, after=self.after,
                                                 count=self.event_batch)
            if batch:
                self.after = batch[-1][0]
                out.extend(batch)
            more = len(batch) == self.event_batch
            if not more:
                break
        self._note(out)
        return out, more

    def _note(self, events: list[tuple[str, Event]]) -> None:
        self.history.add(events)
        if any(isinstance(ev, PlanStored) for _, ev in events):
            self._plan_stale = True

    def forget_plan(self) -> None:
        """After a reconnect: the plan may have changed while the stream was out of reach."""
        self._plan_stale = True

    async def node_state(self, node_id: str) -> NodeState | None:
        try:
            return await self.store.get_node(self.run_id, node_id)
        except NotFound:  # planned, no state yet
            return None

    async def detail(self, node_id: str) -> NodeDetail:
        run = await self.store.get_run(self.run_id)
        plan = self._snapshot.plan if self._snapshot and not self._plan_stale else None
        if plan is None or node_id not in plan.by_id():
            plan = await self.store.get_plan(self.run_id)
        state = await self.node_state(node_id)
        steps = await self.store.load_steps(self.run_id, node_id)
        workspace = self.settings.workspaces_dir / self.run_id / node_id
        files = await anyio.to_thread.run_sync(list_files, workspace)
        return NodeDetail(
            run_id=self.run_id, node_id=node_id,
            spec=plan.by_id().get(node_id) if plan else None, state=state,
            steps=steps, files=files, workspace=workspace, sandbox=run.spec.sandbox,
            history=self.history.of(node_id),
        )

    async def cancel(self) -> str:
        """What `swarm cancel` does; returns a line saying what happened."""
        run = await self.store.get_run(self.run_id)
        if run.status in TERMINAL_RUN_STATUSES:
            return f"run {self.run_id} is already {run.status}"
        ok = await self.store.set_run_status(self.run_id, "cancelled", expect=LIVE_RUN_STATUSES,
                                             error="cancelled by user")
        return f"run {self.run_id} cancelled" if ok else "the run changed state; try again"

    async def retry(self, node_id: str) -> str:
        """Ask for one more attempt of a dead node (UserError if it is not dead)."""
        led = await self.store.lease_owner(leader_lease(self.run_id))
        await self.store.request_retry(self.run_id, node_id)
        tail = "" if led else f" (no process leads the run: `swarm resume {self.run_id}`)"
        return f"node {node_id} re-queued for one more attempt{tail}"


def list_files(root: Path) -> list[tuple[str, int]] | None:
    """Files under a workspace (relative path, size), .git skipped; None if it is not here.
    Blocking: called in a thread."""
    if not root.is_dir():
        return None
    out: list[tuple[str, int]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            path = Path(folder) / name
            try:
                size = path.lstat().st_size
            except OSError:
                continue
            out.append((str(path.relative_to(root)), size))
            if len(out) >= MAX_FILES:
                return out
    return out
