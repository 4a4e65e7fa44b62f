"""File merge: every node's workspace becomes a branch of the run's output repository, and the
branches are merged into `main` in the given order.

The repository is built in a scratch folder next to `output_dir` and swapped into place only
when complete, so `output_dir` is never seen half-made or mid-merge, and a crash or a
cancellation leaves the previous output untouched. Identity and dates are fixed, so the same
inputs always give the same commit hash: rerunning the merge is safe and idempotent.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from pydantic import Field

from swarm.errors import UserError
from swarm.merge.conflicts import (
    ConflictRecord,
    ConflictResolver,
    NoMergeTree,
    clean_merge_tree,
    merge_branch,
)
from swarm.merge.git import Git, shown
from swarm.merge.stage import stage_workspace, write_tree
from swarm.models import Model

MARKER = "swarm-output"  # in .git/: this folder is ours to rebuild
MAX_SKIPPED_SHOWN = 200
COMMIT_GRAPH_EVERY = 64  # merges between rewrites of the commit-graph (see _index_history)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")  # NodeSpec.id's rule


class FileMergeReport(Model):
    merged: list[str] = Field(
        default_factory=list,
        description="node ids whose branch was merged, in order (an empty workspace has none)",
    )
    conflicts: list[ConflictRecord] = Field(default_factory=list)
    files: int = Field(default=0, description="files in the merged tree")
    commit: str | None = None
    skipped: list[str] = Field(
        default_factory=list, description="workspace entries not copied, and why"
    )


@dataclass
class _Build:
    git: Git
    scratch: Path
    files_left: int
    bytes_left: int
    base: str = ""
    base_tree: str = ""
    skipped: list[str] = field(default_factory=list)
    skipped_total: int = 0


def branch_name(node: str) -> str:
    """`node/{id}`, unless the id breaks a git ref rule ('..', a trailing '.' or '.lock')."""
    if ".." in node or node.endswith((".", ".lock")):
        digest = hashlib.sha256(node.encode()).hexdigest()[:8]
        return f"node/{node.replace('.', '_')}-{digest}"
    return f"node/{node}"


def check_output_dir(path: Path) -> None:
    """Raise UserError unless `path` can become the output repo: absent, an empty folder, or a
    folder an earlier merge made. Cheap: the CLI can call it before a long run starts."""
    path = Path(path).resolve()
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise UserError(f"output {path} exists and is not a folder")
    if (path / ".git" / MARKER).is_file() or not any(path.iterdir()):
        return
    raise UserError(
        f"output folder {path} is not empty and was not made by swarm: it would be "
        "replaced, so swarm will not use it; choose a new or empty folder"
    )


async def merge_workspaces(
    output_dir: Path,
    workspaces: list[tuple[str, Path]],
    *,
    resolver: ConflictResolver | None = None,
    max_files: int = 10_000,
    max_bytes: int = 500_000_000,
) -> FileMergeReport:
    """(Re)make `output_dir` as a git repo holding every node's files merged into `main`.

    `max_files` and `max_bytes` bound the copies of all workspaces together; what falls
    over them (or is unsafe to copy) is listed in the report's `skipped`.
    """
    _check_nodes([node for node, _ in workspaces])
    target = await anyio.to_thread.run_sync(
        _check_target, Path(output_dir), [ws for _, ws in workspaces]
    )
    scratch = await anyio.to_thread.run_sync(_make_scratch, target)
    try:
        build = _Build(Git(scratch / "repo", scratch / "home"), scratch, max_files, max_bytes)
        report = await _build(build, workspaces, resolver)
        await anyio.to_thread.run_sync(_swap_into_place, scratch / "repo", target, scratch)
        return report
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)


def _check_nodes(nodes: Sequence[str]) -> None:
    for node in nodes:
        if not _ID_RE.match(node):
            raise UserError(f"node id {node!r} cannot name a merge branch")
    if len(set(nodes)) != len(nodes):
        raise UserError("node ids given to the file merge must be unique")


def _check_target(output_dir: Path, workspaces: list[Path]) -> Path:
    """The resolved output folder, if it is fit to (re)make."""
    target = output_dir.resolve()
    for ws in workspaces:
        ws = ws.resolve()
        # Copying a workspace that contains the output (or the reverse) would copy itself.
        if target.is_relative_to(ws) or ws.is_relative_to(target):
            raise UserError(f"output folder {target} and workspace {ws} overlap")
    check_output_dir(target)
    return target


def _make_scratch(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.merge-", dir=target.parent))
    (scratch / "repo").mkdir()
    (scratch / "home").mkdir()  # an empty HOME: no user gitignore or attributes apply
    return scratch


def _swap_into_place(built: Path, target: Path, scratch: Path) -> None:
    old = scratch / "old"  # removed with the scratch folder
    if not os.path.lexists(target):
        os.rename(built, target)
        return
    os.rename(target, old)
    try:
        os.rename(built, target)
    except OSError:
        os.rename(old, target)  # keep the previous output rather than none
        raise


async def _build(
    build: _Build, workspaces: list[tuple[str, Path]], resolver: ConflictResolver | None
) -> FileMergeReport:
    git = build.git
    await git.run("init", "-q", "--template=", "-b", "main", ".")
    await git.run("commit", "-q", "--allow-empty", "--no-verify", "-m", "swarm: empty base")
    build.base = await git.out("rev-parse", "HEAD")
    build.base_tree = await git.out("rev-parse", "HEAD^{tree}")
    await anyio.Path(git.repo / ".git" / MARKER).write_text(
        "made by swarm's file merge: this folder is rebuilt by every merge\n"
    )
    branches = [
        (node, branch_name(node))
        for node, ws in workspaces
        if await _commit_workspace(build, node, ws)
    ]
    report = await _merge_branches(git, build.base, branches, resolver)
    report.files = len(await git.paths("ls-files", "-z"))
    report.commit = await git.out("rev-parse", "HEAD")
    report.skipped = _skipped_summary(build)
    return report


async def _merge_branches(
    git: Git, base: str, branches: list[tuple[str, str]], resolver: ConflictResolver | None
) -> FileMergeReport:
    """Merge each branch into main in order; main's worktree ends checked out."""
    report = FileMergeReport()
    head = checked_out = base  # main's commit, and the commit its worktree shows
    in_memory = True
    for node, branch in branches:
        message = f"merge {branch}"
        if in_memory:
            # A clean merge needs no checkout: its tree and commit are made from objects
            # alone, so 1,000 branches cost 1,000 small merges, not 1,000 rewrites of a
            # growing worktree. The commit is the one `git merge --no-ff -m` would make.
            try:
                tree = await clean_merge_tree(git, head, branch)
            except NoMergeTree:
                tree, in_memory = None, False
            if tree is not None:
                head = await git.out("commit-tree", tree, "-p", head, "-p", branch,
                                     "-m", message)
                report.merged.append(node)
                if len(report.merged) % COMMIT_GRAPH_EVERY == 0:
                    await _index_history(git, head)
                continue
        # A conflict (or an old git): merge in the worktree, checked out at `head` first,
        # where the merge agent can work on the conflicting files.
        checked_out = await _check_out(git, head, checked_out)
        merged, record = await merge_branch(git, node, branch, resolver)
        head = checked_out = await git.out("rev-parse", "HEAD")
        if merged:
            report.merged.append(node)
        if record is not None:
            report.conflicts.append(record)
    await _check_out(git, head, checked_out)
    return report


