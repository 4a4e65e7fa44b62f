"""Chaos with Docker sandboxes: everything SIGKILLed while 50+ containers run. `swarm gc`
then leaves none; `swarm resume` re-attaches or recreates each node's sandbox (workspaces
intact: the merged output equals an undisturbed run's) and leaves none when the run ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import harness
from tests.chaos.conftest import SMALL
from tests.conftest import image_exists, require

pytestmark = [pytest.mark.slow, pytest.mark.docker]

@pytest.mark.timeout(900)  # two 80-agent waves of 12 s model answers, then the rest
def test_sigkill_with_50_live_containers_leaves_no_orphans(
    chaos_root: Path, baseline_small: harness.Outcome
) -> None:
    require(image_exists("swarm-sandbox:latest"),
            "no Docker engine or no swarm-sandbox:latest image")
    # Slow answers while killing (agents hold their containers for two 12 s answers, longer
    # than a slow engine needs to start 80), then fast.
    out, kills, figures = harness.kill_with_containers(chaos_root, SMALL, min_live=50,
                                                       latency_ms=12_000, finish_latency_ms=5)
    print(f"\ndocker: {figures}")
    assert figures["live containers at kill 1"] >= 50
    assert figures["live containers at kill 2"] >= 50
    assert figures["left after swarm gc"] == 0
    assert figures["left after resume"] == 0
    harness.check(out, baseline_small, kills, nodes=SMALL + 1)
