"""Sandbox figures on this machine (prints them; not a test).

    .venv/bin/python bench/sandbox.py [--quick]

- acquire: open() + start() of a node's container from the warm pool, and cold (median of 50)
- per command: wall time and host CPU of a `true` through the command server and through
  `docker exec` (200 each). Host CPU = dockerd + containerd + shims + runc (their own and
  reaped children's time, from /proc/<pid>/stat) + this process (os.times) + the containers'
  cgroups (cpuacct), divided by the number of commands.
- throughput: `true` commands per second with 100 sandboxes in use at once.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from swarm.sandbox.docker import DockerBackend
from swarm.sandbox.docker_sandbox import DockerSandbox
from swarm.settings import Settings

QUICK = "--quick" in sys.argv
N_ACQUIRE = 10 if QUICK else 50
N_COMMANDS = 50 if QUICK else 200
N_PARALLEL = 20 if QUICK else 100
THROUGHPUT_S = 5.0 if QUICK else 10.0
TICK = os.sysconf("SC_CLK_TCK")
DAEMONS = ("dockerd", "containerd", "runc", "docker-init")


def daemon_ticks() -> dict[str, int]:
    """pid -> CPU ticks of the engine's processes (their own and reaped children's)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index(b"(") + 1: raw.rindex(b")")].decode()
        if comm in DAEMONS or comm.startswith("containerd-shim"):
            fields = raw.rsplit(b")", 1)[1].split()
            out[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return out


def daemon_delta_s(before: dict[str, int], after: dict[str, int]) -> float:
    # A process gone by the end (the shim of a removed container) is left out: a little
    # under-counted, never negative.
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / TICK


def cgroup_cpu_s(ids: list[str]) -> float:
    total = 0
    for cid in ids:
        try:
            total += int(Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage").read_text())
        except OSError:
            pass
    return total / 1e9


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __enter__(self) -> CpuMeter:
        self.d0, self.s0, self.c0 = daemon_ticks(), self_cpu_s(), cgroup_cpu_s(self.ids)
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemons = daemon_delta_s(self.d0, daemon_ticks())
        self.me = self_cpu_s() - self.s0
        self.containers = cgroup_cpu_s(self.ids) - self.c0

    def per(self, n: int) -> str:
        total = (self.daemons + self.me + self.containers) / n * 1000
        return (f"{total:6.2f} ms host CPU (daemons {self.daemons / n * 1000:.2f}, "
                f"this process {self.me / n * 1000:.2f}, in containers "
                f"{self.containers / n * 1000:.2f})")


def ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[int(len(values) * 0.9) - 1]
    return f"p50 {statistics.median(values) * 1000:7.2f} ms   p90 {p90 * 1000:7.2f} ms"


async def timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def acquire(backend: DockerBackend, run: str, n: int) -> tuple[list[float], list[str]]:
    times, ids = [], []
    for i in range(n):
        t = time.perf_counter()
        sb = await backend.open(run, f"n{i}")
        ids.append(await sb.start())
        times.append(time.perf_counter() - t)
        assert sb.pooled == (run == "warm"), "the pool ran dry: raise its size"
    return times, ids


async def bench_acquire(settings: Settings) -> None:
    async with DockerBackend(settings, pool_size=N_ACQUIRE) as backend:
        t = time.perf_counter()
        with CpuMeter([]) as fill:
            await backend.pool.wait(N_ACQUIRE)
            fill.ids = backend.pool.ready  # new containers: their whole life counts
        took = time.perf_counter() - t
        print(f"pool of {N_ACQUIRE} filled in {took:.1f} s; per container: "
              f"{fill.per(N_ACQUIRE)}")
        backend.pool.size = 0  # no refill competing with the measurement
        with CpuMeter([]) as warm_cpu:
            warm, _ = await acquire(backend, "warm", N_ACQUIRE)
        with CpuMeter([]) as cold_cpu:
            cold, cold_cpu.ids = await acquire(backend, "cold", N_ACQUIRE)
        print(f"acquire warm (n={N_ACQUIRE})  {ms(warm)}")
        print(f"    {warm_cpu.per(N_ACQUIRE)}")
        print(f"acquire cold (n={N_ACQUIRE})  {ms(cold)}")
        print(f"    {cold_cpu.per(N_ACQUIRE)}")
        await backend.remove_run("warm")
        await backend.remove_run("cold")


async def bench_commands(settings: Settings) -> None:
    async with DockerBackend(settings) as backend:
        sb = await backend.open("cmd", "n0")
        cid = await sb.start()
        await sb.exec("true")
        with CpuMeter([cid]) as cpu:
            walls = await timed(lambda: sb.exec("true"), N_COMMANDS)
        print(f"`true` via command server (n={N_COMMANDS})  {ms(walls)}")
        print(f"    {cpu.per(N_COMMANDS)}")
        with CpuMeter([cid]) as cpu:
            walls = await timed(lambda: backend.exec_run(cid, "true", timeout_s=60,
                                                         output_cap=1000), N_COMMANDS)
        print(f"`true` via docker exec    (n={N_COMMANDS})  {ms(walls)}")
        print(f"    {cpu.per(N_COMMANDS)}")
        await backend.remove_run("cmd")


async def bench_throughput(settings: Settings) -> None:
    async with DockerBackend(settings) as backend:
        sandboxes: list[DockerSandbox] = [await backend.open("par", f"n{i}")
                                          for i in range(N_PARALLEL)]
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for sb in sandboxes:
                tg.start_soon(sb.start)
        print(f"{N_PARALLEL} containers started concurrently in "
              f"{time.perf_counter() - t:.1f} s")
        ids = [sb.container_id or "" for sb in sandboxes]
        count = failures = 0
        end = time.monotonic() + THROUGHPUT_S

        async def loop(sb: DockerSandbox) -> None:
            nonlocal count, failures
            while time.monotonic() < end:
                r = await sb.exec("true")
                count += 1
                failures += not r.ok

        with CpuMeter(ids) as cpu:
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for sb in sandboxes:
                    tg.start_soon(loop, sb)
            took = time.perf_counter() - t
        print(f"throughput with {N_PARALLEL} sandboxes busy: {count / took:7.0f} commands/s "
              f"({count} in {took:.1f} s, {failures} failed)")
        print(f"    {cpu.per(count)}")
        t = time.perf_counter()
        removed = await backend.remove_run("par")
        print(f"removed {removed} containers in {time.perf_counter() - t:.1f} s")


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        settings = Settings(home=Path(home))
        print(f"host: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
        try:
            await bench_acquire(settings)
            await bench_commands(settings)
            await bench_throughput(settings)
        finally:
            async with DockerBackend(settings) as cleaner:
                await cleaner.gc()


if __name__ == "__main__":
    anyio.run(main)
