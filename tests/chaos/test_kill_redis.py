"""Chaos: redis-server SIGKILLed mid-run and restarted on its AOF, while swarm runs.

With `appendfsync always` nothing acknowledged may be lost: every node recorded done before
the kill is still done after it, every step and completion is still there, and nothing is
redone. A SIGKILL of redis-server alone normally loses nothing (its writes sit in the OS page
cache), so the `everysec` case simulates the crash it is documented for, a power loss: the
AOF is cut back by one second of writes. Acknowledged work is then lost, and redone; the run
must still complete with the same result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import harness
from tests.chaos.conftest import SMALL

pytestmark = pytest.mark.slow


def test_redis_killed_with_appendfsync_always_loses_nothing(
    chaos_root: Path, baseline_small: harness.Outcome
) -> None:
    out, kills, lost = harness.kill_redis(chaos_root, SMALL, seed=21, restarts=2,
                                          appendfsync="always", window=(0.5, 1.5))
    figures = harness.check(out, baseline_small, kills, nodes=SMALL + 1)
    print(f"\nredis kills (always): {figures.line()}; lost {lost}")
    assert len(kills) == 2
    assert lost.get("done nodes", 0) == 0 and lost.get("steps", 0) == 0
    assert lost.get("completions", 0) == 0


def test_redis_power_loss_with_appendfsync_everysec_still_completes(
    chaos_root: Path, baseline_small: harness.Outcome
) -> None:
    out, kills, lost = harness.kill_redis(chaos_root, SMALL, seed=22, restarts=2,
                                          appendfsync="everysec", lose_s=1.0, window=(0.5, 1.5))
    figures = harness.check(out, baseline_small, kills, nodes=SMALL + 1, exact_once=False)
    print(f"\nredis power loss (everysec): {figures.line()}; lost {lost}")
    assert len(kills) == 2
    assert lost.get("aof bytes cut", 0) > 0  # the simulated loss did drop acknowledged writes
