"""git for the file merge: every call through `anyio.run_process`, with a fixed identity and
fixed dates (so the same inputs give the same commit hashes) and no configuration from the
machine or the user's HOME (so a user's hooks, signing or global ignores cannot change it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import anyio

from swarm.errors import InfraUnavailable, SwarmError

NAME, EMAIL = "swarm", "swarm@localhost"
FIXED_DATE = "2000-01-01T00:00:00+00:00"

# Overrides on the command line win over the repo's own config, which a conflict resolver
# working in the repo could have touched.
_CONFIG = (
    f"user.name={NAME}",
    f"user.email={EMAIL}",
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.autocrlf=false",
    "core.quotePath=false",
    "commit.gpgSign=false",
    "merge.conflictStyle=merge",
    "init.defaultBranch=main",
    "gc.auto=0",
    "maintenance.auto=false",  # no background `git maintenance` process after each merge
)


def shown(path: str) -> str:
    """A path as text that can be printed and stored: undecodable bytes become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class GitError(SwarmError):
    """git failed in a way the merge did not expect; the output repo was not replaced."""


def git_binary() -> str:
    found = shutil.which("git")
    if found is None:
        raise InfraUnavailable("git is not installed (or not on PATH): the file merge needs it")
    return found


def _environment(home: Path) -> dict[str, str]:
    # A minimal environment, not a copy of ours: an inherited GIT_DIR, GIT_INDEX_FILE or
    # GIT_WORK_TREE (e.g. when swarm runs from a git hook) would point git elsewhere.
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": NAME,
        "GIT_AUTHOR_EMAIL": EMAIL,
        "GIT_COMMITTER_NAME": NAME,
        "GIT_COMMITTER_EMAIL": EMAIL,
        "GIT_AUTHOR_DATE": FIXED_DATE,
        "GIT_COMMITTER_DATE": FIXED_DATE,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_EDITOR": "true",
        "LC_ALL": "C",
    }


class Git:
    """One repository, driven by git subprocesses. `home` must be an empty private folder."""

    def __init__(self, repo: Path, home: Path) -> None:
        self.repo = repo
        self._env = _environment(home)
        self._argv = [git_binary()]
        for item in _CONFIG:
            self._argv += ["-c", item]

    async def run(
        self,
        *args: str,
        check: bool = True,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [*self._argv, *args]
        merged_env = {**self._env, **(env or {})}
        proc = await anyio.run_process(
            argv, check=False, cwd=str(cwd or self.repo), env=merged_env
        )
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise GitError(f"git {' '.join(args)} failed ({proc.returncode}): {err[-2000:]}")
        return proc

    async def out(
        self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """stdout of a git command that must succeed, stripped."""
        proc = await self.run(*args, cwd=cwd, env=env)
        return proc.stdout.decode(errors="surrogateescape").strip()

    async def paths(self, *args: str) -> list[str]:
        """The NUL-separated paths a `-z` command prints, deduplicated, in order."""
        proc = await self.run(*args)
        seen: dict[str, None] = {}
        for raw in proc.stdout.split(b"\0"):
            if raw:
                seen[os.fsdecode(raw)] = None
        return list(seen)
