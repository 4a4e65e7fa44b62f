"""What every sandbox backend offers: run a command in a node's sandbox, touch its workspace.

A node's workspace is a host folder, `{settings.workspaces_dir}/{run}/{node}`, outside any
container, so it survives the container and the worker that opened it. Backends differ in
where commands run: `docker` (hardened containers) or `local` (subprocesses, no isolation).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_OUTPUT_CAP = 32_000

# Variables a command sees when the backend is given no env: nothing from the host's
# environment ever reaches a sandbox (secrets live there), only what is listed here.
BASE_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
}


class ExecResult(BaseModel):
    exit_code: int
    output: str
    truncated: bool = False
    timed_out: bool = False
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class FileInfo(BaseModel):
    path: str
    size: int
    is_dir: bool


@runtime_checkable
class Sandbox(Protocol):
    run: str
    node: str
    workspace: Path  # host path of the node's workspace

    async def exec(
        self, command: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
        output_cap: int = DEFAULT_OUTPUT_CAP,
    ) -> ExecResult: ...

    async def read_file(self, path: str, max_bytes: int = 1_000_000) -> bytes: ...

    async def write_file(self, path: str, data: bytes) -> None: ...

    async def list_files(self, path: str = ".", max_entries: int = 1000) -> list[FileInfo]: ...


@runtime_checkable
class SandboxBackend(Protocol):
    name: str  # "docker" | "local"

    async def open(
        self, run: str, node: str, *, network: bool = False,
        mounts: Mapping[str, Path] | None = None,
    ) -> Sandbox:
        """A sandbox for that node; re-attaches when one already exists (a worker restart).

        mounts: container path -> host path, mounted read-only (dependencies' workspaces).
        """
        ...

    async def __aenter__(self) -> SandboxBackend:
        """Start background work (a Docker backend's warm pool) until __aexit__."""
        ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def close(self, sandbox: Sandbox) -> None:
        """Remove the sandbox's container; the workspace stays."""
        ...

    async def remove_run(self, run: str, *, workspaces: bool = False) -> int:
        """Remove everything labelled with that run; its workspaces only when asked."""
        ...

    async def gc(self, live_runs: Collection[str] = ()) -> int:
        """Remove what this backend made for runs not in live_runs; returns the count."""
        ...

    async def aclose(self) -> None: ...


class CappedOutput:
    """Keeps the first and last `cap // 2` bytes of a stream and counts what falls between.

    The same rule as the command server's (sandboxes/default/cmdserver.py), for the backends
    that capture output on the host.
    """

    def __init__(self, cap: int) -> None:
        self.head_cap = max(0, cap) // 2
        self.tail_cap = max(0, cap) - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_cap:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:  # trim in batches, not on every chunk
                del self.tail[: len(self.tail) - self.tail_cap]

    def text(self) -> tuple[str, bool]:
        """The kept output as text, and whether anything was cut."""
        if len(self.tail) > self.tail_cap:
            del self.tail[: len(self.tail) - self.tail_cap]
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return bytes(self.head + self.tail).decode("utf-8", "replace"), False
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        return f"{head}\n[... {cut} bytes of output cut ...]\n{tail}", True


def failed(reason: str, *, duration_s: float = 0.0, exit_code: int = 125) -> ExecResult:
    """A command that could not run at all, reported like a failed tool call."""
    return ExecResult(exit_code=exit_code, output=reason, duration_s=duration_s)
