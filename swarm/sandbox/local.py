"""The local backend: commands run as host subprocesses in the node's workspace folder.

For development and machines without Docker. It does NOT isolate: a command can read and
write anything the worker's user can, and reach the network. What it does do: a minimal
environment (no host variables, so no secrets), resource limits (CPU time, address space,
processes when not root), its own session killed whole at the timeout, capped output, and
the same path-safe workspace file access as the docker backend.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path

import anyio
from pydantic import BaseModel, Field

from swarm.errors import SandboxError
from swarm.sandbox.base import (
    BASE_ENV,
    DEFAULT_OUTPUT_CAP,
    DEFAULT_TIMEOUT_S,
    CappedOutput,
    ExecResult,
    FileInfo,
    Sandbox,
)
from swarm.sandbox.layout import check_ids
from swarm.sandbox.workspace import HostWorkspace, make_dir
from swarm.settings import Settings

log = logging.getLogger(__name__)
_warned = False
MARKER = "SWARM_CMD_ID"
EXIT_GRACE_S = 0.1  # output still collected from a command's leftovers after it exits


class LocalLimits(BaseModel):
    address_space_mb: int = Field(default=2048, ge=64)
    extra_processes: int = Field(default=512, ge=16)  # over what the user already runs


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("SANDBOX=local DOES NOT ISOLATE: agent commands run as %s on this host, "
                    "with its files and network. Use the docker backend for anything real.",
                    os.environ.get("USER") or os.geteuid())


def _stat_fields(pid: str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _user_processes(uid: int) -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned_by(p, uid))


def _owned_by(pid: str, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def kill_session(leader: int, marker: bytes | None) -> None:
    """SIGKILL the command's group and session, and (on timeout) processes carrying its
    marker variable, until a scan finds none."""
    me = str(os.getpid())
    for _ in range(50):
        try:
            os.killpg(leader, signal.SIGKILL)
        except OSError:
            pass
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            fields = _stat_fields(pid)
            if fields is None or fields[0] == b"Z":
                continue
            hit = leader in (int(fields[2]), int(fields[3]))
            if not hit and marker is not None:
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        hit = marker in f.read().split(b"\0")
                except OSError:
                    pass
            if hit:
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


class LocalSandbox:
    def __init__(self, backend: LocalBackend, run: str, node: str, workspace: Path,
                 home: Path) -> None:
        self.backend = backend
        self.run = run
        self.node = node
        self.workspace = workspace
        self.files = HostWorkspace(workspace, None, backend.fs_limiter)
        self.running: set[int] = set()  # session leaders of commands in flight
        self.home = home  # a HOME of its own: not the worker's, with its dotfiles

    def _argv(self, command: str, timeout_s: float) -> list[str]:
        lim = self.backend.limits
        # `ulimit` without -S/-H sets both limits, so the command cannot raise them again.
        limits = [f"ulimit -t {math.ceil(timeout_s) + 1}",
                  f"ulimit -v {lim.address_space_mb * 1024}"]
        if self.backend.nproc is not None:
            limits.append(f"ulimit -u {self.backend.nproc}")
        wrapper = "; ".join(limits) + '; exec bash -c "$1"'
        return ["bash", "-c", wrapper, "swarm-sandbox", command]

    async def exec(self, command: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                   output_cap: int = DEFAULT_OUTPUT_CAP) -> ExecResult:
        cmd_id = uuid.uuid4().hex
        env = {**BASE_ENV, "HOME": str(self.home), **self.backend.env, MARKER: cmd_id}
        sink = CappedOutput(output_cap)
        began = time.monotonic()
        proc = await anyio.open_process(
            self._argv(command, timeout_s), cwd=self.workspace, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.running.add(proc.pid)
        pumped = anyio.Event()

        async def pump() -> None:
            assert proc.stdout is not None
            try:
                async for chunk in proc.stdout:
                    sink.add(chunk)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                pumped.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                with anyio.move_on_after(timeout_s) as waited:
                    await proc.wait()
                timed_out = waited.cancelled_caught
                if not timed_out:
                    with anyio.move_on_after(EXIT_GRACE_S):
                        await pumped.wait()
                marker = f"{MARKER}={cmd_id}".encode() if timed_out else None
                await anyio.to_thread.run_sync(kill_session, proc.pid, marker,
                                               limiter=self.backend.fs_limiter)
                with anyio.move_on_after(1.0):
                    await pumped.wait()  # a setsid'd leftover may hold the pipe: stop anyway
                tg.cancel_scope.cancel()
        finally:
            self.running.discard(proc.pid)
            with anyio.CancelScope(shield=True):
                await proc.aclose()
        code = proc.returncode if proc.returncode is not None else -9
        output, cut = sink.text()
        if timed_out:
            output += f"\n[command timed out after {timeout_s:g}s and was killed]"
            code = 124
        elif code < 0:
            code = 128 - code
        return ExecResult(exit_code=code, output=output, truncated=cut, timed_out=timed_out,
                          duration_s=time.monotonic() - began)

    async def kill_all(self) -> None:
        for leader in list(self.running):
            await anyio.to_thread.run_sync(kill_session, leader, None,
                                           limiter=self.backend.fs_limiter)
        await anyio.to_thread.run_sync(shutil.rmtree, self.home, True)

    async def read_file(self, path: str, max_bytes: int = 1_000_000) -> bytes:
        return await self.files.read_file(path, max_bytes)

    async def write_file(self, path: str, data: bytes) -> None:
        await self.files.write_file(path, data)

    async def list_files(self, path: str = ".", max_entries: int = 1000) -> list[FileInfo]:
        return await self.files.list_files(path, max_entries)


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, *, env: Mapping[str, str] | None = None,
                 limits: LocalLimits | None = None) -> None:
        _warn_once()
        self.workspaces = settings.workspaces_dir
        self.env = dict(env or {})  # the explicit allowlist; never os.environ
        self.limits = limits or LocalLimits()
        self.fs_limiter = anyio.CapacityLimiter(8)
        # RLIMIT_NPROC counts every process of the user and binds nobody as root.
        uid = os.geteuid()
        self.nproc = None if uid == 0 else _user_processes(uid) + self.limits.extra_processes
        self._open: dict[tuple[str, str], LocalSandbox] = {}

    async def __aenter__(self) -> LocalBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self, run: str, node: str, *, network: bool = False,
                   mounts: Mapping[str, Path] | None = None) -> LocalSandbox:
        """network and mounts are not enforced here: nothing is isolated to begin with."""
        check_ids(run, node)
        sandbox = self._open.get((run, node))
        if sandbox is None:
            ws = self.workspaces / run / node
            await anyio.to_thread.run_sync(make_dir, ws, None, limiter=self.fs_limiter)
            home = await anyio.to_thread.run_sync(
                lambda: Path(tempfile.mkdtemp(prefix="swarm-home-")), limiter=self.fs_limiter)
            sandbox = self._open[(run, node)] = LocalSandbox(self, run, node, ws, home)
        return sandbox

    async def close(self, sandbox: Sandbox) -> None:
        if not isinstance(sandbox, LocalSandbox):
            raise SandboxError(f"{sandbox!r} is not a local sandbox")
        self._open.pop((sandbox.run, sandbox.node), None)
        await sandbox.kill_all()

    async def remove_run(self, run: str, *, workspaces: bool = False) -> int:
        doomed = [sb for (r, _), sb in self._open.items() if r == run]
        for sandbox in doomed:
            await self.close(sandbox)
        if workspaces:
            await anyio.to_thread.run_sync(shutil.rmtree, self.workspaces / run, True,
                                           limiter=self.fs_limiter)
        return len(doomed)

    async def gc(self, live_runs: Collection[str] = ()) -> int:
        doomed = [sb for (r, _), sb in self._open.items() if r not in live_runs]
        for sandbox in doomed:
            await self.close(sandbox)
        return len(doomed)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for sandbox in list(self._open.values()):
                await self.close(sandbox)
