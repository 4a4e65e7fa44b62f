"""Shared fixtures. Real services only: a redis-server per test session, the Docker engine,
the simulator over HTTP. Under CI=true a missing service fails the run instead of skipping."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from swarm.settings import Settings
from swarm.simulator import SimConfig, SimulatorThread
from swarm.store import Store

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def require(condition: bool, reason: str) -> None:
    """Skip locally when a service is missing; fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required service missing under CI: {reason}")
    pytest.skip(reason)


def image_exists(name: str) -> bool:
    """Whether the Docker engine has image `name` (False without a docker client)."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "image", "inspect", name],
                          capture_output=True).returncode == 0


# ---- Redis -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on 127.0.0.1:port answers PONG (not LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_command(port: int, *args: str) -> bytes:
    """One command over a raw socket, for test set-up (FLUSHALL, CONFIG SET...)."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        payload += f"${len(a.encode())}\r\n{a}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(4096)


class RedisServer:
    """A real redis-server on a loopback port with its own data dir, for tests that need to
    kill it (SIGKILL) and start it again on the same port and data (AOF replay)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert REDIS_SERVER, "redis-server not installed"
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--appendfsync",
                "everysec",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = (self.dir / "redis.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, exactly like a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, crash: bool = True) -> None:
        self.kill() if crash else self.stop()
        self.start()

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def command(self, *args: str) -> bytes:
        """One raw command (the reply undecoded), to poke at state behind the Store's back."""
        return redis_command(self.port, *args)


@pytest.fixture(scope="session")
def redis_server_bin() -> str:
    """Path of the redis-server binary (skips, or fails under CI, when missing)."""
    require(REDIS_SERVER is not None, "redis-server not installed (apt-get install redis-server)")
    assert REDIS_SERVER
    return REDIS_SERVER


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests FLUSHALL it through `store`)."""
    require(REDIS_SERVER is not None, "redis-server not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start private servers a test may SIGKILL and restart (`.kill()`, `.start()`,
    `.restart()`); each has its own port and data dir and is killed after the test."""
    require(REDIS_SERVER is not None, "redis-server not installed (apt-get install redis-server)")
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    # Small numbers keep queue tests fast; tests needing others build their own Settings.
    return Settings(
        home=tmp_path / "home",
        redis_url=redis_url,
        max_deliveries=3,
        event_stream_maxlen=100,
        lease_ttl_s=1.0,
        heartbeat_s=0.1,
    )


@pytest.fixture
async def store(redis_server: RedisServer, settings: Settings) -> AsyncIterator[Store]:
    """A fresh Store on an empty database, closed after the test."""
    redis_server.flushall()
    assert settings.redis_url
    s = await Store.connect(settings.redis_url, settings)
    try:
        yield s
    finally:
        await s.close()


# ---- the model simulator -------------------------------------------------------------------


@pytest.fixture
def simulator_factory() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators over HTTP, each on its own thread and port: `simulator_factory(
    latency_ms=5, rate_429=0.2)` takes SimConfig fields. All are stopped after the test."""
    started: list[SimulatorThread] = []

    def start(**config: object) -> SimulatorThread:
        sim = SimulatorThread(SimConfig.model_validate(config)).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def simulator(simulator_factory: Callable[..., SimulatorThread]) -> SimulatorThread:
    """A default simulator: `.base_url` for the openai client, `.stats()`, `.reset()`."""
    return simulator_factory()
