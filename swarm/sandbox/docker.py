"""The docker backend: one hardened container per node, commands through its command server.

The only module that imports `docker`. Every docker-py call runs in a worker thread under a
dedicated CapacityLimiter (settings.docker_threads). Commands do not: they go over the
container's unix socket with async I/O (cmdclient), a fork inside the container instead of
a `docker exec` (~70 ms of host CPU each, which would cap 2 cores near 28 commands/s).

Containers are made lazily, on a sandbox's first `exec` (docker_sandbox.py): an agent that
never runs a command never gets one. They come from a warm pool when they can.

The warm pool. Labels and mounts are fixed when a container is created, and a node's
workspace must be a host folder that outlives its container. So a warm container is created
with a slot folder of its own: `pool/{slot}/ws` bind-mounted at /workspace and
`pool/{slot}/sock` at /run/swarm, where its command server already listens. To serve node N
the backend pings it, renames the container to N's name, and renames `pool/{slot}/sock` to
N's socket folder and `pool/{slot}/ws` to N's workspace path (moving in whatever that path
held, crash-safely: layout.adopt_workspace). A bind mount follows the folder, not its path,
so the running container now works in N's workspace. One docker call and a few renames:
milliseconds, against ~300 ms of host CPU for a cold start. Isolation is a cold container's:
the same flags, nothing shared, and a slot serves one node only, then goes with it.
Labels cannot change, so a claimed container keeps `swarm.pool=1` and carries its node in
its name, `swarm-{home}-{run hash}-{node hash}-{run}.{node}`, the scheme cold containers use
beside their swarm.run / swarm.node labels; gc and remove_run go by that name. Nodes that
need network or read-only mounts get a cold container: those are fixed at creation too.
pool.py keeps the pool filled.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio
import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound
from docker.errors import NotFound as DockerNotFound
from docker.types import Mount
from docker.utils import kwargs_from_env

from swarm.errors import DockerUnavailable, SandboxError
from swarm.sandbox import cmdclient, layout
from swarm.sandbox.base import CappedOutput, ExecResult, Sandbox
from swarm.sandbox.docker_sandbox import DockerSandbox
from swarm.sandbox.layout import ContainerLimits
from swarm.sandbox.pool import WarmPool
from swarm.sandbox.workspace import container_user, make_dir, sandbox_owner
from swarm.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_MANAGED = "swarm.managed"
LABEL_HOME = "swarm.home"
LABEL_RUN = "swarm.run"
LABEL_NODE = "swarm.node"
LABEL_POOL = "swarm.pool"
LABEL_OWNER = "swarm.pool.owner"
LABEL_PROTOCOL = "swarm.cmdserver.protocol"


class DockerBackend:
    """Use as `async with DockerBackend(settings, pool_size=8) as backend:`; the pool's
    refill task lives in that block. Without it (or with pool_size 0) containers start cold.
    """

    name = "docker"

    def __init__(self, settings: Settings, *, pool_size: int = 0,
                 limits: ContainerLimits | None = None, env: Mapping[str, str] | None = None,
                 image: str | None = None, host_grace_s: float = 5.0,
                 start_timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.image = image or settings.sandbox_image
        self.limits = limits or ContainerLimits()
        self.env = dict(env or {})  # the explicit allowlist; never os.environ
        self.host_grace_s = host_grace_s
        self.start_timeout_s = start_timeout_s
        self.layout = layout.Layout(settings.home, settings.workspaces_dir)
        self.owner = sandbox_owner()
        self.user = container_user()
        self.fs_limiter = anyio.CapacityLimiter(8)
        self._limiter = anyio.CapacityLimiter(settings.docker_threads)
        self._client: docker.DockerClient | None = None
        self._connect_lock = anyio.Lock()
        self._owner_id = f"{socket.gethostname()}:{os.getpid()}:{layout.start_time('self')}"
        self.pool = WarmPool(self, pool_size)
        self._tg: anyio.abc.TaskGroup | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> DockerBackend:
        await self.connect()
        if self.pool.size > 0:
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
            tg.start_soon(self.pool.refill_forever)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the pool and remove its unclaimed containers. Claimed ones stay (re-attach)."""
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self.pool.drain()
            if self._client is not None:
                client, self._client = self._client, None
                await anyio.to_thread.run_sync(client.close, limiter=self._limiter)

    async def connect(self) -> docker.DockerClient:
        """The client, made on first use. DockerUnavailable when no engine answers."""
        async with self._connect_lock:
            if self._client is None:
                self._client = await anyio.to_thread.run_sync(self._make_client,
                                                              limiter=self._limiter)
            return self._client

    def _make_client(self) -> docker.DockerClient:
        try:
            # from_env negotiates the API version with the engine (20.10 speaks 1.41).
            client = docker.from_env(max_pool_size=self.settings.docker_threads + 4)
        except DockerException as exc:
            where = kwargs_from_env().get("base_url", "unix:///var/run/docker.sock")
            raise DockerUnavailable(f"no Docker engine answers at {where}: {exc}") from None
        try:
            image = client.images.get(self.image)
        except ImageNotFound:
            client.close()
            raise SandboxError(f"sandbox image {self.image} is missing: build it with "
                               "scripts/provision.sh") from None
        protocol = (image.labels or {}).get(LABEL_PROTOCOL)
        if protocol != str(cmdclient.PROTOCOL):
            client.close()
            raise SandboxError(f"image {self.image} has command server protocol {protocol}, "
                               f"swarm speaks {cmdclient.PROTOCOL}: rebuild it "
                               "(scripts/provision.sh)")
        return client

    async def call(self, fn: Callable[[docker.APIClient], T], *,
                   expect: tuple[int, ...] = ()) -> T:
        """Run one docker-py call in a thread under the docker limiter.

        An APIError whose status is in `expect` reaches the caller, which handles it; any
        other docker failure becomes a SandboxError (DockerUnavailable: no engine).
        """
        client = await self.connect()

        def run() -> T:
            try:
                return fn(client.api)
            except requests.exceptions.ConnectionError as exc:
                raise DockerUnavailable(f"the Docker engine stopped answering: {exc}"
                                        ) from None
            except APIError as exc:
                if exc.status_code in expect:
                    raise
                raise SandboxError(f"docker: {exc.explanation or exc}") from None
            except DockerException as exc:
                raise SandboxError(f"docker: {exc}") from None
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Host folder work (renames, rmtree) off the event loop."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args),
                                              limiter=self.fs_limiter)

    # ---- sandboxes -----------------------------------------------------------------------

    async def open(self, run: str, node: str, *, network: bool = False,
                   mounts: Mapping[str, Path] | None = None) -> DockerSandbox:
        """Returns at once: the container is made (or re-attached) on the first exec."""
        layout.check_ids(run, node)
        checked = await self.in_thread(layout.check_mounts, dict(mounts or {}))
        ws = self.layout.workspace(run, node)
        await self.in_thread(layout.recover_workspace, ws)
        await self.in_thread(make_dir, ws, self.owner)
        return DockerSandbox(self, run, node, ws, network=network, mounts=checked)

    async def close(self, sandbox: Sandbox) -> None:
        """Remove the node's container (found by name, so a re-attached one too)."""
        if not isinstance(sandbox, DockerSandbox):
            raise SandboxError(f"{sandbox!r} is not a docker sandbox")
        await sandbox.forget()
        await self.remove(self.layout.container_name(sandbox.run, sandbox.node))
        await self.in_thread(shutil.rmtree, sandbox.sock_dir, True)

    async def remove(self, container: str) -> bool:
        """Kill and remove a container; False when it was already gone."""
        try:
            await self.call(lambda api: api.remove_container(container, force=True, v=True),
                            expect=(404, 409))
            return True
        except APIError as exc:
            if exc.status_code == 404 or "already in progress" in str(exc):
                return False
            raise SandboxError(f"cannot remove container {container}: {exc}") from None

    async def inspect(self, container: str) -> dict[str, Any] | None:
        try:
            return await self.call(lambda api: api.inspect_container(container), expect=(404,))
        except DockerNotFound:
            return None

    async def remove_run(self, run: str, *, workspaces: bool = False) -> int:
        """Remove the run's containers and socket folders; its workspaces only when asked."""
        found = await self._list({"name": f"^/{self.layout.run_prefix(run)}"})
        removed = await self._remove_many([c["Id"] for c in found])
        await self.in_thread(layout.remove_dirs_starting, self.layout.sock_root,
                             layout.short_hash(run) + "-")
        if workspaces:
            await self.in_thread(shutil.rmtree, self.layout.workspaces / run, True)
        return removed

    async def gc(self, live_runs: Collection[str] = ()) -> int:
        """Remove this home's containers whose run is not live, pools of dead processes, and
        socket and slot folders nothing uses. Returns the number of containers removed."""
        live = {layout.short_hash(r) for r in live_runs}
        doomed, kept_socks, kept_slots = [], set(), set()
        for c in await self._list({}):
            name, labels = c["Names"][0].lstrip("/"), c.get("Labels") or {}
            run_hash = self.layout.run_hash_of(name)
            if run_hash is not None:
                if run_hash in live:
                    kept_socks.add(self.layout.sock_key_of(name))
                    continue
            elif labels.get(LABEL_POOL) == "1" and (
                    labels.get(LABEL_OWNER) == self._owner_id
                    or layout.owner_alive(labels.get(LABEL_OWNER, ""))):
                kept_slots.add(name.rsplit("-", 1)[-1])
                continue
            doomed.append(c["Id"])
        removed = await self._remove_many(doomed)
        await self.in_thread(layout.remove_stale_dirs, self.layout.sock_root, kept_socks)
        await self.in_thread(layout.remove_stale_dirs, self.layout.pool_root, kept_slots)
        return removed

    async def _list(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        filters = {**filters, "label": [f"{LABEL_MANAGED}=1",
                                        f"{LABEL_HOME}={self.layout.home_id}"]}
        return await self.call(lambda api: api.containers(all=True, filters=filters))

    async def _remove_many(self, ids: list[str]) -> int:
        results: list[bool] = []

        async def one(cid: str) -> None:
            results.append(await self.remove(cid))
        async with anyio.create_task_group() as tg:
            for cid in ids:
                tg.start_soon(one, cid)
        return sum(results)

    # ---- containers ----------------------------------------------------------------------

    def labels(self, *, run: str | None = None, node: str | None = None,
               pool: bool = False) -> dict[str, str]:
        out = {LABEL_MANAGED: "1", LABEL_HOME: self.layout.home_id}
        if run is not None and node is not None:
            out |= {LABEL_RUN: run, LABEL_NODE: node}
        if pool:
            out |= {LABEL_POOL: "1", LABEL_OWNER: self._owner_id}
        return out

    async def rename(self, cid: str, name: str) -> None:
        """Give a container a node's name; a leftover holding that name is removed first."""
        for attempt in range(2):
            try:
                await self.call(lambda api: api.rename(cid, name), expect=(409,))
                return
            except APIError as exc:
                if exc.status_code != 409 or attempt:
                    raise SandboxError(f"cannot rename container: {exc.explanation}") from None
                await self.remove(name)

    async def start_container(self, name: str, labels: dict[str, str], ws: Path,
                              sock_dir: Path, *, network: bool = False,
                              mounts: Mapping[str, Path] | None = None) -> str:
        """Create and start a container, wait for its command server; returns its id.

        A container that already holds the name (left by a crash) is removed first.
        """
        lim = self.limits
        binds = [Mount("/workspace", str(ws), type="bind"),
                 Mount(layout.SOCK_DIR_IN_CONTAINER, str(sock_dir), type="bind")]
        binds += [Mount(t, str(h), type="bind", read_only=True)
                  for t, h in (mounts or {}).items()]

        def create(api: docker.APIClient) -> str:
            host_config = api.create_host_config(
                mounts=binds, network_mode="bridge" if network else "none",
                cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True,
                tmpfs={"/tmp": f"size={lim.tmp_size},mode=1777"}, init=True,
                pids_limit=lim.pids, mem_limit=lim.memory, memswap_limit=lim.memory,
                nano_cpus=int(lim.cpus * 1e9), ipc_mode="private",
            )
            # use_config_proxy=False: docker-py would copy proxy settings (and any
            # credentials in them) from the host's ~/.docker/config.json into the sandbox.
            return str(api.create_container(
                self.image, name=name, labels=labels, user=self.user,
                working_dir="/workspace", host_config=host_config,
                environment={"SWARM_SOCK": f"{layout.SOCK_DIR_IN_CONTAINER}/{layout.SOCK_NAME}"},
                use_config_proxy=False, network_disabled=not network,
            )["Id"])

        try:
            cid = await self.call(create, expect=(409,))
        except APIError:
            await self.remove(name)  # a leftover with this name: it holds nothing we need
            cid = await self.call(create)
        with anyio.CancelScope(shield=True):
            # Shielded: a cancelled caller must not leave a started container unaccounted.
            try:
                await self.call(lambda api: api.start(cid))
                await self._wait_ready(cid, sock_dir / layout.SOCK_NAME)
            except BaseException:
                await self.remove(cid)
                raise
        return cid

    async def _wait_ready(self, cid: str, sock: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.005
        while time.monotonic() < deadline:
            if cmdclient.socket_ready(sock):
                try:
                    await cmdclient.ping(sock)
                    return
                except cmdclient.ServerUnreachable:
                    pass
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.2)
            if delay == 0.2:  # it is slow: make sure it is still alive
                state = await self.inspect(cid)
                if state is None or not state["State"]["Running"]:
                    break
        logs = await self.call(lambda api: api.logs(cid, tail=20))
        raise SandboxError("sandbox container did not start its command server: "
                           + logs.decode("utf-8", "replace")[-2000:])

    async def container_gone(self, cid: str) -> str | None:
        """Why the container is no longer running, or None when it still runs."""
        info = await self.inspect(cid)
        if info is None:
            return "its container was removed"
        st = info["State"]
        if st.get("Running"):
            return None
        why = "killed for using too much memory" if st.get("OOMKilled") else (
            f"exit code {st.get('ExitCode')}" + (f", {st['Error']}" if st.get("Error") else ""))
        return f"its container stopped ({why})"

    # ---- the fallback: docker exec -------------------------------------------------------

    async def exec_run(self, cid: str, command: str, *, timeout_s: float,
                       output_cap: int) -> ExecResult:
        """Run a command through `docker exec` (costly), for a container whose command
        socket is gone. `timeout -s KILL` inside enforces the time limit."""
        argv = ["timeout", "-s", "KILL", f"{timeout_s:g}s", "bash", "-c", command]

        def run(api: docker.APIClient) -> tuple[int, str, bool]:
            exec_id = api.exec_create(cid, argv, user=self.user, workdir="/workspace",
                                      environment=self.env)["Id"]
            sink = CappedOutput(output_cap)
            for chunk in api.exec_start(exec_id, stream=True):
                sink.add(chunk)
            text, cut = sink.text()
            return int(api.exec_inspect(exec_id)["ExitCode"] or 0), text, cut

        start = time.monotonic()
        code, out, cut = await self.call(run)  # a vanished container: SandboxError
        took = time.monotonic() - start
        timed_out = code == 137 and took >= timeout_s * 0.98
        return ExecResult(exit_code=124 if timed_out else code, output=out,
                          truncated=cut, timed_out=timed_out, duration_s=took)
