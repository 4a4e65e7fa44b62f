"""The Redis adapter: the only code in swarm that imports `redis`.

`Store` is assembled from parts that each keep one concern (runs.py: runs, plans, node
states; queue.py: jobs, checkpoints, completions; base.py: connection, events, leases).
Every key is built by `Keys`; every compare-and-set and fenced write is a Lua script
(scripts.py). Connection failures surface as errors.RedisUnavailable.
"""

from __future__ import annotations

from swarm.errors import UserError
from swarm.models import Completion, NodeState
from swarm.store.archive import ArchiveStore, RunDump
from swarm.store.base import translate_errors
from swarm.store.keys import Keys
from swarm.store.queue import QueueStore
from swarm.store.runs import RunsStore, new_run_id


@translate_errors
class Store(RunsStore, QueueStore, ArchiveStore):
    """Runs, plans, node states, the work queue, checkpoints, events and leases in Redis."""

    async def request_retry(self, run_id: str, node_id: str) -> NodeState:
        """Ask the run's leader to re-queue a dead node (one more attempt). The request travels
        on the completion stream, so it reaches the leader in order with everything else.
        A finished run is reopened (status `running`) so `swarm resume` takes it up."""
        node = await self.get_node(run_id, node_id)
        if node.status != "dead":
            raise UserError(f"node {node_id!r} is {node.status}, not dead: nothing to retry")
        await self.set_run_status(run_id, "running", expect={"failed"})
        if await self._r.hexists(self.keys.run(run_id), "exported_at"):
            await self.persist_run(run_id)  # reopened: no longer a finished run to expire
        request = Completion(run=run_id, node=node_id, attempt=node.attempt, status="retry")
        await self._r.xadd(self.keys.done(run_id), {"c": request.model_dump_json()})
        return node


__all__ = ["Keys", "RunDump", "Store", "new_run_id"]
