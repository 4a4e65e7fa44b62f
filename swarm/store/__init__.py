"""The Redis adapter: the only code in swarm that imports `redis`.

`Store` is assembled from parts that each keep one concern (runs.py: runs, plans, node
states; queue.py: jobs, checkpoints, completions; base.py: connection, events, leases).
Every key is built by `Keys`; every compare-and-set and fenced write is a Lua script
(scripts.py). Connection failures surface as errors.RedisUnavailable.
"""

from __future__ import annotations

from swarm.store.base import translate_errors
from swarm.store.keys import Keys
from swarm.store.queue import QueueStore
from swarm.store.runs import RunsStore, new_run_id


@translate_errors
class Store(RunsStore, QueueStore):
    """Runs, plans, node states, the work queue, checkpoints, events and leases in Redis."""


__all__ = ["Keys", "Store", "new_run_id"]
