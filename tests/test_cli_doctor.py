"""`swarm doctor`, `swarm sim` and `swarm run --submit` as a user runs them: the installed
console script, in a subprocess, against the real redis-server, Docker engine and
simulator."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import openai
import pytest

from swarm import dag
from swarm.cli import swarm_error_in
from swarm.embedded_redis import stop_embedded_redis
from swarm.errors import RedisUnavailable, UserError
from swarm.models import Plan
from swarm.planner import plan_tool
from swarm.settings import Settings
from swarm.simulator import SimulatorThread
from tests.conftest import require

SWARM = Path(sys.executable).with_name("swarm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, env=env)
    return done.returncode == 0


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any SWARM_ or DOCKER_HOST setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SWARM_") and k != "DOCKER_HOST"}
    return {**env, "SWARM_HOME": str(home), **extra}


def swarm(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([str(SWARM), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes that mention `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in {"Z", "X"}:
            found.append(cmdline)
    return found


@pytest.fixture
def home() -> Iterator[Path]:
    # Short: the embedded Redis listens on a unix socket under it (sun_path is 108 bytes).
    path = Path(tempfile.mkdtemp(prefix="swarm-doc-")) / "home"
    yield path
    anyio.run(stop_embedded_redis, Settings(home=path))
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread() as sim:
        yield sim


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """doctor's lines as name -> (level, detail); names are padded to a fixed column."""
    rows = {}
    for line in stdout.splitlines():
        name, rest = line[:22].strip(), line[22:].strip()
        level, _, detail = rest.partition(" ")
        rows[name] = (level, detail.strip())
    return rows


