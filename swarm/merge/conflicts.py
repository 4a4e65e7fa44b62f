"""Merging one node branch into main, and what happens when it conflicts.

Order of preference: a clean merge; else the resolver's edit (committed only if it says so and
no conflict marker is left); else a deterministic union (both sides kept, ours first, under a
header naming the node). Whatever happens, the repo leaves here not mid-merge: committed, or
reset to where it was before this branch.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Protocol

import anyio

from swarm.errors import SwarmError
from swarm.merge.git import Git, GitError, shown
from swarm.models import Model

UNION = "union fallback"


class ConflictResolver(Protocol):
    async def resolve(self, repo: Path, node: str, files: list[str]) -> bool:
        """Edit the conflicted `files` in `repo` (mid-merge, conflict markers present) and
        return True if they are resolved.

        `repo` is the merge's scratch working copy, not the final output folder. Do not run
        git in it (swarm stages and commits), and do not hand it to a model's shell: copy the
        files into a sandbox and write the answers back. Raising a SwarmError counts as giving
        up; other files the resolver creates are discarded."""
        ...


class ConflictRecord(Model):
    node: str
    files: list[str]
    resolved: bool  # True only when the resolver's resolution was committed
    how: str


async def merge_branch(
    git: Git, node: str, branch: str, resolver: ConflictResolver | None
) -> tuple[bool, ConflictRecord | None]:
    """Merge `branch` into the checked-out main: (merged?, the conflict record if any)."""
    message = f"merge {branch}"
    proc = await _merge(git, branch, message)
    if proc.returncode == 0:
        return True, None
    files = await _unmerged(git)
    if not files:
        await reset_hard(git)
        err = proc.stderr.decode(errors="replace").strip()
        raise GitError(f"git merge {branch} failed without a conflict: {err[-2000:]}")
    notes: list[str] = []
    if resolver is not None:
        why = await _try_resolver(git, node, files, resolver, message)
        if why is None:
            return True, _record(node, files, resolved=True, how="resolver")
        notes.append(why)
        # Start the union from git's own conflict state, not from what the resolver left.
        await reset_hard(git)
        await _merge(git, branch, message)
    return await _union(git, node, files, message, notes)


class NoMergeTree(Exception):
    """This git has no `merge-tree --write-tree` (it came in 2.38): merge in the worktree."""


async def clean_merge_tree(git: Git, ours: str, theirs: str) -> str | None:
    """The tree of merging `theirs` into commit `ours`, computed by git's merge machinery
    without an index or worktree (so its cost does not grow with the tree already merged),
    or None when the merge conflicts. Same strategy (ort) and result as `git merge`."""
    proc = await git.run("merge-tree", "--write-tree", "--no-messages", ours, theirs,
                         check=False)
    if proc.returncode == 0:
        return proc.stdout.split(b"\n", 1)[0].decode()
    if proc.returncode == 1:
        return None
    raise NoMergeTree(proc.stderr.decode(errors="replace").strip()[-500:])


async def _merge(git: Git, branch: str, message: str) -> subprocess.CompletedProcess[bytes]:
    return await git.run(
        "merge", "--no-ff", "--no-edit", "--no-verify", "-q", "-m", message, branch, check=False
    )


async def _unmerged(git: Git) -> list[str]:
    return await git.paths("diff", "--name-only", "--diff-filter=U", "-z")


async def reset_hard(git: Git) -> None:
    """Back to HEAD: no merge in progress, no stray files (ours alone lives in this repo)."""
    await git.run("reset", "-q", "--hard", "HEAD")
    await git.run("clean", "-q", "-f", "-f", "-d", "-x")


async def _try_resolver(
    git: Git, node: str, files: list[str], resolver: ConflictResolver, message: str
) -> str | None:
    """None if the resolver's resolution is committed, else why not."""
    try:
        ok = await resolver.resolve(git.repo, node, list(files))
    except SwarmError as exc:  # a failed merge agent degrades to the union, not a failed run
        return f"resolver failed: {exc}"
    if not ok:
        return "resolver gave up"
    problem = await anyio.to_thread.run_sync(resolution_problem, git.repo, files)
    if problem:
        return problem
    if (await git.run("rev-parse", "-q", "--verify", "MERGE_HEAD", check=False)).returncode:
        return "resolver ended the merge itself"
    await git.run("add", "-A", "-f", "--", *files)
    if await _unmerged(git) or not await _commit(git, message):
        return "resolution could not be committed"
    await reset_hard(git)  # drop anything else the resolver left lying around
    return None


async def _commit(git: Git, message: str) -> bool:
    proc = await git.run("commit", "-q", "--no-verify", "--no-edit", "-m", message, check=False)
    return proc.returncode == 0


def resolution_problem(repo: Path, files: list[str]) -> str | None:
    """Why the resolver's edit of `files` cannot be committed, or None if it can.

    A deleted file is a valid resolution; a symlink is not (it would ship in the output and
    could point anywhere), nor is a line that still starts a git conflict marker.
    """
    for rel in files:
        path = repo / rel
        if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
            return f"resolver left {shown(rel)} as something other than a plain file"
        if not path.exists():
            continue
        for line in path.read_bytes().splitlines():
            if line.startswith((b"<<<<<<<", b">>>>>>>")):
                return "resolver left conflict markers"
    return None


async def _union(
    git: Git, node: str, files: list[str], message: str, notes: list[str]
) -> tuple[bool, ConflictRecord]:
    kept: list[str] = []
    for path in files:
        ours = await _blob(git, "HEAD", path)
        theirs = await _blob(git, "MERGE_HEAD", path)
        if ours is None or theirs is None:
            continue  # file/directory clash: keep the tree as git left it (one side renamed)
        content = union_bytes(ours, theirs, node, path)
        if content is None:
            kept.append(path)
            content = ours
        await anyio.to_thread.run_sync(_replace_file, git.repo / path, content)
    if kept:
        notes.append("binary files kept from before: " + ", ".join(map(shown, kept)))
    await git.run("add", "-A", "-f", "--", ".")
    how = UNION + (f" ({'; '.join(notes)})" if notes else "")
    if await _unmerged(git) or not await _commit(git, message):
        await reset_hard(git)
        return False, _record(node, files, resolved=False,
                              how=f"not merged: the union could not be committed ({how})")
    return True, _record(node, files, resolved=False, how=how)


def _record(node: str, files: list[str], *, resolved: bool, how: str) -> ConflictRecord:
    return ConflictRecord(node=node, files=[shown(f) for f in files], resolved=resolved, how=how)


def union_bytes(ours: bytes, theirs: bytes, node: str, path: str) -> bytes | None:
    """Both versions, ours first, under a header naming the node; None for binary files."""
    if ours == theirs:
        return ours
    if b"\0" in ours or b"\0" in theirs:
        return None
    sep = b"" if not ours or ours.endswith(b"\n") else b"\n"
    header = f"----- swarm union merge: node {node}'s version of {shown(path)} follows -----\n"
    return ours + sep + header.encode() + theirs


async def _blob(git: Git, rev: str, path: str) -> bytes | None:
    proc = await git.run("cat-file", "blob", f"{rev}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def _replace_file(path: Path, content: bytes) -> None:
    # Unlink first: if anything put a symlink at this path, we must not write through it.
    mode = 0o644
    if path.is_symlink() or path.is_file():
        mode = 0o755 if path.lstat().st_mode & 0o100 else 0o644
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
