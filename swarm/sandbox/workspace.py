"""Path-safe access to a node's workspace folder on the host.

The sandbox owns what is inside its workspace: it can plant symlinks to /etc, fifos that
block a reader forever, hard links. So every path is walked one component at a time from an
open folder with O_NOFOLLOW (no symlink is followed anywhere in it, not even one pointing
back inside: they are refused, and the shell is there to read them), nothing but regular
files is opened (O_NONBLOCK, then fstat), and writes go to a temporary file renamed over the
name, which replaces a planted link instead of writing through it.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import anyio

from swarm.errors import SandboxError
from swarm.sandbox.base import FileInfo

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_WRITE_BYTES = 10 << 20
# A path the sandbox's own shell would use for the workspace root means the same here.
CONTAINER_ROOT = "/workspace"
# Not descended into by list_files: thousands of entries no agent wants to page through.
LIST_SKIP_DIRS = frozenset({".git"})



# Files are written to a temp name and renamed into place. A process killed between the two
# leaves the temp file behind; it is swarm's, never the agent's work, and is not merged.
_TEMP_RE = re.compile(r"^\..+\.swarm-[0-9a-f]{8}$", re.S)


def temp_name(name: str) -> str:
    return f".{name[:100]}.swarm-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_RE.match(name))

def sandbox_owner() -> tuple[int, int] | None:
    """uid:gid that sandboxes run as, when files made on the host must be handed to it.

    As root, containers run as the image's user 1000 and the host chowns what it creates.
    As anyone else, containers run as that same user, and nothing needs handing over.
    """
    return (1000, 1000) if os.geteuid() == 0 else None


def container_user() -> str:
    owner = sandbox_owner()
    uid, gid = owner if owner else (os.geteuid(), os.getegid())
    return f"{uid}:{gid}"


def split_path(path: str) -> list[str]:
    """The components of a workspace-relative path. Refuses absolute paths and '..'."""
    if "\0" in path:
        raise SandboxError("path contains a NUL byte")
    if path == CONTAINER_ROOT or path.startswith(CONTAINER_ROOT + "/"):
        path = path[len(CONTAINER_ROOT):].lstrip("/")
    if path.startswith("/"):
        raise SandboxError(f"{path!r} is absolute: give a path relative to the workspace")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SandboxError(f"{path!r} climbs out with '..': give a path inside the workspace")
    return parts


def make_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """mkdir -p on a host path swarm controls, handing the last folder to the sandbox user."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)


def open_root(root: Path) -> int:
    try:
        return os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        raise SandboxError(f"workspace {root} does not exist") from None
    except OSError as exc:
        raise SandboxError(f"workspace {root} cannot be opened: {exc.strerror}") from None