@pytest.mark.docker
def test_doctor_all_green_on_this_machine(home: Path, simulator: SimulatorThread) -> None:
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    require(docker_answers(), "no Docker engine answers")
    env = clean_env(home, SWARM_ENDPOINTS__WORKER__BASE_URL=simulator.base_url,
                    SWARM_ENDPOINTS__WORKER__MODEL="swarm-sim")

    done = swarm("doctor", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    assert list(rows) == ["redis", "redis persistence", "redis eviction", "docker engine",
                          "sandbox image", "endpoint worker"]
    assert {level for level, _ in rows.values()} == {"OK"}, done.stdout
    assert "embedded" in rows["redis"][1]
    assert "appendfsync everysec" in rows["redis persistence"][1]
    assert "model swarm-sim" in rows["endpoint worker"][1]
    # The embedded Redis is a daemon by design: it stays, answering, for the next command.
    assert processes_mentioning(str(home / "redis" / "redis.sock"))


def test_doctor_without_endpoints_says_simulator(home: Path) -> None:
    done = swarm("doctor", env=clean_env(home, PATH=str(home.parent),
                                         DOCKER_HOST=f"unix://{home.parent}/dead.sock"))
    assert "no endpoint configured: the built-in simulator will be used" in done.stdout
    assert table(done.stdout)["model endpoints"][0] == "OK"


def test_doctor_reports_what_is_missing(home: Path) -> None:
    empty_bin = home.parent / "bin"
    empty_bin.mkdir()
    dead = free_port()
    env = clean_env(home, PATH=str(empty_bin), DOCKER_HOST=f"unix://{home.parent}/dead.sock",
                    SWARM_ENDPOINTS__PLANNER__BASE_URL=f"http://127.0.0.1:{dead}/v1",
                    SWARM_ENDPOINTS__PLANNER__MODEL="some-model")

    done = swarm("doctor", env=env)

    assert done.returncode == 3, done.stdout + done.stderr
    rows = table(done.stdout)
    assert rows["redis"][0] == "FAIL"
    assert "redis-server not found" in rows["redis"][1]
    assert "apt-get install redis-server" in rows["redis"][1]
    assert rows["docker engine"][0] == "FAIL"
    assert "dead.sock" in rows["docker engine"][1]
    assert rows["sandbox image"][0] == "FAIL"
    assert rows["endpoint planner"][0] == "FAIL"
    assert "no answer" in rows["endpoint planner"][1]
    assert all("\n" not in detail for _, detail in rows.values())
    # Nothing half-started: no server for this home, no socket or pidfile left behind.
    assert processes_mentioning(str(home)) == []
    assert not (home / "redis" / "redis.sock").exists()
    assert not (home / "redis" / "redis.pid").exists()


def test_sim_serves_a_planning_request(home: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([str(SWARM), "sim", "--port", str(port), "--seed", "7"],
                            env=clean_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until_answers(f"{base_url}/models", proc)
        client = openai.OpenAI(base_url=base_url, api_key="sk-none", max_retries=0, timeout=20)
        try:
            response = client.chat.completions.create(
                model="swarm-sim",
                messages=[{"role": "system", "content": "You plan."},
                          {"role": "user", "content": "Write a guide to Redis in 4 parts."}],
                tools=[plan_tool()],  # type: ignore[list-item]
            )
        finally:
            client.close()
        calls = response.choices[0].message.tool_calls or []
        assert [c.function.name for c in calls] == ["submit_plan"]  # type: ignore[union-attr]
        plan = Plan.model_validate(json.loads(calls[0].function.arguments))  # type: ignore[union-attr]
        dag.validate(plan, max_nodes=1000)
        assert len(plan.nodes) == 5  # four parts and a merge
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises the signal: "terminated by SIGTERM".
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Traceback" not in err
    assert f"http://127.0.0.1:{port}/v1" in err and "simulated" in err


def wait_until_answers(url: str, proc: subprocess.Popen, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"swarm sim exited early: {proc.communicate()[1]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"swarm sim did not answer at {url} within {timeout_s}s")
            time.sleep(0.1)


def test_sim_check_plans_once_and_exits(home: Path) -> None:
    done = swarm("sim", "--check", env=clean_env(home))
    assert done.returncode == 0, done.stderr
    assert "simulator OK" in done.stdout
    assert "plan of 4 nodes" in done.stdout  # the check's goal asks for 3 parts, plus a merge


def test_bad_input_is_one_line_and_exit_2(home: Path) -> None:
    done = swarm("sim", "--check", "--faults", "bogus=1", env=clean_env(home))
    assert done.returncode == 2
    assert done.stderr.startswith("swarm: bad fault 'bogus=1'")
    assert done.stderr.count("\n") == 1

    done = swarm("doctor", env=clean_env(home, SWARM_MAX_NODES="many"))
    assert done.returncode == 2
    assert done.stderr.startswith("swarm: bad setting SWARM_MAX_NODES:")
    assert done.stderr.count("\n") == 1


def test_port_in_use_is_bad_input(home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = swarm("sim", "--port", str(port), env=clean_env(home))
    assert done.returncode == 2
    assert done.stderr == f"swarm: cannot serve the simulator on 127.0.0.1:{port}: " \
        "Address already in use\n"


def test_sim_binds_the_address_it_is_given(home: Path) -> None:
    # 127.0.0.2 is loopback too, but a server bound to it is not reachable at 127.0.0.1.
    port = free_port()
    proc = subprocess.Popen([str(SWARM), "sim", "--host", "127.0.0.2", "--port", str(port)],
                            env=clean_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_answers(f"http://127.0.0.2:{port}/v1/models", proc)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)

    done = swarm("sim", "--host", "192.0.2.1", "--port", "0", env=clean_env(home))
    assert done.returncode == 2
    assert done.stderr == "swarm: cannot serve the simulator on 192.0.2.1:0: " \
        "Cannot assign requested address\n"


def test_submit_records_the_run_and_starts_nothing(home: Path) -> None:
    env = clean_env(home, SWARM_LEASE_TTL_S="5")
    done = swarm("run", "--submit", "Survey the topic in 3 parts", env=env)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert run_id.startswith("r-") and "\n" not in run_id  # the id is the only line
    time.sleep(3)
    status = json.loads(swarm("status", run_id, "--json", env=env).stdout)
    assert status["status"] == "planning"  # nobody here leads it
    assert status["usage"]["llm_calls"] == 0
    listed = json.loads(swarm("ls", "--json", env=env).stdout)
    assert [r["resumable"] for r in listed if r["run"] == run_id] == [True]
    assert not processes_mentioning(run_id)

    done = swarm("run", "--submit", "--detach", "Survey the topic in 3 parts", env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("swarm: --submit and --detach exclude each other")


def test_version(home: Path) -> None:
    done = swarm("--version", env=clean_env(home))
    assert done.returncode == 0
    assert done.stdout.strip() == "swarm 0.1.0"


def test_swarm_errors_are_found_inside_exception_groups() -> None:
    infra = RedisUnavailable("redis is down")
    assert swarm_error_in(infra) is infra
    assert swarm_error_in(ExceptionGroup("g", [UserError("bad"), infra])) is infra
    assert swarm_error_in(ExceptionGroup("g", [ExceptionGroup("h", [infra])])) is infra
    # A bug next to a SwarmError is not hidden behind it.
    assert swarm_error_in(ExceptionGroup("g", [infra, KeyError("x")])) is None
    assert swarm_error_in(KeyError("x")) is None
