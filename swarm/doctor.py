"""`swarm doctor`: can swarm work here? One line per check: OK, WARN, or FAIL with the reason.

Required checks (Redis, the Docker engine and sandbox image when Docker sandboxes are in use,
configured model endpoints) decide the exit code; WARN lines point at settings that weaken a
guarantee (durability, eviction) without stopping a run.

The embedded Redis is a daemon by design: doctor may start it, and leaves it running only if
it answers (embedded_redis stops a server that did not come up, so nothing is half-started).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from swarm.embedded_redis import ensure_embedded_redis
from swarm.errors import DockerUnavailable, SandboxError, SwarmError
from swarm.settings import Endpoint, Settings

Level = Literal["OK", "WARN", "FAIL"]

REDIS_TIMEOUT_S = 30.0
DOCKER_TIMEOUT_S = 20.0
ENDPOINT_TIMEOUT_S = 5.0
_INSTALL_DOCKER = "install and start it: bash scripts/provision.sh"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    @property
    def failed(self) -> bool:
        return self.level == "FAIL"

    def line(self) -> str:
        return f"{self.name:<22} {self.level:<4}  {self.detail}"


async def run_checks(settings: Settings) -> list[Check]:
    """Every check, in a stable order. Never raises for an unavailable service."""
    return [
        *await check_redis(settings),
        *await check_docker(settings),
        *await check_endpoints(settings),
    ]


def exit_code(checks: list[Check]) -> int:
    return 3 if any(c.failed for c in checks) else 0


# ---- Redis -----------------------------------------------------------------------------


async def check_redis(settings: Settings) -> list[Check]:
    from swarm.store import Store  # the redis adapter; imported only when used

    where = "SWARM_REDIS_URL" if settings.redis_url else "embedded"
    try:
        # No timeout of ours around the start: embedded_redis bounds it, and cancelling it
        # midway could leave a server it started but did not see answer.
        url = await ensure_embedded_redis(settings)
        with anyio.fail_after(REDIS_TIMEOUT_S):
            store = await Store.connect(url, settings)
            try:
                info = await store.info()
            finally:
                await store.close()
    except TimeoutError:
        return [Check("redis", "FAIL", f"{where} Redis gave no answer in {REDIS_TIMEOUT_S:g}s")]
    except SwarmError as err:
        return [Check("redis", "FAIL", str(err))]
    return [
        Check("redis", "OK", f"redis {info.get('redis_version')} ({where}, {store.where})"),
        _persistence(info),
        _eviction(info),
    ]


def _persistence(info: dict[str, Any]) -> Check:
    if not info.get("aof_enabled"):
        return Check("redis persistence", "WARN",
                     "AOF is off: a Redis crash loses recent run state "
                     "(CONFIG SET appendonly yes, or start redis-server --appendonly yes)")
    fsync = info.get("appendfsync")
    if fsync in ("always", "everysec"):
        loss = "none" if fsync == "always" else "about 1 s"
        return Check("redis persistence", "OK", f"AOF on, appendfsync {fsync} (loss window {loss})")
    if fsync is None:
        return Check("redis persistence", "OK", "AOF on (appendfsync unknown: CONFIG disabled)")
    return Check("redis persistence", "WARN",
                 f"AOF on but appendfsync {fsync}: the OS decides when writes reach disk")


def _eviction(info: dict[str, Any]) -> Check:
    policy = info.get("maxmemory_policy")
    if policy == "noeviction":
        return Check("redis eviction", "OK", "noeviction")
    return Check("redis eviction", "WARN",
                 f"maxmemory-policy {policy}: Redis may evict run state under memory pressure "
                 "(set maxmemory-policy noeviction)")


# ---- Docker ----------------------------------------------------------------------------


async def check_docker(settings: Settings) -> list[Check]:
    """The engine, then the sandbox image, through the docker backend (the only module that
    talks to Docker). Informational when sandboxes are local."""
    from swarm.sandbox.docker import DockerBackend

    local = settings.sandbox == "local"
    failing: Level = "WARN" if local else "FAIL"
    note = " (not used: SWARM_SANDBOX=local)" if local else ""
    image = settings.sandbox_image
    backend = DockerBackend(settings)
    try:
        with anyio.fail_after(DOCKER_TIMEOUT_S):
            await backend.connect()
    except DockerUnavailable as err:
        return [Check("docker engine", failing, f"{err}; {_INSTALL_DOCKER}{note}"),
                Check("sandbox image", failing, f"{image}: not checked (no engine){note}")]
    except SandboxError as err:  # the engine answered; the image is missing or stale
        return [Check("docker engine", "OK", "answers"),
                Check("sandbox image", failing, f"{err}{note}")]
    except TimeoutError:
        return [Check("docker engine", failing, f"no answer in {DOCKER_TIMEOUT_S:g}s{note}"),
                Check("sandbox image", failing, f"{image}: not checked (no engine){note}")]
    finally:
        await backend.aclose()
    return [Check("docker engine", "OK", "answers"), Check("sandbox image", "OK", image)]


# ---- model endpoints -------------------------------------------------------------------


async def check_endpoints(settings: Settings) -> list[Check]:
    if not settings.endpoints:
        return [Check("model endpoints", "OK",
                      "no endpoint configured: the built-in simulator will be used")]
    checks = []
    for role, endpoint in sorted(settings.endpoints.items()):
        level, detail = await anyio.to_thread.run_sync(probe_endpoint, endpoint)
        checks.append(Check(f"endpoint {role}", level, f"{endpoint.base_url}: {detail}"))
    return checks


def probe_endpoint(endpoint: Endpoint) -> tuple[Level, str]:
    """GET {base_url}/models (blocking; run it in a thread). Sent without credentials: the
    API key is resolved only by llm.py, so an endpoint that demands one is reported as
    answering, and the key is checked on first use."""
    url = endpoint.base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=ENDPOINT_TIMEOUT_S) as response:
            body = json.loads(response.read(1_000_000) or b"{}")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            key = f" (key from ${endpoint.api_key_env})" if endpoint.api_key_env else ""
            return "OK", f"answers; /models wants credentials, sent on real calls{key}"
        if err.code == 404:
            return "WARN", "answers, but has no /models to list its models"
        return "FAIL", f"HTTP {err.code} from /models"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return "FAIL", f"no answer: {reason}"
    except ValueError:
        return "FAIL", "/models did not answer JSON: is this an OpenAI-compatible /v1 URL?"
    ids = _model_ids(body)
    if endpoint.model in ids or not ids:
        return "OK", f"model {endpoint.model}"
    return "WARN", f"answers, but model {endpoint.model} is not among its {len(ids)} models"


def _model_ids(body: Any) -> set[str]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return set()
    return {str(m["id"]) for m in data if isinstance(m, dict) and "id" in m}
