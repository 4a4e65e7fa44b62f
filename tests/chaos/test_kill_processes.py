"""Chaos: swarm's processes SIGKILLed (and SIGSTOPped) at seeded random moments of a
201-node run, resumed each time. What must hold (harness.check): the run completes, no node
is lost, none is redone after it was recorded done, no step is recorded twice, at most one
LLM call is repeated per interrupted agent per kill (the simulator's counts), and the merged
result equals that of an undisturbed run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import harness
from tests.chaos.conftest import PARTS

pytestmark = pytest.mark.slow


def test_coordinator_sigkilled_ten_times(chaos_root: Path, baseline: harness.Outcome) -> None:
    out, kills = harness.kill_coordinator(chaos_root, PARTS, kills=11, seed=11, merging=2)
    figures = harness.check(out, baseline, kills, nodes=PARTS + 1)
    print(f"\ncoordinator kills: {figures.line()}")
    assert figures.kills >= 10
    assert {"running", "merging"} <= set(figures.phases)  # and usually "planning" too


def test_workers_sigkilled_ten_times(chaos_root: Path, baseline: harness.Outcome) -> None:
    out, kills = harness.kill_workers(chaos_root, PARTS, kills=10, seed=12)
    figures = harness.check(out, baseline, kills, nodes=PARTS + 1)
    print(f"\nworker kills: {figures.line()}")
    assert figures.kills >= 10
    assert figures.interrupted > 0


def test_worker_sigstopped_past_its_lease_commits_nothing(
    chaos_root: Path, baseline: harness.Outcome
) -> None:
    out, kills, zombie_log = harness.stop_worker(chaos_root, PARTS, seed=13)
    figures = harness.check(out, baseline, kills, nodes=PARTS + 1)
    print(f"\nworker SIGSTOP: {figures.line()}")
    held = kills[0].interrupted
    assert len(held) >= 3
    # Every job it held was finished by the other worker, not by the zombie.
    mark = f"-{kills[0].pid}-"
    assert not [n for n in held if mark in (out.workers.get(n) or "")]
    assert "Traceback" not in zombie_log
    # It found out at its first write or guard check after waking, and dropped the jobs.
    assert "taken over by another worker" in zombie_log or "fenced out" in zombie_log
