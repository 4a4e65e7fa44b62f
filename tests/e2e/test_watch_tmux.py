"""`swarm watch` as a user runs it: the real binary in a real terminal (tmux), on a run of
300 planned nodes made by the simulator; the screen must show the store's counts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from swarm.commands import status_report
from swarm.models import RunSpec
from swarm.runtime import run_in_process
from swarm.tui.format import counts_plain
from swarm.tui.snapshot import build_snapshot
from tests.conftest import require

pytestmark = pytest.mark.anyio
SWARM = str(Path(sys.executable).with_name("swarm"))


class Tmux:
    """One private tmux server (its own socket), killed at the end."""

    def __init__(self, sock: Path) -> None:
        self.sock = str(sock)

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                              timeout=10, check=False)
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "watch")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            assert time.monotonic() < deadline, f"{text!r} never showed; the screen:\n{screen}"
            time.sleep(0.2)

    def wait_gone_text(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text in (screen := self.screen()):
            assert time.monotonic() < deadline, f"{text!r} stayed; the screen:\n{screen}"
            time.sleep(0.2)

    def wait_gone(self, timeout: float = 10.0) -> None:
        """Until the session ends (its only process, swarm watch, exited)."""
        deadline = time.monotonic() + timeout
        while subprocess.run(["tmux", "-S", self.sock, "has-session", "-t", "watch"],
                             capture_output=True, check=False).returncode == 0:
            assert time.monotonic() < deadline, "swarm watch did not quit:\n" + self.screen()
            time.sleep(0.1)


async def stopped_run(rt, out: Path, parts: int = 300, done: int = 10) -> str:
    """A run of `parts` planned nodes whose process stopped (as if it crashed) once `done`
    of them were done: its state no longer moves, and `swarm resume` could continue it."""
    spec = RunSpec(goal=f"Write a handbook in {parts} parts", simulate=True, sandbox="local",
                   output_dir=str(out), max_agents=4)
    run_id = (await rt.store.create_run(spec)).id
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_in_process(rt, run_id, slots=4))
        with anyio.fail_after(60):
            while True:
                nodes = await rt.store.get_nodes(run_id)
                if sum(n.status == "done" for n in nodes.values()) >= done:
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()  # the process "crashes" here
    return run_id


async def test_swarm_watch_shows_the_counts_of_a_300_node_run(runtime_factory, tmp_path):
    require(shutil.which("tmux") is not None, "tmux not installed")
    async with runtime_factory() as (rt, _sim):
        run_id = await stopped_run(rt, tmp_path / "out")
        report = await status_report(rt.store, run_id)
        snap = build_snapshot(await rt.store.get_run(run_id), await rt.store.get_plan(run_id),
                              await rt.store.get_nodes(run_id))
        settings = rt.settings
    assert snap.total == 301 and report.status == "running"
    assert snap.counts == report.counts and snap.counts["done"] >= 10
    expected = counts_plain(snap)

    tmux = Tmux(tmp_path / "tmux.sock")
    env = {"SWARM_REDIS_URL": settings.redis_url or "", "SWARM_HOME": str(settings.home),
           "PATH": os.environ.get("PATH", ""), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    command = " ".join(f"{k}={v!r}" for k, v in env.items()) + f" {SWARM} watch {run_id}"
    try:
        tmux("new-session", "-d", "-s", "watch", "-x", "200", "-y", "50", f"env -i {command}")
        screen = tmux.wait_for(expected)
        assert run_id in screen and "running" in screen
        assert "steps" in screen and "/∞" in screen  # budgets, used/limit
        assert "part-001" in screen  # the plan table
        tmux("send-keys", "-t", "watch", "/")
        tmux.wait_for("filter: status names")  # the box has the focus: type into it
        tmux("send-keys", "-t", "watch", "merge", "Enter")
        tmux.wait_for("showing 1 matching")
        # A key right after Escape would reach the app as alt+key: one key per send here.
        tmux("send-keys", "-t", "watch", "Escape")
        tmux.wait_gone_text("showing 1 matching")  # the whole plan again
        tmux("send-keys", "-t", "watch", "?")
        tmux.wait_for("cancel the run (asks first)")
        tmux("send-keys", "-t", "watch", "Escape")
        tmux.wait_gone_text("cancel the run (asks first)")
        tmux("send-keys", "-t", "watch", "q")
        tmux.wait_gone()
    finally:
        tmux("kill-server")
