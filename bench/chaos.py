"""Chaos benchmark: bigger versions of tests/chaos/, printing figures.

    .venv/bin/python bench/chaos.py                      # every scenario, 500 parts
    .venv/bin/python bench/chaos.py --parts 300 --only coordinator,workers
    .venv/bin/python bench/chaos.py --only docker --docker-parts 150

Scenarios (each on its own redis-server, simulator and SWARM_HOME, all under --dir):
  coordinator  `swarm resume` (leader and worker pool) SIGKILLed --kills times, resumed
  workers      `swarm worker` processes SIGKILLed --kills times, restarted; a `swarm
               coordinator` leads
  stop         a worker SIGSTOPped past its lease, then SIGCONTed
  redis-always redis-server SIGKILLed and restarted --redis-restarts times, appendfsync always
  redis-power  the same with appendfsync everysec and the AOF cut back by one second
               (a power loss: acknowledged writes are lost and redone)
  docker       Docker sandboxes: everything SIGKILLed twice with 50+ containers alive;
               `swarm gc` after the first, `swarm resume` after the second

Every scenario runs the same goal, simulator seed and run id as one undisturbed baseline run
(see tests/chaos/harness.py for why), and its merged synthesis and output tree must equal the
baseline's. Figures per scenario: kills, the run phases they hit, agents they interrupted,
LLM calls repeated (from the simulator's per-(run, agent, step) counts), nodes redone after
they were recorded done, nodes lost, and wall time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos import harness

SCENARIOS = ("coordinator", "workers", "stop", "redis-always", "redis-power", "docker")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, default=500, help="agent nodes (plus one merge node)")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per process scenario")
    ap.add_argument("--redis-restarts", type=int, default=3)
    ap.add_argument("--docker-parts", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--dir", type=Path, default=None, help="keep everything here")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    if not shutil.which("redis-server"):
        print("redis-server is not installed", file=sys.stderr)
        return 3
    root = args.dir or Path(tempfile.mkdtemp(prefix="swarm-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# swarm chaos bench: {args.parts} parts (+1 merge node), seed {args.seed}, "
          f"work in {root}", flush=True)

    baselines: dict[int, harness.Outcome] = {}

    def baseline(parts: int) -> harness.Outcome:
        if parts not in baselines:
            began = time.monotonic()
            baselines[parts] = harness.undisturbed(root / f"baseline-{parts}", parts)
            print(f"baseline {parts} parts: {baselines[parts].stats['total']} LLM calls, "
                  f"{time.monotonic() - began:.1f}s", flush=True)
        return baselines[parts]

    n, k, seed = args.parts, args.kills, args.seed
    runs: dict[str, Callable[[], tuple[Any, ...]]] = {
        "coordinator": lambda: harness.kill_coordinator(root / "coordinator", n, kills=k,
                                                        seed=seed, merging=max(2, k // 8)),
        "workers": lambda: harness.kill_workers(root / "workers", n, kills=k, seed=seed + 1),
        "stop": lambda: harness.stop_worker(root / "stop", n, seed=seed + 2)[:2],
        "redis-always": lambda: harness.kill_redis(root / "redis-always", n, seed=seed + 3,
                                                   restarts=args.redis_restarts,
                                                   appendfsync="always"),
        "redis-power": lambda: harness.kill_redis(root / "redis-power", n, seed=seed + 4,
                                                  restarts=args.redis_restarts,
                                                  appendfsync="everysec", lose_s=1.0),
        "docker": lambda: harness.kill_with_containers(root / "docker", args.docker_parts,
                                                       latency_ms=12_000, finish_latency_ms=5),
    }
    failures = 0
    for name in chosen:
        parts = args.docker_parts if name == "docker" else n
        base = baseline(parts)
        began = time.monotonic()
        try:
            result = runs[name]()
            out, kills = result[0], result[1]
            extra = result[2] if len(result) > 2 else {}
            figures = harness.check(out, base, kills, nodes=parts + 1,
                                    exact_once=name != "redis-power")
        except AssertionError as exc:
            failures += 1
            print(f"{name:<13} FAILED after {time.monotonic() - began:.1f}s: "
                  f"{str(exc).splitlines()[0]}", flush=True)
            traceback.print_exc(limit=3)
            continue
        print(f"{name:<13} OK {time.monotonic() - began:6.1f}s  {figures.line()}"
              + (f"; {extra}" if extra else "") + "; result equals the baseline", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
