"""docker-compose.yml's stack, as a user brings it up: Redis, the simulator, a coordinator
and two workers in containers of the swarm:latest image, sandboxes on the host's engine. A
run submitted from the host (`swarm run --submit`) is adopted by the coordinator, run by both
workers, merged, and fetched with `swarm result`; a worker stopped mid-run (SIGTERM) hands
its jobs back and exits cleanly, and the run still completes. `docker-compose stop` ends
every service cleanly, and nothing is left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from swarm.models import NodeState
from swarm.sandbox.layout import Layout
from swarm.settings import Settings
from swarm.store import Store
from tests.conftest import free_port, image_exists, redis_command, redis_ping, require
from tests.e2e.conftest import docker_engine_answers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PARTS = 24


def inspect(*containers: str) -> list[dict]:
    return json.loads(subprocess.run(["docker", "inspect", *containers], capture_output=True,
                                     text=True, check=True).stdout)


def container_log(name: str) -> str:
    return subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout


class Stack:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.project = f"swarmtest{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.env = {**os.environ, "SWARM_STACK_HOME": str(home),
                    "SWARM_REDIS_PORT": str(self.port), "SWARM_WORKER_SLOTS": "6",
                    "SWARM_SIM_LATENCY_MS": "300"}
        for key in [k for k in self.env if k.startswith("SWARM_ENDPOINTS__")]:
            del self.env[key]  # the stack's own simulator answers
        # The host side of the CLI: the stack's Redis and the same home.
        self.cli_env = {**self.env, "SWARM_REDIS_URL": f"redis://127.0.0.1:{self.port}/0",
                        "SWARM_HOME": str(home)}

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"),
                               "-p", self.project, *args], env=self.env, text=True,
                              capture_output=True, timeout=timeout)
        assert done.returncode == 0 or not check, \
            f"docker-compose {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout

    def swarm(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "swarm.cli", *args], env=self.cli_env,
                              text=True, capture_output=True, timeout=60)
        assert done.returncode == 0, f"swarm {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def status(self, run_id: str) -> dict:
        return json.loads(self.swarm("status", run_id, "--json"))

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}_{service}_{index}"

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", timeout=60,
                            check=False)[-6000:]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require(docker_engine_answers(), "no Docker engine")
    require(shutil.which("docker-compose") is not None, "no docker-compose (Compose v1)")
    require(image_exists("swarm:latest") and image_exists("swarm-sandbox:latest"),
            "no swarm:latest or swarm-sandbox:latest image (scripts/provision.sh builds them)")
    s = Stack(tmp_path / "home")
    s.home.mkdir()
    try:
        s.compose("up", "-d", "--no-build", "--scale", "worker=2")
        deadline = time.monotonic() + 60
        while not redis_ping(s.port):
            assert time.monotonic() < deadline, "the stack's Redis never answered\n" + s.logs()
            time.sleep(0.5)
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", "-t", "30")


async def nodes_of(stack: Stack, run_id: str) -> dict[str, NodeState]:
    store = await Store.connect(stack.cli_env["SWARM_REDIS_URL"], Settings())
    try:
        return await store.get_nodes(run_id)
    finally:
        await store.close()


def wait_status(stack: Stack, run_id: str, cond, what: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = stack.status(run_id)
        if cond(st):
            return st
        if st["status"] in ("failed", "cancelled", "budget_exhausted"):
            raise AssertionError(f"run ended {st['status']} while waiting for {what}\n"
                                 + stack.logs())
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {st}\n" + stack.logs()
        time.sleep(0.5)


def test_a_run_submitted_to_the_compose_stack_completes_across_its_workers(
    stack: Stack, tmp_path: Path
) -> None:
    # The stack's Redis keeps what resume relies on: AOF on, nothing evicted.
    assert redis_command(stack.port, "CONFIG", "GET", "appendonly").endswith(b"yes\r\n")
    assert redis_command(stack.port, "CONFIG", "GET", "maxmemory-policy").endswith(
        b"noeviction\r\n")

    run_id = stack.swarm("run", "--submit",
                         f"Write a field guide to Redis Streams in {PARTS} parts").strip()
    assert run_id.startswith("r-")

    # Stop one worker while it holds jobs: SIGTERM, as `docker-compose stop` sends it.
    wait_status(stack, run_id, lambda st: st["counts"]["done"] >= 4, "4 nodes done", 180)
    victim = stack.container("worker", 1)
    stop = subprocess.run(["docker", "stop", "-t", "60", victim], capture_output=True,
                          timeout=90)
    assert stop.returncode == 0
    state = inspect(victim)[0]["State"]
    assert state["ExitCode"] == 0, stack.logs()  # stopped by its own hand, not killed
    victim_log = container_log(victim)
    assert "handed back" in victim_log, victim_log[-3000:]
    assert "Traceback" not in victim_log, victim_log[-3000:]

    final = wait_status(stack, run_id, lambda st: st["status"] == "done", "the run to end", 300)
    assert final["counts"]["done"] == PARTS + 1

    # Both workers ran nodes (6 slots each cannot hold 24 parts at once), in Docker sandboxes.
    hosts = {c: inspect(c)[0]["Config"]["Hostname"]
             for c in (stack.container("worker", 1), stack.container("worker", 2))}
    ran = {n.worker for nid, n in anyio.run(nodes_of, stack, run_id).items()
           if nid.startswith("part-")}
    for container, host in hosts.items():
        assert any(f"-{host}-" in (w or "") for w in ran), (container, ran)
        log = container_log(container)
        assert "sandboxes docker" in log, log[-2000:]

    out = tmp_path / "out"
    stack.swarm("result", run_id, "--output", str(out))
    report = (out / "RESULT.md").read_text()
    assert "Produced with the swarm simulator" in report  # the stack's model is the simulator
    assert len(list((out / "notes").iterdir())) == PARTS  # written in Docker sandboxes

    # Sandboxes ran in Docker (the workers' engine is the host's) and none outlived the run.
    home_id = Layout(stack.home, stack.home / "workspaces").home_id
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=swarm.home={home_id}",
                           "--filter", "label=swarm.run=" + run_id],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == []

    # `docker-compose stop` (SIGTERM through the containers' init): every service ends by its
    # own hand, the coordinator and the workers included.
    stack.compose("stop", "-t", "30")
    ids = stack.compose("ps", "-q").split()
    exits = {s["Name"]: s["State"]["ExitCode"] for s in inspect(*ids)}
    assert len(exits) == 5 and set(exits.values()) == {0}, exits
