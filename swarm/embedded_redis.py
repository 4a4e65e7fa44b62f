"""swarm's private redis-server, used when no SWARM_REDIS_URL is set.

It listens only on a unix socket under `{home}/redis` (mode 700: only this user gets in),
persists with AOF, and outlives the process that started it, so the next `swarm` command
reuses it. This module manages the process; it does not import redis-py (it speaks the two
RESP commands it needs, PING, over the socket itself).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import anyio
import anyio.to_thread

from swarm.errors import RedisUnavailable
from swarm.settings import Settings

START_TIMEOUT_S = 30.0  # replaying a large AOF takes a while; LOADING replies mean "wait"
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05
# sun_path is 108 bytes on Linux (104 on macOS); Redis refuses longer socket paths.
_MAX_SOCKET_PATH = 100
_MISSING = (
    "redis-server not found; install it (Debian: apt-get install redis-server) "
    "or set SWARM_REDIS_URL"
)


class Ping(Enum):
    UP = "up"
    LOADING = "loading"
    DOWN = "down"


@dataclass(frozen=True)
class RedisPaths:
    dir: Path

    @property
    def sock(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    @property
    def lockfile(self) -> Path:
        return self.dir / "start.lock"

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"


async def ensure_embedded_redis(settings: Settings) -> str:
    """The Redis URL to use: settings.redis_url if set, else our own server, started now
    unless it already runs (it answers PING)."""
    if settings.redis_url:
        return settings.redis_url
    paths = RedisPaths(settings.redis_dir)
    if len(str(paths.sock)) > _MAX_SOCKET_PATH:
        raise RedisUnavailable(
            f"socket path {paths.sock} is too long for a unix socket; "
            "use a shorter SWARM_HOME or set SWARM_REDIS_URL"
        )
    paths.dir.mkdir(parents=True, exist_ok=True)
    paths.dir.chmod(0o700)
    # Two swarm commands starting at once must not start two servers on one AOF.
    async with _start_lock(paths):
        state = await ping(paths.sock)
        if state is Ping.UP:
            return paths.url
        # LOADING, or a live pid that does not answer yet: ours, starting; wait for it.
        start = state is Ping.DOWN and running_pid(paths) is None
        if start:
            await _start(settings, paths)
        await _wait_until_up(paths, started=start)
    return paths.url


async def stop_embedded_redis(settings: Settings) -> bool:
    """Stop our private server (SIGTERM: Redis flushes its AOF, then exits). True if one
    was running. A server named by settings.redis_url is never ours to stop."""
    if settings.redis_url:
        return False
    paths = RedisPaths(settings.redis_dir)
    pid = running_pid(paths)
    if pid is None:
        return False
    _signal(pid, signal.SIGTERM)
    if not await _wait_exit(pid, STOP_TIMEOUT_S):
        _signal(pid, signal.SIGKILL)
        await _wait_exit(pid, STOP_TIMEOUT_S)
    return True


async def ping(sock: Path, timeout_s: float = 1.0) -> Ping:
    try:
        with anyio.fail_after(timeout_s):
            async with await anyio.connect_unix(sock) as stream:
                await stream.send(b"*1\r\n$4\r\nPING\r\n")
                reply = await stream.receive(256)
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
        return Ping.DOWN
    if reply.startswith(b"-LOADING"):
        return Ping.LOADING
    return Ping.UP  # any other reply: something answers; its errors surface on first use


def running_pid(paths: RedisPaths) -> int | None:
    """The pid in our pidfile if that process is alive and is a redis-server."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _is_our_redis(pid, paths) else None


def _run_quietly(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, check=False, timeout=30)


async def _start(settings: Settings, paths: RedisPaths) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable(_MISSING)
    paths.pidfile.unlink(missing_ok=True)  # stale: its process is gone (running_pid said so)
    argv = [
        binary,
        "--unixsocket", str(paths.sock),
        "--unixsocketperm", "700",
        "--port", "0",
        "--dir", str(paths.dir),
        "--appendonly", "yes",
        "--appendfsync", settings.redis_appendfsync,
        "--daemonize", "yes",
        "--pidfile", str(paths.pidfile),
        "--logfile", str(paths.logfile),
    ]  # fmt: skip
    # A plain subprocess in a thread, not anyio.run_process: under uvloop the loop's child
    # watcher never reports the exit of a process that daemonizes (seen: a hang forever).
    done = await anyio.to_thread.run_sync(_run_quietly, argv)
    if done.returncode != 0:
        output = (done.stderr or done.stdout or b"").decode(errors="replace")
        raise RedisUnavailable(f"redis-server failed to start: {_one_line(output)}")


async def _wait_until_up(paths: RedisPaths, *, started: bool) -> None:
    """Wait for PONG; on failure stop what we started, so nothing is left half-started."""
    with anyio.move_on_after(START_TIMEOUT_S):
        while True:
            state = await ping(paths.sock)
            if state is Ping.UP:
                return
            if started and state is Ping.DOWN and _died(paths):
                break
            await anyio.sleep(_POLL_S)
    pid = running_pid(paths)
    if started and pid is not None:
        _signal(pid, signal.SIGKILL)
        await _wait_exit(pid, STOP_TIMEOUT_S)
    what = "did not start" if started else f"(pid {pid}) does not answer"
    raise RedisUnavailable(
        f"redis-server under {paths.dir} {what}: {_log_tail(paths)} (log: {paths.logfile})"
    )


def _died(paths: RedisPaths) -> bool:
    """True once the daemon wrote its pidfile and that process is gone."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    return not _alive(pid)


@asynccontextmanager
async def _start_lock(paths: RedisPaths) -> AsyncIterator[None]:
    # flock, polled without blocking so the event loop (and cancellation) keeps working.
    fd = os.open(paths.lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with anyio.fail_after(START_TIMEOUT_S * 2):
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await anyio.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


async def _wait_exit(pid: int, timeout_s: float) -> bool:
    # Not our child once daemonized: no wait() to call, so poll its /proc entry.
    with anyio.move_on_after(timeout_s):
        while True:
            if not _alive(pid):
                return True
            await anyio.sleep(_POLL_S)
    return False


_HAVE_PROC = Path("/proc/self/stat").exists()


def _alive(pid: int) -> bool:
    """Alive and not a zombie (in a container without an init, nobody reaps the daemon)."""
    if not _HAVE_PROC:
        return _signal(pid, 0)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"}


def _is_our_redis(pid: int, paths: RedisPaths) -> bool:
    """Guards against a stale pidfile whose pid now belongs to another process: ours is a
    redis-server whose command line (or process title) names our socket."""
    if not _HAVE_PROC:
        return True  # trust the pidfile
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    program = Path(cmdline.split(b"\0")[0].split(b" ")[0].decode(errors="replace")).name
    return program.startswith("redis-server") and str(paths.sock).encode() in cmdline


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as e:
        if e.errno == errno.EPERM:
            return True  # exists, owned by someone else
        raise
    return True


def _log_tail(paths: RedisPaths, lines: int = 3) -> str:
    try:
        tail = paths.logfile.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "no log written"
    return _one_line(" | ".join(tail)) or "log is empty"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]
