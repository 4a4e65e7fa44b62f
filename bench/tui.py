"""CPU the terminal UI uses while it watches a 1,000-node run at full speed (prints it; not a
test).

    .venv/bin/python bench/tui.py [--nodes 1000] [--seconds 15] [--mode both|headless|tmux]

A `swarm run "... in N parts" --simulate --sandbox local --no-tui` runs in its own process
(simulator latency 0) against a private redis-server. Once its plan is stored, the UI
watches it:
- headless: WatchApp under Textual's `run_test` in this process; figure = this process's CPU
  seconds / wall seconds (the app and its store client only: the run lives elsewhere).
  Headless Textual lays out and renders widgets but writes nothing to a terminal.
- tmux: the real `swarm watch RUN` in a 200x60 tmux terminal; figure = that process's
  utime+stime (from /proc) / wall seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from procs import free_port, wait_port

from swarm.models import TERMINAL_RUN_STATUSES, Event
from swarm.settings import Settings
from swarm.store import Store
from swarm.tui.app import WatchApp
from swarm.tui.source import RunSource

SWARM = str(Path(sys.executable).with_name("swarm"))
TICK = os.sysconf("SC_CLK_TCK")


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, timeout=10)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_run(env: dict[str, str], nodes: int, out: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [SWARM, "run", f"Write a guide in {nodes} parts", "--simulate", "--sandbox", "local",
         "--no-tui", "--max-agents", "256", "--output", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    if not run_id.startswith("r-"):
        raise SystemExit(f"swarm run did not print a run id: {run_id!r}")
    return proc, run_id


class CountingSource(RunSource):
    events_seen = 0

    async def new_events(self) -> tuple[list[tuple[str, Event]], bool]:
        events, more = await super().new_events()
        self.events_seen += len(events)
        return events, more


async def run_state(settings: Settings, run_id: str) -> tuple[str, int, int]:
    """(status, nodes, done) of the run."""
    store = await Store.connect(settings.redis_url or "", settings)
    try:
        rec = await store.get_run(run_id)
        nodes = await store.get_nodes(run_id)
    finally:
        await store.close()
    return rec.status, len(nodes), sum(n.status == "done" for n in nodes.values())


async def wait_for_plan(settings: Settings, run_id: str, nodes: int) -> None:
    with anyio.fail_after(120):
        while True:
            if (await run_state(settings, run_id))[1] >= nodes:
                return
            await anyio.sleep(0.2)


async def headless(settings: Settings, run_id: str, seconds: float) -> None:
    store = await Store.connect(settings.redis_url or "", settings)
    source = CountingSource(store, settings, run_id)
    app = WatchApp(source)
    try:
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause(2.0)  # the first read catches up with the history
            before = await run_state(settings, run_id)
            events0, polls0 = source.events_seen, app.polls
            cpu0, wall0 = time.process_time(), time.monotonic()
            await pilot.pause(seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            after = await run_state(settings, run_id)
    finally:
        await store.close()
    events = source.events_seen - events0
    print(f"headless  UI CPU {cpu:.2f}s over {wall:.1f}s wall = {100 * cpu / wall:.1f}% of one "
          f"core | {app.polls - polls0} polls, {events} events ({events / wall:.0f}/s), "
          f"done {before[2]} -> {after[2]} of {after[1]} nodes, run {after[0]}")


def tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True,
                          check=False, timeout=10).stdout


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


async def in_tmux(settings: Settings, env: dict[str, str], run_id: str, seconds: float,
                  tmp: Path) -> None:
    if shutil.which("tmux") is None:
        print("tmux      not installed: skipped")
        return
    sock = str(tmp / "tmux.sock")
    envs = " ".join(f"{k}={v!r}" for k, v in env.items())
    tmux(sock, "new-session", "-d", "-s", "bench", "-x", "200", "-y", "60",
         f"exec env {envs} TERM=xterm-256color {SWARM} watch {run_id}")
    try:
        pid = int(tmux(sock, "display", "-p", "-t", "bench", "#{pane_pid}"))
        await anyio.sleep(5.0)  # start-up (imports, first read) is not the steady state
        before = await run_state(settings, run_id)
        cpu0, wall0 = proc_cpu_s(pid), time.monotonic()
        await anyio.sleep(seconds)
        cpu, wall = proc_cpu_s(pid) - cpu0, time.monotonic() - wall0
        after = await run_state(settings, run_id)
        screen = tmux(sock, "capture-pane", "-p", "-t", "bench")
    finally:
        tmux(sock, "kill-server")
    counts = next((line.strip() for line in screen.splitlines() if "total " in line), "?")
    print(f"tmux      UI CPU {cpu:.2f}s over {wall:.1f}s wall = {100 * cpu / wall:.1f}% of one "
          f"core | done {before[2]} -> {after[2]} of {after[1]} nodes, run {after[0]}\n"
          f"          screen: {counts}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--mode", choices=("both", "headless", "tmux"), default="both")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-tui-"))
    redis, url = start_redis(tmp)
    settings = Settings(home=tmp / "home", redis_url=url)
    env = {"SWARM_REDIS_URL": url, "SWARM_HOME": str(tmp / "home"), "SWARM_SIM_LATENCY_MS": "0",
           "PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
    run_proc = None
    try:
        run_proc, run_id = start_run(env, args.nodes - 1, tmp / "out")  # + the merge node
        await wait_for_plan(settings, run_id, args.nodes)
        print(f"run {run_id}: {args.nodes} nodes, simulator latency 0, 256 agents at once, "
              f"{os.cpu_count()} cores")
        if args.mode in ("both", "headless"):
            await headless(settings, run_id, args.seconds)
        if args.mode in ("both", "tmux"):
            await in_tmux(settings, env, run_id, args.seconds, tmp)
        status = (await run_state(settings, run_id))[0]
        if status in TERMINAL_RUN_STATUSES:
            print(f"note: the run ended ({status}) during the measurement; use fewer --seconds")
    finally:
        if run_proc is not None and run_proc.poll() is None:
            os.killpg(run_proc.pid, signal.SIGTERM)
            run_proc.wait(timeout=30)
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
