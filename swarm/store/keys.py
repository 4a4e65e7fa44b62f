"""Every Redis key swarm uses, built in one place (DESIGN.md, "Redis: keys, streams")."""

from __future__ import annotations

from collections.abc import Iterable


class Keys:
    """Key names under one prefix. Run and node ids never contain ':' (see models._ID_RE)."""

    WORKERS = "workers"  # consumer group on the jobs stream
    COORDINATOR = "coordinator"  # consumer group on each run's completion stream

    def __init__(self, prefix: str = "swarm:") -> None:
        self.prefix = prefix
        self.runs = f"{prefix}runs"  # zset: run id by created_at
        self.jobs = f"{prefix}jobs"  # stream, group WORKERS
        self.dead = f"{prefix}jobs:dead"  # dead-letter stream
        self.fence = f"{prefix}fence"  # counter handing out fencing tokens

    def run(self, run: str) -> str:
        """Hash: spec, status, timestamps, usage counters."""
        return f"{self.prefix}run:{run}"

    def plan(self, run: str) -> str:
        """String: the current plan JSON."""
        return f"{self.prefix}run:{run}:plan"

    def plans(self, run: str) -> str:
        """List: every plan revision ever stored, oldest first."""
        return f"{self.prefix}run:{run}:plans"

    def nodes(self, run: str) -> str:
        """Hash: node id -> NodeState JSON (without `result`, see `results`)."""
        return f"{self.prefix}run:{run}:nodes"

    def results(self, run: str) -> str:
        """Hash: node id -> NodeResult JSON.

        Kept apart from `nodes` because Lua's cjson re-encodes empty lists as `{}`: the
        scripts rewrite node states, and must never round-trip free-form result data.
        """
        return f"{self.prefix}run:{run}:results"

    def holders(self, run: str) -> str:
        """Hash: node id -> jobs-stream entry id of the claim that runs it.

        Lets a duplicate job for the same attempt be told apart from a reclaim of the
        entry that is actually running.
        """
        return f"{self.prefix}run:{run}:holders"

    def done(self, run: str) -> str:
        """Stream: completion records, group COORDINATOR."""
        return f"{self.prefix}run:{run}:done"

    def events(self, run: str) -> str:
        """Stream (capped): events for readers."""
        return f"{self.prefix}run:{run}:events"

    def steps(self, run: str, node: str) -> str:
        """Stream: a node's checkpointed agent steps."""
        return f"{self.prefix}run:{run}:node:{node}:steps"

    def replanned(self, run: str) -> str:
        """Set: `node@attempt` of every dead node whose replan was done."""
        return f"{self.prefix}run:{run}:replanned"

    def calls(self, run: str) -> str:
        """Hash: recorded model calls of the merge stage, call key -> answer JSON."""
        return f"{self.prefix}run:{run}:calls"

    def run_keys(self, run: str, nodes: Iterable[str]) -> list[str]:
        """Every key that belongs to one run (for export, expiry and deletion)."""
        fixed = [self.run(run), self.plan(run), self.plans(run), self.nodes(run),
                 self.results(run), self.holders(run), self.done(run), self.events(run),
                 self.replanned(run), self.calls(run), self.lease(f"run:{run}:leader")]
        return fixed + [self.steps(run, node) for node in nodes]

    def lease(self, name: str) -> str:
        """String with a TTL: who holds the lease `name`."""
        return f"{self.prefix}lease:{name}"
