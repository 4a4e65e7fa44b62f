"""Copy files out of a sandbox so that nothing lands outside the destination.

Used for workspace -> output folder (copy_tree_safely) and for a container's `get_archive`
stream (extract_tar_safely). The source is written by an untrusted agent, so: entries whose
path is absolute or climbs with '..' are skipped, and so are symlinks, hard links, devices,
fifos and sockets (only regular files and folders are copied, set-uid bits dropped). The
destination is walked with O_NOFOLLOW from an open folder, files are written to a temporary
name and renamed, and the caps on file count and bytes stop the copy with a SandboxError.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from pydantic import BaseModel, Field

from swarm.errors import SandboxError
from swarm.sandbox.workspace import iter_tree, open_dir, open_regular, open_root, temp_name

DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 1 << 30
CHUNK = 1 << 20


class CopyReport(BaseModel):
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    skipped: list[str] = Field(default_factory=list, description="'path: reason' each")


class CopyLimitExceeded(SandboxError):
    """The copy reached its file or byte cap and stopped (what was copied stays)."""


class _Budget:
    def __init__(self, max_files: int, max_bytes: int, report: CopyReport) -> None:
        self.max_files, self.max_bytes, self.report = max_files, max_bytes, report

    def take(self, path: str, size: int) -> None:
        if self.report.files + 1 > self.max_files:
            raise CopyLimitExceeded(f"copy stopped at {path}: more than {self.max_files} files")
        if self.report.bytes + size > self.max_bytes:
            raise CopyLimitExceeded(f"copy stopped at {path}: more than {self.max_bytes} bytes")


def _safe_parts(name: str) -> list[str] | None:
    """Components of an archive path, or None when it is absolute or climbs out."""
    if not name or name.startswith("/") or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return parts


def _store(dest_fd: int, parts: list[str], src: IO[bytes], size: int, mode: int) -> None:
    """Write `size` bytes of src at parts under dest_fd, through a temporary name."""
    dir_fd = open_dir(dest_fd, parts[:-1], create=True)
    try:
        tmp = temp_name(parts[-1])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        try:
            left = size
            while left > 0:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise SandboxError(f"{'/'.join(parts)} ended early")
                os.write(fd, chunk)
                left -= len(chunk)
            os.fchmod(fd, 0o755 if mode & 0o111 else 0o644)  # no set-uid, no world-write
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        try:
            os.rename(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            os.unlink(tmp, dir_fd=dir_fd)
            raise SandboxError(f"{'/'.join(parts)}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)


def _open_dest(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    return open_root(dest)


class _ChunkReader(io.RawIOBase):
    """A file object over an iterable of byte chunks (docker-py's get_archive stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def extract_tar_safely(source: bytes | IO[bytes] | Iterable[bytes], dest: Path, *,
                       max_files: int = DEFAULT_MAX_FILES,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> CopyReport:
    """Extract regular files and folders of a tar stream under dest; skip everything else."""
    if isinstance(source, bytes | bytearray):
        fileobj: IO[bytes] = io.BytesIO(source)
    elif hasattr(source, "read"):
        fileobj = source  # type: ignore[assignment]
    else:
        fileobj = io.BufferedReader(_ChunkReader(source))
    report = CopyReport()
    budget = _Budget(max_files, max_bytes, report)
    dest_fd = _open_dest(dest)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                _extract_member(tar, member, dest_fd, budget)
    except tarfile.TarError as exc:
        raise SandboxError(f"not a readable tar archive: {exc}") from None
    finally:
        os.close(dest_fd)
    return report


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest_fd: int,
                    budget: _Budget) -> None:
    report = budget.report
    parts = _safe_parts(member.name)
    if parts is None:
        report.skipped.append(f"{member.name}: absolute or outside the destination")
        return
    shown = "/".join(parts)
    try:
        if member.isdir():
            os.close(open_dir(dest_fd, parts, create=True))
            report.dirs += 1
        elif member.isreg():
            budget.take(shown, member.size)
            src = tar.extractfile(member)
            assert src is not None
            _store(dest_fd, parts, src, member.size, member.mode)
            report.files += 1
            report.bytes += member.size
        else:
            kind = "link" if member.issym() or member.islnk() else "special file"
            report.skipped.append(f"{shown}: {kind}, not copied")
    except CopyLimitExceeded:
        raise
    except SandboxError as exc:
        report.skipped.append(f"{shown}: {exc}")


def copy_tree_safely(src: Path, dest: Path, *, max_files: int = DEFAULT_MAX_FILES,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> CopyReport:
    """Copy the regular files and folders under src into dest; skip everything else."""
    report = CopyReport()
    budget = _Budget(max_files, max_bytes, report)
    src_fd = open_root(src)
    try:
        dest_fd = _open_dest(dest)
        try:
            for parts, dir_fd, entry in iter_tree(src_fd, []):
                _copy_entry(parts, dir_fd, entry, dest_fd, budget)
        finally:
            os.close(dest_fd)
    finally:
        os.close(src_fd)
    return report


def _copy_entry(parts: list[str], dir_fd: int, entry: os.DirEntry[str], dest_fd: int,
                budget: _Budget) -> None:
    report = budget.report
    shown = "/".join(parts)
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            os.close(open_dir(dest_fd, parts, create=True))
            report.dirs += 1
        elif not stat.S_ISREG(st.st_mode):
            report.skipped.append(f"{shown}: link or special file, not copied")
        else:
            fd = open_regular(dir_fd, parts[-1], shown)
            with os.fdopen(fd, "rb") as f:
                opened = os.fstat(f.fileno())  # what was opened, not what was listed
                if opened.st_nlink > 1:
                    # A hard link may share its inode with a file outside the workspace.
                    report.skipped.append(f"{shown}: hard link, not copied")
                    return
                budget.take(shown, opened.st_size)
                _store(dest_fd, parts, f, opened.st_size, opened.st_mode)
            report.files += 1
            report.bytes += opened.st_size
    except CopyLimitExceeded:
        raise
    except SandboxError as exc:
        report.skipped.append(f"{shown}: {exc}")
