"""The local backend, and the workspace path safety both backends share."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from swarm.errors import DockerUnavailable, SandboxError
from swarm.sandbox import open_backend
from swarm.sandbox.base import Sandbox, SandboxBackend
from swarm.sandbox.local import LocalBackend, LocalSandbox
from swarm.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    async with LocalBackend(Settings(home=tmp_path / "home"), env={"ALLOWED": "yes"}) as b:
        yield b


@pytest.fixture
async def sandbox(backend: LocalBackend) -> LocalSandbox:
    return await backend.open("run1", "node1")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_protocols_and_basic_exec(backend: LocalBackend, sandbox: LocalSandbox) -> None:
    assert isinstance(backend, SandboxBackend)
    assert isinstance(sandbox, Sandbox)
    r = await sandbox.exec("pwd; echo out; echo err >&2; exit 3")
    assert r.exit_code == 3 and not r.ok
    assert r.output.splitlines() == [str(sandbox.workspace), "out", "err"]


async def test_timeout_kills_the_whole_command(sandbox: LocalSandbox) -> None:
    r = await sandbox.exec(
        "sleep 1000 & echo $! > bg; setsid sleep 1000 & echo $! > escaped; sleep 1000",
        timeout_s=1)
    assert r.timed_out and r.exit_code == 124 and 1 <= r.duration_s < 5
    for name in ("bg", "escaped"):
        pid = int((sandbox.workspace / name).read_text())
        assert not _alive(pid), f"{name} process {pid} survived"


async def test_background_leftovers_end_with_the_command(sandbox: LocalSandbox) -> None:
    r = await sandbox.exec("sleep 1000 & echo $! > bg; echo done")
    assert r.ok and r.output == "done\n" and r.duration_s < 2
    assert not _alive(int((sandbox.workspace / "bg").read_text()))


async def test_output_is_capped_head_and_tail(sandbox: LocalSandbox) -> None:
    r = await sandbox.exec("echo START; head -c 200000 /dev/zero | tr '\\0' a; echo; echo END",
                           output_cap=1000)
    assert r.truncated
    assert r.output.startswith("START") and r.output.rstrip().endswith("END")
    assert "bytes of output cut" in r.output and len(r.output) < 1100


async def test_host_secrets_do_not_leak(sandbox: LocalSandbox,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_TEST_SECRET", "hunter2")
    r = await sandbox.exec("env")
    assert "hunter2" not in r.output
    assert "ALLOWED=yes" in r.output
    assert f"HOME={os.environ.get('HOME')}\n" not in r.output


async def test_resource_limits_apply(sandbox: LocalSandbox) -> None:
    r = await sandbox.exec("ulimit -v; ulimit -t", timeout_s=5)
    assert r.output.split() == [str(2048 * 1024), "6"]
    hog = await sandbox.exec("python3 -c 'b = bytearray(3 << 30)'")
    assert not hog.ok and "MemoryError" in hog.output


async def test_paths_cannot_leave_the_workspace(sandbox: LocalSandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    await sandbox.exec(f"ln -s {outside} leak; ln -s {tmp_path} dirlink; mkfifo fifo")
    for bad in ("../x", "/etc/passwd", "a/../../x", "leak", "dirlink/outside.txt", "fifo"):
        with pytest.raises(SandboxError):
            await sandbox.read_file(bad)
    for bad in ("../x", "/etc/passwd", "dirlink/new.txt"):
        with pytest.raises(SandboxError):
            await sandbox.write_file(bad, b"x")
    await sandbox.write_file("leak", b"replaced")  # replaces the link, never follows it
    assert outside.read_text() == "keep"
    assert (sandbox.workspace / "leak").read_bytes() == b"replaced"
    assert "new.txt" not in os.listdir(tmp_path)


async def test_ids_cannot_climb(backend: LocalBackend) -> None:
    for run, node in (("..", "n"), ("r", "../x"), ("r/x", "n"), ("r", ".hidden")):
        with pytest.raises(SandboxError):
            await backend.open(run, node)


async def test_files_roundtrip_and_listing(sandbox: LocalSandbox) -> None:
    await sandbox.write_file("/workspace/src/main.py", b"print(1)\n")
    await sandbox.write_file("run.sh", b"echo hi\n")
    await sandbox.exec("chmod +x run.sh; mkdir -p .git/objects; touch .git/objects/x")
    await sandbox.write_file("run.sh", b"echo again\n")
    assert (await sandbox.exec("./run.sh")).output == "again\n"  # still executable
    assert await sandbox.read_file("src/main.py") == b"print(1)\n"
    with pytest.raises(SandboxError, match="over the 3 bytes"):
        await sandbox.read_file("src/main.py", max_bytes=3)
    listed = {f.path: f for f in await sandbox.list_files()}
    assert set(listed) == {".git", "run.sh", "src", "src/main.py"}
    assert listed["src"].is_dir and listed["src/main.py"].size == 9
    assert len(await sandbox.list_files(".", max_entries=2)) == 2


async def test_remove_run_keeps_workspaces_unless_asked(backend: LocalBackend,
                                                        sandbox: LocalSandbox) -> None:
    await sandbox.write_file("keep.txt", b"1")
    assert await backend.remove_run("run1") == 1
    assert (sandbox.workspace / "keep.txt").exists()
    await backend.open("run1", "node1")
    assert await backend.gc(live_runs=["run1"]) == 0
    assert await backend.remove_run("run1", workspaces=True) == 1
    assert not sandbox.workspace.exists()


async def test_open_backend_auto_falls_back_to_local(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    backend = await open_backend(Settings(home=tmp_path, sandbox="auto"))
    assert backend.name == "local"
    await backend.aclose()
    with pytest.raises(DockerUnavailable):
        await open_backend(Settings(home=tmp_path, sandbox="docker"))
