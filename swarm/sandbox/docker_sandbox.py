"""A node's docker sandbox: its container is found, claimed or made on the first exec.

Docker calls go through the backend (swarm/sandbox/docker.py, the only module that imports
docker); this module holds the per-node logic: re-attach, claim from the warm pool, cold
start, exec through the command server, and what to say when the container died.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from swarm.errors import SandboxError
from swarm.sandbox import cmdclient, layout
from swarm.sandbox.base import (
    DEFAULT_OUTPUT_CAP,
    DEFAULT_TIMEOUT_S,
    ExecResult,
    FileInfo,
    failed,
)
from swarm.sandbox.workspace import HostWorkspace

if TYPE_CHECKING:
    from swarm.sandbox.docker import DockerBackend
    from swarm.sandbox.layout import Slot

log = logging.getLogger(__name__)


class DockerSandbox:
    def __init__(self, backend: DockerBackend, run: str, node: str, workspace: Path, *,
                 network: bool, mounts: Mapping[str, Path]) -> None:
        self.backend = backend
        self.run = run
        self.node = node
        self.workspace = workspace
        self.network = network
        self.mounts = dict(mounts)
        self.name = backend.layout.container_name(run, node)
        self.sock_dir = backend.layout.sock_dir(run, node)
        self.sock = self.sock_dir / layout.SOCK_NAME
        self.files = HostWorkspace(workspace, backend.owner, backend.fs_limiter)
        self.container_id: str | None = None
        self.pooled = False  # whether the container came from the warm pool (for the bench)
        self._fallback = False  # the command socket is gone: use docker exec
        self._lock = anyio.Lock()  # one container at a time
        self._fs_lock = anyio.Lock()  # file access against the workspace hand-over

    # ---- the container -------------------------------------------------------------------

    async def start(self) -> str:
        """The container's id: re-attached, claimed from the pool, or started cold."""
        async with self._lock:
            if self.container_id is None:
                self.container_id = (await self._attach() or await self._claim()
                                     or await self._create())
            return self.container_id

    async def forget(self) -> None:
        self.container_id = None
        self._fallback = False

    async def _attach(self) -> str | None:
        """The node's container left by an earlier worker, when it still runs."""
        if not await self.backend.in_thread(self.sock_dir.is_dir):
            return None  # a node container always has its socket folder
        info = await self.backend.inspect(self.name)
        if info is None or not info["State"]["Running"]:
            if info is not None:
                await self.backend.remove(info["Id"])
            return None
        try:
            await cmdclient.ping(self.sock)
        except cmdclient.ServerUnreachable:
            self._fallback = not cmdclient.socket_ready(self.sock)
        return str(info["Id"])

    async def _claim(self) -> str | None:
        if self.network or self.mounts:
            return None  # fixed at creation: a warm container has neither
        while (slot := self.backend.pool.take()) is not None:
            try:
                await cmdclient.ping(slot.folder / "sock" / layout.SOCK_NAME)
            except SandboxError:
                await self.backend.pool.discard(slot)  # died while it waited
                continue
            try:
                with anyio.CancelScope(shield=True):  # milliseconds; never leave it half done
                    await self.backend.rename(slot.cid, self.name)
                    async with self._fs_lock:
                        await self.backend.in_thread(self._move_in, slot)
            except (SandboxError, OSError) as exc:
                log.warning("warm container for %s/%s not usable (%s); starting one cold",
                            self.run, self.node, exc)
                await self.backend.pool.discard(slot)
                await self.backend.in_thread(layout.recover_workspace, self.workspace)
                await self.backend.in_thread(shutil.rmtree, self.sock_dir, True)
                return None
            self.pooled = True
            return slot.cid
        return None

    def _move_in(self, slot: Slot) -> None:
        if self.sock_dir.exists():
            shutil.rmtree(self.sock_dir)  # stale: no container has this node's name now
        self.sock_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(slot.folder / "sock", self.sock_dir)
        layout.adopt_workspace(slot.folder / "ws", self.workspace)
        shutil.rmtree(slot.folder, ignore_errors=True)

    async def _create(self) -> str:
        await self.backend.in_thread(layout.fresh_dir, self.sock_dir, self.backend.owner)
        labels = self.backend.labels(run=self.run, node=self.node)
        return await self.backend.start_container(
            self.name, labels, self.workspace, self.sock_dir,
            network=self.network, mounts=self.mounts)

    async def _drop(self, cid: str) -> None:
        """Remove a broken container; the next command starts a new one."""
        async with self._lock:
            if self.container_id != cid:
                return  # a concurrent command already replaced it
            self.container_id = None
            self._fallback = False
            await self.backend.remove(cid)
            await self.backend.in_thread(shutil.rmtree, self.sock_dir, True)

    async def _exec_fallback(self, cid: str, command: str, began: float, timeout_s: float,
                             output_cap: int) -> ExecResult:
        try:
            return await self.backend.exec_run(cid, command, timeout_s=timeout_s,
                                               output_cap=output_cap)
        except SandboxError as exc:
            why = await self.backend.container_gone(cid) or str(exc)
            await self._drop(cid)
            return failed(f"[the command could not run: {why}; the workspace is kept and the "
                          "next command starts a new container]",
                          duration_s=time.monotonic() - began)

    # ---- commands ------------------------------------------------------------------------

    async def exec(self, command: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                   output_cap: int = DEFAULT_OUTPUT_CAP) -> ExecResult:
        began = time.monotonic()
        cid = await self.start()
        if self._fallback:
            return await self._exec_fallback(cid, command, began, timeout_s, output_cap)
        # The server kills the command at timeout_s; this later deadline covers a server
        # that cannot answer at all.
        host_deadline = timeout_s + self.backend.host_grace_s
        try:
            with anyio.fail_after(host_deadline):
                reply = await cmdclient.run(self.sock, command, timeout_s=timeout_s,
                                            cap=output_cap, env=self.backend.env)
        except TimeoutError:
            await self._drop(cid)
            return ExecResult(
                exit_code=124, timed_out=True, duration_s=time.monotonic() - began,
                output=f"[the sandbox did not answer within {host_deadline:g}s: its container "
                       "was removed; the workspace is kept and the next command starts a "
                       "new container]")
        except cmdclient.ServerUnreachable as exc:
            return await self._unreachable(cid, command, exc, began, timeout_s, output_cap)
        except SandboxError as exc:  # the server answered that it could not run it
            return failed(f"[the sandbox could not run the command: {exc}]",
                          duration_s=time.monotonic() - began)
        result = ExecResult.model_validate(reply.model_dump())
        if result.exit_code == 137 and not result.timed_out:
            result.output += ("\n[the command was killed (SIGKILL): most likely it used more "
                              f"than the sandbox's {self.backend.limits.memory} of memory]")
        return result

    async def _unreachable(self, cid: str, command: str, exc: cmdclient.ServerUnreachable,
                           began: float, timeout_s: float, output_cap: int) -> ExecResult:
        if not cmdclient.socket_ready(self.sock):
            if await self.backend.container_gone(cid) is None:
                # The socket file was removed from inside the sandbox: docker exec still works.
                self._fallback = True
                return await self._exec_fallback(cid, command, began, timeout_s, output_cap)
        elif not exc.refused:
            # Dropped mid-way: the server died with it (a dying server may still accept a
            # connection or two), or it could not take the connection (no pids left).
            # Look again for a second before saying which.
            for _ in range(10):
                if await self.backend.container_gone(cid) is not None:
                    break
                try:
                    await cmdclient.ping(self.sock)
                    return failed(
                        "[the sandbox dropped the command, most likely out of processes: it "
                        f"may run {self.backend.limits.pids} processes and threads, and each "
                        "running command takes one thread besides its own processes]",
                        duration_s=time.monotonic() - began)
                except cmdclient.ServerUnreachable as again:
                    if again.refused:
                        break
                await anyio.sleep(0.1)
            else:
                return failed("[the sandbox refused the command: it is out of processes "
                              "(a fork bomb?) or threads]", duration_s=time.monotonic() - began)
        why = await self._wait_stopped(cid)
        await self._drop(cid)
        return failed(
            f"[the command could not finish: {why}. Its processes are gone; the workspace "
            "is kept and the next command starts a new container]",
            exit_code=137 if "memory" in why else 125, duration_s=time.monotonic() - began)

    async def _wait_stopped(self, cid: str) -> str:
        """Why the container stopped, once docker has seen it stop (its server is dead)."""
        for _ in range(20):
            why = await self.backend.container_gone(cid)
            if why is not None:
                return why
            await anyio.sleep(0.1)
        return "its command server died"

    # ---- the workspace (on the host) -----------------------------------------------------

    async def read_file(self, path: str, max_bytes: int = 1_000_000) -> bytes:
        async with self._fs_lock:
            return await self.files.read_file(path, max_bytes)

    async def write_file(self, path: str, data: bytes) -> None:
        async with self._fs_lock:
            await self.files.write_file(path, data)

    async def list_files(self, path: str = ".", max_entries: int = 1000) -> list[FileInfo]:
        async with self._fs_lock:
            return await self.files.list_files(path, max_entries)
