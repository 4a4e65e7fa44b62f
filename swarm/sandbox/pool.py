"""The docker backend's warm pool: started containers waiting for a node to claim them.

How a claim works, and why it keeps isolation and labels honest, is told at the top of
swarm/sandbox/docker.py; the claim itself is DockerSandbox._claim. This keeps the pool
filled: a refill task (living in the backend's `async with` block) starts containers, a few
at a time, whenever fewer than `size` wait, and backs off while starts fail.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections import deque
from typing import TYPE_CHECKING

import anyio

from swarm.errors import DockerUnavailable, SandboxError
from swarm.sandbox import layout
from swarm.sandbox.layout import Slot

if TYPE_CHECKING:
    from swarm.sandbox.docker import DockerBackend

log = logging.getLogger(__name__)
PARALLEL_STARTS = 4  # each start costs ~150 ms of host CPU: do not swamp 2 cores


class WarmPool:
    def __init__(self, backend: DockerBackend, size: int) -> None:
        self.backend = backend
        self.size = size  # 0: no pool; lowering it stops the refill, not the waiting ones
        self._ready: deque[Slot] = deque()
        self._starting = 0
        self._wake = anyio.Event()
        self._added = anyio.Event()

    @property
    def ready(self) -> list[str]:
        """Ids of the warm containers waiting to be claimed."""
        return [slot.cid for slot in self._ready]

    async def wait(self, count: int) -> None:
        """Until `count` warm containers wait (for tests and the benchmark)."""
        while len(self._ready) < count:
            if self._added.is_set():
                self._added = anyio.Event()
            await self._added.wait()

    def take(self) -> Slot | None:
        if not self._ready:
            return None
        slot = self._ready.popleft()
        self._wake.set()
        return slot

    async def discard(self, slot: Slot) -> None:
        await self.backend.remove(slot.cid)
        await self.backend.in_thread(shutil.rmtree, slot.folder, True)

    async def drain(self) -> None:
        """Remove every waiting container (the backend is closing)."""
        slots, self._ready = list(self._ready), deque()
        async with anyio.create_task_group() as tg:
            for slot in slots:
                tg.start_soon(self.discard, slot)

    async def refill_forever(self) -> None:
        backoff = 0.5
        while True:
            missing = self.size - len(self._ready) - self._starting
            if missing <= 0:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            failures: list[BaseException] = []
            async with anyio.create_task_group() as tg:
                for _ in range(min(missing, PARALLEL_STARTS)):
                    self._starting += 1
                    tg.start_soon(self._add, failures)
            if failures:
                log.warning("warm pool: a container failed to start: %s", failures[0])
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            else:
                backoff = 0.5

    async def _add(self, failures: list[BaseException]) -> None:
        b = self.backend
        slot = secrets.token_hex(6)
        folder = b.layout.slot_dir(slot)
        try:
            await b.in_thread(layout.fresh_dir, folder / "ws", b.owner)
            await b.in_thread(layout.fresh_dir, folder / "sock", b.owner)
            cid = await b.start_container(b.layout.pool_name(slot), b.labels(pool=True),
                                          folder / "ws", folder / "sock")
            self._ready.append(Slot(slot, cid, folder))  # no await since the start: kept
            self._added.set()
        except (SandboxError, DockerUnavailable, OSError) as exc:
            failures.append(exc)
            await b.in_thread(shutil.rmtree, folder, True)
        finally:
            self._starting -= 1
