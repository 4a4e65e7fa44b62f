"""Where the docker backend keeps things on the host, and the names it gives containers.

    {home}/workspaces/{run}/{node}       a node's workspace (settings.workspaces_dir)
    {home}/sandboxes/sock/{r}-{n}/       a node container's socket folder (/run/swarm)
    {home}/sandboxes/pool/{slot}/ws      a warm container's workspace, until claimed
    {home}/sandboxes/pool/{slot}/sock    a warm container's socket folder, until claimed

{r} and {n} are short hashes of the run and node ids: fixed length, so a run's containers
and folders are found by prefix without ambiguity (ids may contain '-' and '.'), and socket
paths stay short. Container names carry a hash of `home` too, so two swarm homes sharing
one engine (a test suite beside real runs) never take each other's containers.

No docker here (swarm/sandbox/docker.py is the only module that imports it): names, host
folder moves, and the plain data the backend works with.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field

from swarm.errors import SandboxError

SOCK_NAME = "cmd.sock"
SOCK_DIR_IN_CONTAINER = "/run/swarm"
RESERVED_TARGETS = ("/workspace", SOCK_DIR_IN_CONTAINER, "/tmp", "/proc", "/sys", "/dev")


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_ids(run: str, node: str) -> None:
    """Run and node ids become path components: nothing that could climb out of a folder."""
    for kind, value in (("run", run), ("node", node)):
        if not _ID_RE.match(value):
            raise SandboxError(f"{kind} id {value!r} is not 1-128 letters, digits, '_.-'")


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40]


@dataclass(frozen=True)
class Layout:
    home: Path
    workspaces: Path

    @property
    def home_id(self) -> str:
        return short_hash(str(self.home.resolve()))

    @property
    def sock_root(self) -> Path:
        return self.home / "sandboxes" / "sock"

    @property
    def pool_root(self) -> Path:
        return self.home / "sandboxes" / "pool"

    def run_prefix(self, run: str) -> str:
        """Every container name of that run starts with this."""
        return f"swarm-{self.home_id}-{short_hash(run)}-"

    def container_name(self, run: str, node: str) -> str:
        # The readable tail is for `docker ps`; the hashes are what identify.
        return f"{self.run_prefix(run)}{short_hash(node)}-{_slug(run)}.{_slug(node)}"

    def pool_name(self, slot: str) -> str:
        return f"swarm-{self.home_id}-pool-{slot}"

    def workspace(self, run: str, node: str) -> Path:
        return self.workspaces / run / node

    def sock_dir(self, run: str, node: str) -> Path:
        return self.sock_root / f"{short_hash(run)}-{short_hash(node)}"

    def slot_dir(self, slot: str) -> Path:
        return self.pool_root / slot

    def sock_key_of(self, container_name: str) -> str | None:
        """The sock folder name of a node container's name, None for other names."""
        parts = container_name.lstrip("/").split("-", 4)
        if len(parts) < 4 or parts[0] != "swarm" or parts[1] != self.home_id or parts[2] == "pool":
            return None
        return f"{parts[2]}-{parts[3]}"

    def run_hash_of(self, container_name: str) -> str | None:
        key = self.sock_key_of(container_name)
        return key.split("-", 1)[0] if key else None


def old_workspace(ws: Path) -> Path:
    # Node ids start with a letter or digit, so this never names another node's workspace.
    return ws.parent / f".{ws.name}.old"


def recover_workspace(ws: Path) -> None:
    """Finish a workspace hand-over that a crash interrupted (see adopt_workspace)."""
    old = old_workspace(ws)
    if not old.is_dir():
        return
    if not ws.is_dir():
        os.rename(old, ws)
        return
    for name in os.listdir(old):
        if os.path.lexists(ws / name):
            raise SandboxError(f"workspace {ws}: {name} is in both it and {old}; merge by hand")
        os.rename(old / name, ws / name)
    os.rmdir(old)


def adopt_workspace(fresh: Path, ws: Path) -> None:
    """Make the folder `fresh` (mounted in a warm container) the node's workspace at `ws`.

    A bind mount follows the folder, not its path, so after the rename the container's
    /workspace is the node's workspace. What `ws` already held is moved in, entry by entry;
    `ws` is first set aside as `.{node}.old`, so a crash at any point leaves every file
    either in `ws` or in `.{node}.old`, and recover_workspace finishes the move.
    """
    recover_workspace(ws)
    ws.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(fresh, ws)  # replaces ws when it is missing or an empty folder
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise SandboxError(f"cannot move {fresh} to {ws}: {exc.strerror}") from None
    old = old_workspace(ws)
    os.rename(ws, old)
    os.rename(fresh, ws)
    recover_workspace(ws)


def fresh_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """An empty folder at `path`, for the sandbox user: whatever was there is removed."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if owner is not None:
        os.chown(path, *owner)


def remove_stale_dirs(root: Path, keep: set[str], min_age_s: float = 60.0) -> int:
    """Remove folders under root not named in keep and untouched for min_age_s.

    The age guard spares a folder made a moment ago for a container not created yet.
    """
    if not root.is_dir():
        return 0
    removed = 0
    cutoff = time.time() - min_age_s
    for entry in os.scandir(root):
        if entry.name in keep:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    return removed


def remove_dirs_starting(root: Path, prefix: str) -> None:
    if root.is_dir():
        for name in os.listdir(root):
            if name.startswith(prefix):
                shutil.rmtree(root / name, ignore_errors=True)


class ContainerLimits(BaseModel):
    pids: int = Field(default=128, ge=16)
    memory: str = "512m"  # swap is held to the same figure: no swap on top
    cpus: float = Field(default=1.0, gt=0)
    tmp_size: str = "64m"


def start_time(pid: int | str) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[19].decode()


def owner_alive(owner: str) -> bool:
    """Whether the process that made a pool container (host:pid:start time) still runs."""
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # another machine's pool: not ours to judge
    try:
        return start_time(pid) == start
    except (OSError, ValueError, IndexError):
        return False


class Slot:
    """A warm container and the slot folder it has mounted."""

    def __init__(self, slot: str, cid: str, folder: Path) -> None:
        self.slot, self.cid, self.folder = slot, cid, folder


def check_mounts(mounts: dict[str, Path]) -> dict[str, Path]:
    """Read-only mounts, checked: absolute container targets off the reserved paths, and
    host sources that are folders."""
    checked = {_check_target(t): Path(h).resolve() for t, h in mounts.items()}
    for host in checked.values():
        if not host.is_dir():
            raise SandboxError(f"mount source {host} is not a folder")
    return checked


def _check_target(target: str) -> str:
    path = PurePosixPath(target)
    if not path.is_absolute() or ".." in path.parts or str(path) == "/":
        raise SandboxError(f"mount target {target!r} must be an absolute container path")
    for reserved in RESERVED_TARGETS:
        if path == PurePosixPath(reserved) or PurePosixPath(reserved) in path.parents:
            raise SandboxError(f"mount target {target} is inside reserved {reserved}")
    return str(path)
