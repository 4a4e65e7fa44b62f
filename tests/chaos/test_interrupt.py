"""Ctrl-C on an attached `swarm run`/`swarm resume`: the first one stops gracefully (the
agents finish the model call in flight, checkpoint it and hand their jobs back; the leader
lets go of its lease at once), a second one stops at once. Either way the run is left
resumable and `swarm resume` completes it; after a graceful stop no model call is repeated."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.chaos import harness

pytestmark = pytest.mark.slow

PARTS = 30


def interrupt(root: Path, presses: int) -> tuple[harness.Outcome, harness.Kill, str, float,
                                                int]:
    """SIGINT the attached process `presses` times while agents hold jobs; then resume.
    Returns the outcome, what the interrupt cut off, the interrupted process's log, how long
    it took to exit, and how many jobs it held when signalled."""
    with harness.Cluster(root, latency_ms=400) as c:
        c.create_run(harness.goal_for(PARTS), max_agents=16)
        proc = c.resume(slots=16)
        c.wait_for(lambda: len(c.interrupted_by(proc.pid)) >= 8, 60,
                   "agents holding jobs", poll=0.05)
        holding = len(c.interrupted_by(proc.pid))
        hit = harness.Kill(target="resume", pid=proc.pid, phase=harness.phase_of(c),
                           at=time.monotonic())
        began = time.monotonic()
        for _ in range(presses):
            proc.signal(signal.SIGINT)
            time.sleep(0.05)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - began
        assert rc == 130, f"exit {rc}\n{proc.tail()}"
        log = proc.tail(4000)
        # The lease is released, not left to expire (its TTL is 6 s): resume starts at once.
        assert c.leader() is None
        # The agents cut off are those whose nodes are still running under the stopped
        # process (read after it exited: it may have taken jobs after the signal was sent).
        # A graceful stop leaves none: every held job was handed back.
        hit.interrupted = c.interrupted_by(proc.pid)
        if presses == 1:
            assert not hit.interrupted
        assert c.run_status() == "running"
        again = c.resume(slots=16)
        assert again.wait(timeout=120) == 0, again.tail()
        return harness.finish(c), hit, log, took, holding


def test_first_ctrl_c_stops_gracefully_and_repeats_no_model_call(chaos_root: Path) -> None:
    out, hit, log, took, holding = interrupt(chaos_root, presses=1)
    assert holding >= 8
    assert "stopped after handing its jobs back" in log
    assert "swarm resume r-chaos" in log
    assert took < 10, f"a graceful stop waits one model call (0.4 s), not {took:.1f}s"
    # No agent was cut off (hit.interrupted is empty), so no model call may be repeated:
    # every agent checkpointed its call before letting go.
    harness.check(out, None, [hit], nodes=PARTS + 1)


def test_second_ctrl_c_stops_at_once_and_loses_nothing_recorded(chaos_root: Path) -> None:
    out, hit, log, took, holding = interrupt(chaos_root, presses=2)
    assert holding >= 8
    assert "stopped at once" in log
    assert took < 10
    # At most one repeated model call per agent that was cut off mid-call.
    harness.check(out, None, [hit], nodes=PARTS + 1)


def test_sigterm_on_a_coordinator_frees_its_runs_for_the_next_one(chaos_root: Path) -> None:
    """`docker-compose stop`, or a service manager, stops `swarm coordinator` with SIGTERM:
    it must let go of the runs it leads at once, so the next coordinator adopts them without
    waiting out the lease, and the run completes as if nothing happened."""
    with harness.Cluster(chaos_root, latency_ms=400) as c:
        c.create_run(harness.goal_for(PARTS), max_agents=16)
        c.worker("worker-a", slots=16)
        first = c.coordinator()
        c.wait_for(lambda: c.run_status() == "running" and c.leader() is not None, 60,
                   "the coordinator to lead the run")
        began = time.monotonic()
        first.signal(signal.SIGTERM)
        rc = first.wait(timeout=30)
        took = time.monotonic() - began
        assert rc == 0, f"exit {rc}\n{first.tail()}"
        assert took < 10, f"a coordinator stops in well under its lease TTL, not {took:.1f}s"
        assert "coordinator stopped" in first.tail(2000)
        assert c.leader() is None  # released, not left to expire
        assert c.run_status() == "running"
        second = c.coordinator()
        c.wait_for(lambda: c.leader() is not None, 10, "the next coordinator to adopt the run")
        c.wait_finished(120)
        out = harness.finish(c)
        assert second.alive()
    harness.check(out, None, [], nodes=PARTS + 1)