async def _commit_workspace(build: _Build, node: str, workspace: Path) -> bool:
    """Commit a copy of `workspace` on its branch from the base; False if it holds nothing."""
    stage, index = build.scratch / "stage", build.scratch / "index"
    try:
        staged = await anyio.to_thread.run_sync(
            lambda: stage_workspace(
                workspace, stage, max_files=build.files_left, max_bytes=build.bytes_left
            )
        )
        build.files_left -= staged.files
        build.bytes_left -= staged.bytes
        tree = await write_tree(build.git, stage, index, staged.skipped) if staged.files else None
        _note_skipped(build, node, staged.skipped)
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, stage, True)
        await anyio.Path(index).unlink(missing_ok=True)
    if tree is None or tree == build.base_tree:
        return False
    commit = await build.git.out(
        "commit-tree", tree, "-p", build.base, "-m", f"node {node}: workspace"
    )
    await build.git.run("update-ref", f"refs/heads/{branch_name(node)}", commit)
    return True


async def _index_history(git: Git, head: str) -> None:
    """Write a commit-graph of main's history so far. Each merge looks for the merge base
    of main and a branch; without the graph that walk parses every merge commit made so
    far (~48 ms at 1,000), with it a few milliseconds."""
    await git.run("update-ref", "refs/heads/main", head)
    await git.run("commit-graph", "write", "--reachable", "--no-progress")


async def _check_out(git: Git, commit: str, current: str) -> str:
    """Point main at `commit` and make the index and worktree (now at `current`) match."""
    if commit != current:
        await git.run("update-ref", "refs/heads/main", commit)
        await git.run("reset", "-q", "--hard", "HEAD")
    return commit


def _note_skipped(build: _Build, node: str, skipped: list[str]) -> None:
    build.skipped_total += len(skipped)
    room = max(MAX_SKIPPED_SHOWN - len(build.skipped), 0)
    build.skipped += [f"{node}: {shown(entry)}" for entry in skipped[:room]]


def _skipped_summary(build: _Build) -> list[str]:
    more = build.skipped_total - len(build.skipped)
    return build.skipped + ([f"... and {more} more"] if more > 0 else [])
