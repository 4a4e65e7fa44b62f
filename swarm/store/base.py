"""The connection, error translation, events and leases: what every part of the store shares."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from swarm.errors import RedisUnavailable, UserError
from swarm.models import Event, Plan, RunSpec, parse_event
from swarm.settings import Settings
from swarm.store.keys import Keys
from swarm.store.scripts import Scripts

# Replies meaning "Redis is there but refuses writes": an infrastructure problem, not a bug.
_UNAVAILABLE_REPLIES = ("MISCONF", "READONLY", "OOM", "MASTERDOWN")

T = TypeVar("T")


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def unavailable(exc: RedisError) -> bool:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


def translate_errors(cls: type[T]) -> type[T]:
    """Wrap every public coroutine method so redis-py's connection errors surface as
    errors.RedisUnavailable: callers above the adapter layer never import redis."""
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if not name.startswith("_") and inspect.iscoroutinefunction(attr):
                setattr(cls, name, _guarded(attr))
    return cls


def _guarded(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    if getattr(fn, "__guarded__", False):
        return fn

    @functools.wraps(fn)
    async def guarded(self: StoreBase, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except RedisError as e:
            if unavailable(e):
                raise RedisUnavailable(f"cannot reach Redis at {self.where}: {one_line(e)}") from e
            raise

    guarded.__guarded__ = True  # type: ignore[attr-defined]
    return guarded


class StoreBase:
    def __init__(self, r: Redis, settings: Settings, url: str) -> None:
        # Typed Any on purpose: redis-py's stubs cannot express decode_responses=True (every
        # reply here is str, never bytes); replies become pydantic models right at the edge.
        self._r: Any = r
        self.settings = settings
        self.keys = Keys()
        self.where = redact(url)
        self._lua = Scripts(r)
        self._maxlen = settings.event_stream_maxlen
        # Immutable per run (spec) or per revision (plan): parsed once per process.
        self._spec_cache: dict[str, RunSpec] = {}
        self._plan_cache: dict[str, tuple[int, Plan]] = {}

    @classmethod
    async def connect(cls, url: str, settings: Settings) -> Self:
        # Blocking pool: with hundreds of coroutines the default pool raises instead of waiting.
        # A few quick retries ride over a Redis restart; longer outages reach the caller.
        tcp: dict[str, Any] = {}
        if not url.startswith("unix:"):
            tcp = {"socket_keepalive": True}
        try:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=settings.redis_max_connections,
                timeout=30,
                decode_responses=True,
                socket_connect_timeout=5,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=4),
                **tcp,
            )
        except ValueError as e:
            raise UserError(f"invalid Redis URL {redact(url)}: {one_line(e)}") from e
        r = Redis.from_pool(pool)
        try:
            await r.ping()
            store = cls(r, settings, url)
            await store._ensure_group(store.keys.jobs, Keys.WORKERS)
        except (RedisError, OSError) as e:
            await r.aclose()
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {one_line(e)}") from e
        # Connected: from now on ride out a Redis restart (AOF replay included) for up to
        # settings.redis_outage_s, instead of failing the first call that meets it. Scripts
        # and stream reads are safe to retry (see scripts.py), so retrying is too.
        r.set_retry(outage_retry(settings.redis_outage_s))
        return store

    async def close(self) -> None:
        await self._r.aclose()

    async def ping(self) -> None:
        await self._r.ping()

    async def info(self) -> dict[str, Any]:
        """What `swarm doctor` reports about durability."""
        server = await self._r.info("server")
        persistence = await self._r.info("persistence")
        memory = await self._r.info("memory")
        try:
            appendfsync = (await self._r.config_get("appendfsync")).get("appendfsync")
        except ResponseError:  # CONFIG is often disabled on managed Redis
            appendfsync = None
        return {
            "redis_version": server.get("redis_version"),
            "aof_enabled": bool(int(persistence.get("aof_enabled", 0))),
            "appendfsync": appendfsync,
            "maxmemory_policy": memory.get("maxmemory_policy"),
        }

    async def _ensure_group(self, stream: str, group: str) -> None:
        """Create a consumer group idempotently; from id 0 so no earlier entry is missed."""
        try:
            await self._r.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ---- events ------------------------------------------------------------------------

    async def emit(self, event: Event) -> None:
        await self._r.xadd(
            self.keys.events(event.run),
            {"e": event.model_dump_json()},
            maxlen=self._maxlen,
            approximate=True,
        )

    async def read_events(
        self, run_id: str, after: str = "0-0", count: int = 500, block_ms: int | None = None
    ) -> list[tuple[str, Event]]:
        """Events after entry id `after`, oldest first. block_ms None or 0: do not wait."""
        reply = await self._r.xread(
            {self.keys.events(run_id): after}, count=count, block=block_ms or None
        )
        return [
            (entry_id, parse_event(fields["e"]))
            for _stream, entries in reply or []
            for entry_id, fields in entries
        ]

    # ---- leases ------------------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lease if free (or renew it if `owner` already holds it)."""
        got = await self._lua.acquire_lease(keys=[self.keys.lease(name)], args=[owner, _ms(ttl_s)])
        return bool(got)

    async def renew_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        got = await self._lua.renew_lease(keys=[self.keys.lease(name)], args=[owner, _ms(ttl_s)])
        return bool(got)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._lua.release_lease(keys=[self.keys.lease(name)], args=[owner])

    async def lease_owner(self, name: str) -> str | None:
        owner: str | None = await self._r.get(self.keys.lease(name))
        return owner

    async def lease_left_s(self, name: str) -> float:
        """Seconds until the lease expires unless renewed; 0 when nobody holds it."""
        ms: int = await self._r.pttl(self.keys.lease(name))
        return max(0, ms) / 1000


def outage_retry(outage_s: float) -> Retry:
    """Retries whose waits add up to at least `outage_s` (equal jitter: each wait is at
    least half its step, and steps reach 1 s after a few tries)."""
    waits, steps = 0.0, 0
    while waits < outage_s:
        waits += min(1.0, 0.05 * 2**steps) / 2
        steps += 1
    return Retry(EqualJitterBackoff(base=0.05, cap=1.0), retries=max(4, steps))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
