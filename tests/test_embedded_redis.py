"""swarm.embedded_redis: start, reuse and stop a private redis-server under a temp home."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from swarm.embedded_redis import (
    Ping,
    RedisPaths,
    ensure_embedded_redis,
    ping,
    running_pid,
    stop_embedded_redis,
)
from swarm.errors import RedisUnavailable
from swarm.settings import Settings
from swarm.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def home_settings(
    tmp_path_factory: pytest.TempPathFactory, redis_server_bin: str
) -> AsyncIterator[Settings]:
    """Settings with no redis_url and a short home (unix socket paths are length-limited);
    whatever server a test leaves running is stopped afterwards."""
    settings = Settings(home=tmp_path_factory.mktemp("home"), redis_url=None)
    yield settings
    await stop_embedded_redis(settings)


async def test_start_reuse_and_stop(home_settings: Settings) -> None:
    paths = RedisPaths(home_settings.redis_dir)
    url = await ensure_embedded_redis(home_settings)
    assert url == f"unix://{paths.sock}"
    pid = running_pid(paths)
    assert pid is not None
    assert paths.sock.stat().st_mode & 0o077 == 0  # only this user can connect
    assert paths.dir.stat().st_mode & 0o077 == 0

    assert await ensure_embedded_redis(home_settings) == url
    assert running_pid(paths) == pid  # reused, not restarted

    store = await Store.connect(url, home_settings)
    try:
        info = await store.info()
        assert info["aof_enabled"] and info["appendfsync"] == home_settings.redis_appendfsync
        assert await store.acquire_lease("kept", "me", ttl_s=600)
    finally:
        await store.close()

    assert await stop_embedded_redis(home_settings)
    assert running_pid(paths) is None
    assert await ping(paths.sock) is Ping.DOWN
    assert not await stop_embedded_redis(home_settings)

    # Started again, it replays its AOF: what was written before the stop is still there.
    url = await ensure_embedded_redis(home_settings)
    store = await Store.connect(url, home_settings)
    try:
        assert await store.lease_owner("kept") == "me"
    finally:
        await store.close()


async def test_concurrent_starts_share_one_server(home_settings: Settings) -> None:
    urls: list[str] = []

    async def start() -> None:
        urls.append(await ensure_embedded_redis(home_settings))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(start)
    assert len(set(urls)) == 1
    pid = running_pid(RedisPaths(home_settings.redis_dir))
    redis_pids = [p for p in _pids_of("redis-server") if str(home_settings.redis_dir) in _cmd(p)]
    assert redis_pids == [pid]


async def test_stale_pidfile_does_not_block_a_start(home_settings: Settings) -> None:
    paths = RedisPaths(home_settings.redis_dir)
    paths.dir.mkdir(parents=True)
    paths.pidfile.write_text(str(os.getpid()))  # alive, but not a redis-server
    await ensure_embedded_redis(home_settings)
    assert running_pid(paths) not in (None, os.getpid())


async def test_a_configured_url_is_used_as_is(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, redis_url="redis://example:6379/0")
    assert await ensure_embedded_redis(settings) == "redis://example:6379/0"
    assert not (tmp_path / "redis").exists()
    assert not await stop_embedded_redis(settings)


async def test_missing_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    settings = Settings(home=tmp_path / "h", redis_url=None)
    with pytest.raises(RedisUnavailable, match="redis-server not found; install it"):
        await ensure_embedded_redis(settings)


async def test_a_failed_start_is_reported_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    settings = Settings(home=tmp_path / "h", redis_url=None)
    with pytest.raises(RedisUnavailable, match="failed to start: FATAL CONFIG FILE ERROR"):
        await ensure_embedded_redis(settings)
    assert running_pid(RedisPaths(settings.redis_dir)) is None


async def test_too_long_a_socket_path_is_refused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / ("x" * 120), redis_url=None)
    with pytest.raises(RedisUnavailable, match="too long"):
        await ensure_embedded_redis(settings)


def _pids_of(name: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and name in _cmd(int(entry.name)):
            out.append(int(entry.name))
    return out


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
