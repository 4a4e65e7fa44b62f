"""Scale benchmark: N agents x k steps against the simulator with latency L.

Prints, per N: wall time of the agent phase, the ideal (k x L), orchestrator CPU seconds,
CPU milliseconds per agent step (an LLM turn with its checkpoint; the only tool offered is
`list_files`, a host-side directory listing, so tool cost is near zero), and peak memory.

The orchestrator runs as real `swarm` processes (one `swarm resume` = coordinator + worker
slots, plus `--procs - 1` extra `swarm worker` processes), against a redis-server and a
simulator in their own processes, so their CPU is not counted as the orchestrator's.
CPU and peak RSS come from os.wait4 of each orchestrator process.

    .venv/bin/python bench/scale.py --n 10,100,300,1000 --k 5 --latency-ms 5000 --procs 2
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from procs import free_port, start_simulator, wait_port

from swarm.models import NodeLimits, NodeSpec, Plan, RunSpec
from swarm.settings import Settings
from swarm.store import Store

ROOT = Path(__file__).resolve().parent.parent


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def bench_plan(n: int, k: int) -> Plan:
    limits = NodeLimits(max_steps=k + 2)
    return Plan(nodes=[NodeSpec(id=f"a{i:04d}", title=f"agent {i}", instructions="bench",
                                tools=["list_files", "finish"], limits=limits)
                       for i in range(n)])


async def create_run(settings: Settings, n: int, k: int) -> str:
    store = await Store.connect(settings.redis_url or "", settings)
    try:
        rec = await store.create_run(RunSpec(goal=f"bench {n}x{k}", plan=bench_plan(n, k),
                                             max_agents=n, sandbox="local"))
        return rec.id
    finally:
        await store.close()


def proc_cpu_s(pids: list[int]) -> float:
    """utime + stime of live processes, from /proc (clock ticks)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def agent_phase(settings: Settings, run_id: str, n: int,
                      pids: list[int]) -> tuple[float, float, float, int]:
    """(t_start, t_done, orchestrator CPU seconds in between, steps): the agent phase runs
    from the run entering `running` (processes started, plan stored) to every node done."""
    store = await Store.connect(settings.redis_url or "", settings)
    try:
        while (await store.get_run(run_id)).status == "planning":  # noqa: ASYNC110 - polling a store
            await anyio.sleep(0.02)
        t0, cpu0 = time.monotonic(), proc_cpu_s(pids)
        while True:
            nodes = await store.get_nodes(run_id)
            if sum(1 for s in nodes.values() if s.status in ("done", "dead")) >= n:
                t1, cpu1 = time.monotonic(), proc_cpu_s(pids)
                return t0, t1, cpu1 - cpu0, (await store.get_run(run_id)).usage.steps
            await anyio.sleep(0.1)
    finally:
        await store.close()


def rusage_of(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of a finished child, reaped here."""
    _, _, ru = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def one(n: int, k: int, latency_ms: int, procs: int, redis_port: int) -> dict[str, float]:
    sim, sim_port = start_simulator(latency_ms, tool_steps=k - 1)
    home = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    base = f"http://127.0.0.1:{sim_port}/v1"
    env = {**os.environ, "SWARM_HOME": str(home),
           "SWARM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "SWARM_SANDBOX": "local", "SWARM_MAX_AGENTS": str(n),
           "SWARM_REDIS_MAX_CONNECTIONS": "128"}
    for role in ("PLANNER", "WORKER", "MERGER"):
        env[f"SWARM_ENDPOINTS__{role}__BASE_URL"] = base
        env[f"SWARM_ENDPOINTS__{role}__MODEL"] = "swarm-sim"
        env[f"SWARM_ENDPOINTS__{role}__MAX_CONCURRENCY"] = str(max(64, n))
        env[f"SWARM_ENDPOINTS__{role}__TIMEOUT_S"] = str(latency_ms / 1000 + 30)
    settings = Settings(home=home, redis_url=env["SWARM_REDIS_URL"])
    run_id = anyio.run(create_run, settings, n, k)
    slots = -(-n // procs)
    swarm = [sys.executable, "-m", "swarm.cli"]
    log = open(home / "bench.log", "ab")
    quiet = {"stdout": log, "stderr": log, "env": env}
    time.sleep(0.5)  # let the worker processes finish importing before the leader starts
    workers = [subprocess.Popen([*swarm, "worker", "--slots", str(slots), "--sandbox", "local"],
                                **quiet) for _ in range(procs - 1)]  # type: ignore[call-overload]
    time.sleep(1.5)
    t_launch = time.monotonic()
    leader = subprocess.Popen([*swarm, "resume", run_id, "--no-tui", "--slots", str(slots)],
                              **quiet)  # type: ignore[call-overload]
    pids = [leader.pid, *(w.pid for w in workers)]
    t0, t1, phase_cpu, steps = anyio.run(agent_phase, settings, run_id, n, pids)
    cpu, mem = rusage_of(leader)  # it exits once the run is merged
    t_end = time.monotonic()
    for w in workers:
        w.send_signal(signal.SIGTERM)
        wcpu, wmem = rusage_of(w)
        cpu, mem = cpu + wcpu, max(mem, wmem)
    sim.terminate()
    sim.wait()
    return {"n": n, "k": k, "steps": steps, "wall_s": t1 - t0, "total_s": t_end - t_launch,
            "ideal_s": k * latency_ms / 1000, "phase_cpu_s": phase_cpu, "cpu_s": cpu,
            "cpu_ms_per_step": 1000 * phase_cpu / max(1, steps), "peak_mb": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="10,100,300,1000")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--latency-ms", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2, help="orchestrator processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis, port = start_redis(Path(tmp))
        try:
            print(f"{'N':>5} {'k':>3} {'steps':>6} {'wall s':>7} {'ideal s':>7} {'ratio':>6} "
                  f"{'CPU s':>6} {'CPU ms/step':>11} {'total s':>7} {'total CPU s':>11} "
                  f"{'peak MB':>7}", flush=True)
            for n in (int(x) for x in args.n.split(",")):
                r = one(n, args.k, args.latency_ms, args.procs, port)
                print(f"{r['n']:>5} {r['k']:>3} {r['steps']:>6} {r['wall_s']:>7.1f} "
                      f"{r['ideal_s']:>7.1f} {r['wall_s'] / r['ideal_s']:>6.2f} "
                      f"{r['phase_cpu_s']:>6.2f} {r['cpu_ms_per_step']:>11.2f} "
                      f"{r['total_s']:>7.1f} {r['cpu_s']:>11.1f} {r['peak_mb']:>7.0f}",
                      flush=True)
            print("wall/CPU s/ms per step: the agent phase (run running -> every agent done), "
                  "summed over all orchestrator processes. total: from launch to the merged "
                  "result, including process start-up and the merge; peak MB: largest RSS of "
                  "one orchestrator process.")
        finally:
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    main()
