"""Sandboxes: where agents' commands run (base.py holds the Protocol).

`open_backend` picks a backend from settings without importing docker unless it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from swarm.errors import DockerUnavailable
from swarm.sandbox.base import ExecResult, FileInfo, Sandbox, SandboxBackend
from swarm.settings import Settings

__all__ = ["ExecResult", "FileInfo", "Sandbox", "SandboxBackend", "open_backend"]

log = logging.getLogger(__name__)


async def open_backend(settings: Settings, *, pool_size: int = 0,
                       env: Mapping[str, str] | None = None) -> SandboxBackend:
    """The configured backend, connected. settings.sandbox "auto" means docker when an
    engine answers, else local (which warns that it does not isolate).

    The caller owns it: `async with` it (a DockerBackend runs its warm pool in that block).
    """
    kind = settings.sandbox
    if kind in ("docker", "auto"):
        from swarm.sandbox.docker import DockerBackend

        backend = DockerBackend(settings, pool_size=pool_size, env=env)
        try:
            await backend.connect()
            return backend
        except DockerUnavailable as exc:
            if kind == "docker":
                raise
            log.warning("no Docker engine (%s): falling back to the local sandbox", exc)
    from swarm.sandbox.local import LocalBackend

    return LocalBackend(settings, env=env)
