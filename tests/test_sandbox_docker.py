"""The docker backend against the real engine and the sandbox image (scripts/provision.sh)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from swarm.errors import DockerUnavailable, InfraUnavailable, SandboxError
from swarm.sandbox import cmdclient
from swarm.sandbox.base import Sandbox, SandboxBackend
from swarm.sandbox.docker import ContainerLimits, DockerBackend
from swarm.sandbox.docker_sandbox import DockerSandbox
from swarm.settings import Settings
from tests.conftest import require

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


@cache
def _engine_problem() -> str | None:
    async def probe() -> None:
        backend = DockerBackend(Settings(home=Path("/nonexistent")))
        try:
            await backend.connect()
        finally:
            await backend.aclose()
    try:
        anyio.run(probe)
    except (InfraUnavailable, SandboxError) as exc:
        return str(exc)
    return None


@pytest.fixture
async def settings(tmp_path: Path) -> AsyncIterator[Settings]:
    problem = await anyio.to_thread.run_sync(_engine_problem)
    require(problem is None, f"docker sandbox unavailable: {problem}")
    settings = Settings(home=tmp_path / "home")
    yield settings
    async with DockerBackend(settings) as cleaner:  # whatever a failed test left behind
        await cleaner.gc()


@pytest.fixture
async def backend(settings: Settings) -> AsyncIterator[DockerBackend]:
    limits = ContainerLimits(pids=64, memory="192m")
    async with DockerBackend(settings, limits=limits, env={"ALLOWED": "yes"}) as b:
        yield b


async def _containers(b: DockerBackend) -> list[dict[str, object]]:
    return await b._list({})


async def test_hardening(backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_TEST_SECRET", "hunter2")
    sb = await backend.open("run1", "node1")
    assert isinstance(backend, SandboxBackend) and isinstance(sb, Sandbox)
    r = await sb.exec(
        "id -u; grep CapEff /proc/self/status; pwd; "
        "touch /usr/x 2>&1 || echo ROOT-RO; "
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 80), timeout=2)'"
        " 2>&1 | tail -1; env")
    lines = r.output.splitlines()
    assert lines[0] != "0"
    assert lines[1].split() == ["CapEff:", "0000000000000000"]
    assert lines[2] == "/workspace"
    assert "Read-only file system" in r.output and "ROOT-RO" in r.output
    assert "Network is unreachable" in lines[5] or "OSError" in lines[5]
    assert "hunter2" not in r.output and "ALLOWED=yes" in r.output
    info = await backend.inspect(sb.name)
    assert info is not None
    assert not any("hunter2" in e for e in info["Config"]["Env"])
    assert info["Config"]["Labels"]["swarm.run"] == "run1"
    assert info["HostConfig"]["NetworkMode"] == "none"


async def test_timeout_kills_everything(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    r = await sb.exec("sleep 1000 & setsid sleep 1000 & sleep 1000", timeout_s=1)
    assert r.timed_out and r.exit_code == 124 and r.duration_s < 4
    r = await sb.exec("sleep 1000 & echo started")  # leftovers end with their command
    assert r.output == "started\n"
    ps = await sb.exec("ps -eo comm=")
    assert "sleep" not in ps.output, ps.output


async def test_output_cap(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    r = await sb.exec("echo START; head -c 300000 /dev/urandom | base64; echo END",
                      output_cap=2000)
    assert r.truncated and "bytes of output cut" in r.output and len(r.output) < 2100
    assert r.output.startswith("START") and r.output.rstrip().endswith("END")


async def test_fork_bomb_and_memory_hog_are_contained(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    await sb.exec("true")
    worst_lag = 0.0

    async def watch_host() -> None:
        nonlocal worst_lag
        while True:
            t = time.monotonic()
            await anyio.sleep(0.02)
            worst_lag = max(worst_lag, time.monotonic() - t - 0.02)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_host)
        # Backgrounded, the bomb's shell exits at once: its processes go with it.
        await sb.exec("bomb() { bomb | bomb & }; bomb", timeout_s=3)
        assert "bash" not in (await sb.exec("ps -eo comm=")).output
        bomb = await sb.exec("bomb() { bomb | bomb; }; bomb", timeout_s=3)
        tg.cancel_scope.cancel()
    assert not bomb.ok and bomb.timed_out
    assert worst_lag < 1.0, f"the host stalled {worst_lag:.2f}s"
    assert (await sb.exec("ps -eo comm=")).output.split() == ["docker-init", "python3", "ps"]
    hog = await sb.exec("python3 -c 'x = b\"x\" * (400 << 20); print(len(x))'", timeout_s=30)
    assert not hog.ok and hog.exit_code == 137, hog
    assert "memory" in hog.output
    assert (await sb.exec("echo alive")).output == "alive\n"


async def test_dead_container_is_a_failed_call_then_recreated(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    await sb.write_file("keep.txt", b"kept")
    first = await sb.start()
    r = await sb.exec("kill -9 $PPID; sleep 5")  # the command server: the container stops
    assert not r.ok and "container" in r.output, r
    again = await sb.exec("cat keep.txt")
    assert again.output == "kept" and sb.container_id != first


async def test_lost_socket_falls_back_to_docker_exec(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    await sb.exec("rm /run/swarm/cmd.sock")
    r = await sb.exec("echo via-exec; id -u")
    assert r.output.splitlines()[0] == "via-exec" and r.output.splitlines()[1] != "0"
    r = await sb.exec("sleep 30", timeout_s=1)
    assert r.timed_out


async def test_workspace_files_and_symlinks(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    await sb.write_file("in.txt", b"from host")
    r = await sb.exec("cat in.txt; echo more >> in.txt; echo new > out.txt; "
                      "ln -s /etc/passwd leak; ln -s / root")
    assert r.output == "from host"
    assert await sb.read_file("out.txt") == b"new\n"
    assert await sb.read_file("in.txt") == b"from hostmore\n"
    for bad in ("leak", "root/etc/passwd", "../../etc/passwd"):
        with pytest.raises(SandboxError):
            await sb.read_file(bad)
    assert {f.path for f in await sb.list_files()} == {"in.txt", "out.txt", "leak", "root"}


async def test_workspace_survives_close_and_mounts_are_read_only(backend: DockerBackend
                                                                 ) -> None:
    dep = await backend.open("run1", "dep")
    await dep.exec("echo result > answer.txt")
    await backend.close(dep)
    assert await _containers(backend) == []
    assert (dep.workspace / "answer.txt").read_text() == "result\n"
    sb = await backend.open("run1", "node1", mounts={"/deps/dep": dep.workspace})
    r = await sb.exec("cat /deps/dep/answer.txt; echo x > /deps/dep/y 2>&1 || echo RO")
    assert r.output.startswith("result\n") and r.output.rstrip().endswith("RO")


async def test_warm_pool_claim(settings: Settings) -> None:
    async with DockerBackend(settings, pool_size=1) as backend:
        with anyio.fail_after(30):
            await backend.pool.wait(1)
        sb = await backend.open("run1", "node1")
        await sb.write_file("pre.txt", b"written before the container")
        t = time.monotonic()
        await sb.start()
        took = time.monotonic() - t
        assert sb.pooled and took < 0.5, took
        r = await sb.exec("cat pre.txt; echo back > post.txt; pwd")
        assert r.output == "written before the container/workspace\n"
        assert (sb.workspace / "post.txt").read_text() == "back\n"
        names = [c["Names"][0] for c in await _containers(backend)]  # type: ignore[index]
        assert f"/{sb.name}" in names
        assert await backend.remove_run("run1") == 1
        assert (sb.workspace / "post.txt").exists()
    assert await _containers(backend) == []  # aclose removed the refilled warm one


REPO = Path(__file__).resolve().parents[1]
WORKER = """
import sys, anyio
from pathlib import Path
from swarm.settings import Settings
from swarm.sandbox.docker import DockerBackend