def open_dir(root_fd: int, parts: list[str], *, create: bool = False,
             owner: tuple[int, int] | None = None) -> int:
    """An fd for the folder at `parts` under root_fd, never passing through a symlink."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise SandboxError(f"{'/'.join(parts[: i + 1])} does not exist") from None
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(nxt, *owner)
            except (NotADirectoryError, OSError) as exc:
                where = "/".join(parts[: i + 1])
                raise SandboxError(f"{where} is a symbolic link or not a folder ({exc.strerror})"
                                   ) from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(dir_fd: int, name: str, shown: str) -> int:
    """Open a regular file for reading; symlinks, fifos, devices and sockets are refused."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise SandboxError(f"{shown} does not exist") from None
    except OSError as exc:
        raise SandboxError(f"{shown} cannot be opened: {exc.strerror} (a symbolic link?)"
                           ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SandboxError(f"{shown} is not a regular file")
    return fd


def read_file(root: Path, path: str, max_bytes: int) -> bytes:
    parts = split_path(path)
    if not parts:
        raise SandboxError("read_file needs a file path, not the workspace itself")
    with ExitStack() as stack:
        root_fd = open_root(root)
        stack.callback(os.close, root_fd)
        dir_fd = open_dir(root_fd, parts[:-1])
        stack.callback(os.close, dir_fd)
        fd = open_regular(dir_fd, parts[-1], path)
        stack.callback(os.close, fd)
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise SandboxError(f"{path} is {size} bytes, over the {max_bytes} bytes allowed")
        chunks: list[bytes] = []
        got = 0
        while got <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > max_bytes:
            raise SandboxError(f"{path} grew past the {max_bytes} bytes allowed while read")
        return b"".join(chunks)


def write_into(dir_fd: int, name: str, data: bytes, *, mode: int | None = None,
               owner: tuple[int, int] | None = None) -> None:
    """Write a file in dir_fd atomically, replacing whatever entry has that name.

    mode None keeps the permissions of the regular file it replaces (a script stays
    executable), else 0o644.
    """
    if mode is None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else 0o644
        except FileNotFoundError:
            mode = 0o644
    tmp = temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # the umask must not decide what the sandbox may run
    finally:
        os.close(fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        os.unlink(tmp, dir_fd=dir_fd)
        raise SandboxError(f"{name} cannot be written: {exc.strerror}") from None


def write_file(root: Path, path: str, data: bytes, owner: tuple[int, int] | None,
               max_bytes: int = MAX_WRITE_BYTES) -> None:
    if len(data) > max_bytes:
        raise SandboxError(f"{len(data)} bytes is over the {max_bytes} bytes a write may hold")
    parts = split_path(path)
    if not parts:
        raise SandboxError("write_file needs a file path, not the workspace itself")
    root_fd = open_root(root)
    try:
        dir_fd = open_dir(root_fd, parts[:-1], create=True, owner=owner)
        try:
            write_into(dir_fd, parts[-1], data, owner=owner)
        finally:
            os.close(dir_fd)
    finally:
        os.close(root_fd)


def iter_tree(root_fd: int, parts: list[str], skip_dirs: frozenset[str] = frozenset()
              ) -> Iterator[tuple[list[str], int, os.DirEntry[str]]]:
    """Breadth first: (path parts, folder fd, entry) for everything under `parts`.

    Symlinks are listed, never followed; folders are reopened from the root with O_NOFOLLOW.
    The folder fd is only valid until the next item.
    """
    queue: deque[list[str]] = deque([parts])
    while queue:
        here = queue.popleft()
        try:
            fd = open_dir(root_fd, here)
        except SandboxError:
            continue  # replaced by something else since it was listed
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                yield [*here, entry.name], fd, entry
                if entry.is_dir(follow_symlinks=False) and entry.name not in skip_dirs:
                    queue.append([*here, entry.name])
        finally:
            os.close(fd)


def list_files(root: Path, path: str, max_entries: int) -> list[FileInfo]:
    parts = split_path(path)
    root_fd = open_root(root)
    try:
        out: list[FileInfo] = []
        for rel, _fd, entry in iter_tree(root_fd, parts, LIST_SKIP_DIRS):
            if len(out) >= max_entries:
                break
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append(FileInfo(path="/".join(rel), size=st.st_size,
                                is_dir=stat.S_ISDIR(st.st_mode)))
        return out
    finally:
        os.close(root_fd)


class HostWorkspace:
    """A node's workspace folder, every access off the event loop under a shared limiter."""

    def __init__(self, root: Path, owner: tuple[int, int] | None,
                 limiter: anyio.CapacityLimiter) -> None:
        self.root = root
        self.owner = owner
        self.limiter = limiter

    async def read_file(self, path: str, max_bytes: int) -> bytes:
        return await anyio.to_thread.run_sync(read_file, self.root, path, max_bytes,
                                              limiter=self.limiter)

    async def write_file(self, path: str, data: bytes) -> None:
        await anyio.to_thread.run_sync(write_file, self.root, path, data, self.owner,
                                       limiter=self.limiter)

    async def list_files(self, path: str, max_entries: int) -> list[FileInfo]:
        return await anyio.to_thread.run_sync(list_files, self.root, path, max_entries,
                                              limiter=self.limiter)
