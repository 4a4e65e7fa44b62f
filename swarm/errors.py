"""One error root. Names say what the caller should do about it.

The CLI maps each family to an exit code (DESIGN.md, CLI contract):
2 bad input, 3 infrastructure unavailable, 1 the run failed.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Root of every error swarm raises on purpose."""

    exit_code = 1


class UserError(SwarmError):
    """The input is wrong: fix the goal, the workflow file, the flag, the run id."""

    exit_code = 2


class NotFound(UserError):
    """A run, node or file the user named does not exist."""


class PlanInvalid(UserError):
    """A plan (from a planner or a workflow file) breaks a DAG rule."""


class InfraUnavailable(SwarmError):
    """Something swarm depends on cannot be reached: start it or point swarm elsewhere."""

    exit_code = 3


class RedisUnavailable(InfraUnavailable):
    pass


class DockerUnavailable(InfraUnavailable):
    pass


class ModelUnavailable(InfraUnavailable):
    """The model endpoint cannot be reached or keeps failing after retries."""


class ModelError(SwarmError):
    """The model answered, but with something swarm cannot use (after the allowed repairs)."""


class SandboxError(SwarmError):
    """A sandbox could not be opened, or a command in it could not be run."""


class BudgetExceeded(SwarmError):
    """A run's budget (tokens, cost, wall time, steps) is used up."""


class FencedOut(SwarmError):
    """This worker no longer owns the job: another worker reclaimed it. Stop writing."""


class StaleWrite(SwarmError):
    """A compare-and-set transition lost: the state moved on since it was read."""