async def main():
    async with DockerBackend(Settings(home=Path(sys.argv[1])), pool_size=1) as b:
        sb = await b.open("run1", "node1")
        r = await sb.exec("echo mark-$RANDOM$RANDOM > /tmp/mark; cat /tmp/mark")
        with anyio.fail_after(30):
            await b.pool.wait(1)
        print("READY", r.output.strip(), flush=True)
        await anyio.sleep(1000)

anyio.run(main)
"""


async def test_reattach_after_worker_sigkill_then_gc(settings: Settings) -> None:
    worker = await anyio.open_process([sys.executable, "-c", WORKER, str(settings.home)],
                                      stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert worker.stdout is not None
        with anyio.fail_after(60):
            line = (await BufferedByteReceiveStream(worker.stdout).receive_until(b"\n", 4096)
                    ).decode()
        assert line.startswith("READY mark-"), line
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        await worker.wait()
    async with DockerBackend(settings) as backend:
        assert len(await _containers(backend)) == 2  # the node's and the orphaned warm one
        sb = await backend.open("run1", "node1")
        r = await sb.exec("cat /tmp/mark")  # /tmp is the container's own tmpfs
        assert r.output.strip() == line.split()[1]
        assert isinstance(sb, DockerSandbox) and not sb.pooled
        assert await backend.gc(live_runs=["run1"]) == 1  # the dead worker's warm container
        assert await backend.gc() == 1
        assert await _containers(backend) == []


async def test_cancelled_caller_kills_its_command(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    with anyio.move_on_after(1):
        await sb.exec("sleep 1000")
    # The server sees the hang-up and kills the command ([0]: not matching this check).
    r = await sb.exec('for i in $(seq 50); do pgrep -f "sleep 100[0]" || exit 0; sleep 0.1; '
                      'done; exit 1')
    assert r.ok, r


async def test_no_engine_is_one_line(settings: Settings, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailable) as info:
        await DockerBackend(settings).connect()
    assert "\n" not in str(info.value) and "nonexistent" in str(info.value)


async def test_concurrent_commands_in_one_sandbox(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        results[i] = (await sb.exec(f"sleep 0.2; echo {i}")).output

    async with anyio.create_task_group() as tg:
        for i in range(15):  # each takes a server thread, bash and sleep: 45 of 64 pids
            tg.start_soon(one, i)
    assert results == {i: f"{i}\n" for i in range(15)}
    assert len(await _containers(backend)) == 1  # one container, made once



async def test_command_server_reports_errors(backend: DockerBackend) -> None:
    sb = await backend.open("run1", "node1")
    await sb.exec("true")
    with pytest.raises(SandboxError, match="FileNotFoundError"):
        await cmdclient.run(sb.sock, "true", timeout_s=5, cap=100, env={}, cwd="/nonexistent")
    assert (await sb.exec("exit 7")).exit_code == 7
