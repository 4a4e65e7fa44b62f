"""A node's workspace -> a git tree, through a staging copy in the merge's scratch folder.

The copy is `swarm.sandbox.safe_copy.copy_tree_safely` (a workspace is written by a model:
no symlink, device, fifo or hard link is copied, nothing lands outside the stage, counts and
bytes are capped). Then, here: `.git` entries at any depth and in any letter case are dropped
(a nested repository would become a gitlink, and a workspace's git metadata is not a
deliverable), and names git refuses to index (`.GIT`, `git~1`, ...) are skipped and reported
rather than failing the whole merge.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from swarm.merge.git import Git, GitError, shown
from swarm.sandbox.safe_copy import CopyLimitExceeded, copy_tree_safely
from swarm.sandbox.workspace import is_temp_name

_REFUSED_RE = re.compile(rb"^error: unable to add '(.*)' to index$", re.M)


@dataclass
class Staged:
    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: why" each


def stage_workspace(workspace: Path, stage: Path, *, max_files: int, max_bytes: int) -> Staged:
    """Copy `workspace` into `stage` (blocking: run it in a thread)."""
    if not os.path.lexists(workspace):
        return Staged()  # a node that never wrote a file has no workspace: nothing to merge
    staged = Staged()
    if max_files <= 0 or max_bytes <= 0:
        staged.skipped.append(".: not copied, the merge's file or byte cap is used up")
        return staged
    try:
        staged.skipped += copy_tree_safely(
            workspace, stage, max_files=max_files, max_bytes=max_bytes
        ).skipped
    except CopyLimitExceeded as exc:  # what was copied before the cap stays, in sorted order
        staged.skipped.append(f"{exc}; the rest of this workspace was not copied")
    _drop_git_entries(stage)
    staged.files, staged.bytes = _measure(stage)
    return staged


def _drop_git_entries(stage: Path) -> None:
    for here, dirs, files in os.walk(stage):
        for name in [d for d in dirs if d.lower() == ".git"]:
            dirs.remove(name)
            shutil.rmtree(os.path.join(here, name))
        for name in files:
            # .git files, and write temp files a killed process left (never the agent's work)
            if name.lower() == ".git" or is_temp_name(name):
                os.unlink(os.path.join(here, name))


def _measure(stage: Path) -> tuple[int, int]:
    files = size = 0
    for here, _, names in os.walk(stage):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(here, name)).st_size
    return files, size


async def write_tree(git: Git, stage: Path, index: Path, skipped: list[str]) -> str:
    """Index everything in `stage` (in a private index: main's checkout is not touched) and
    write it as a tree; names git refuses are appended to `skipped`."""
    env = {"GIT_INDEX_FILE": str(index)}
    where = ("--git-dir", str(git.repo / ".git"), "--work-tree", str(stage))
    proc = await git.run(
        *where, "add", "--ignore-errors", "-A", "-f", "--", ".", cwd=stage, env=env, check=False
    )
    refused = _REFUSED_RE.findall(proc.stderr)
    if proc.returncode != 0 and not refused:
        err = proc.stderr.decode(errors="replace").strip()
        raise GitError(f"git add of a workspace failed: {err[-2000:]}")
    skipped += [f"{shown(os.fsdecode(name))}: a name git refuses, not copied" for name in refused]
    return await git.out(*where, "write-tree", cwd=stage, env=env)
