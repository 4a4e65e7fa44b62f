"""An OpenAI-compatible model simulator over HTTP: deterministic plans, tool calls, syntheses.

Tests, benchmarks and the offline demo drive swarm through the real `openai` client against
this server. What it answers is decided in `sim_model.py` (pure and deterministic); this module
adds HTTP, streaming, injected transport faults, counters and ways to run it. Everything it
says is labelled simulated (model `swarm-sim`, content starting "[simulated]").
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from swarm.sim_model import (
    FAULT_KINDS,
    LABEL,
    MODEL,
    Reply,
    SimConfig,
    Turn,
    compacted_steps,
    missing_reasoning,
    parse_fault_spec,
    plan_for,
    prompt_chars,
    reply_for,
    stable_hash,
    transport_fault,
)

__all__ = [
    "MODEL", "SimConfig", "Simulator", "SimulatorThread", "parse_fault_spec", "plan_for",
    "run_simulator_forever", "serve_simulator",
]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": f"{LABEL} {message}", "type": kind, "code": str(status)}}
    return JSONResponse(body, status_code=status, headers=headers)

# ---- the server ----------------------------------------------------------------------------


class Simulator:
    """The ASGI app (`.app`) and its counters. One instance per server."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._hangs: set[anyio.CancelScope] = set()
        self.reset()
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/stats", self._stats, methods=["GET"]),
            Route("/stats/reset", self._reset, methods=["POST"]),
            Route("/healthz", self._health, methods=["GET"]),
        ])

    def reset(self) -> None:
        self.total = 0
        self.calls: Counter[str] = Counter()
        self.by_step: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0

    def stats(self) -> dict[str, Any]:
        return {"total": self.total, "calls": dict(self.calls), "by_step": dict(self.by_step),
                "faults": {k: self.faults[k] for k in FAULT_KINDS},
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}

    def release_hangs(self) -> None:
        """End hung requests now (at shutdown) instead of after `hang_s`."""
        for scope in list(self._hangs):
            scope.cancel()

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "swarm (simulated)"}]})

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "model": MODEL, "simulated": True})

    async def _chat(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON", "invalid_request_error")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return _error(400, "messages must be a list of objects", "invalid_request_error")
        turn = self._count(request, body, messages)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, body, turn)
        finally:
            self.in_flight -= 1

    def _count(
        self, request: Request, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> Turn:
        run = request.headers.get("x-swarm-run") or "-"
        node = request.headers.get("x-swarm-node") or "-"
        # Steps a compaction folded into a summary still count: decisions stay the same.
        step = (sum(1 for m in messages if m.get("role") == "assistant")
                + compacted_steps(messages))
        key = f"{run}/{node}/{step}"
        attempt = self.by_step[key]
        self.total += 1
        self.calls[f"{run}/{node}"] += 1
        self.by_step[key] += 1
        tools: dict[str, dict[str, Any]] = {}
        for tool in body.get("tools") or ():
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                tools[fn["name"]] = fn
        return Turn(run, node, step, attempt, messages, tools)

    async def _answer(self, request: Request, body: dict[str, Any], t: Turn) -> Response:
        c = self.config
        if c.reasoning and (i := missing_reasoning(t.messages)) is not None:
            return _error(400, f"messages[{i}] (assistant) lacks reasoning_content: "
                          "send it back (strict provider)", "invalid_request_error")
        if c.latency_ms:
            await anyio.sleep(c.latency_ms / 1000)
        fault = transport_fault(c, t)
        if fault:
            self.faults[fault] += 1
            return await self._fault_response(fault, request, t)
        reply, content_fault = reply_for(c, t)
        if content_fault:
            self.faults[content_fault] += 1
        usage = _usage(t.messages, reply)
        cid = f"chatcmpl-sim-{stable_hash(c.seed, t.run, t.node, t.step, t.attempt):016x}"
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(cid, reply, usage if include else None),
                                     media_type="text/event-stream")
        return JSONResponse(_completion(cid, reply, usage))

    async def _fault_response(self, fault: str, request: Request, t: Turn) -> Response:
        if fault == "429":
            after = self.config.retry_after_s
            return _error(429, "rate limited", "rate_limit_error", headers={
                "Retry-After": f"{after:g}", "retry-after-ms": str(round(after * 1000))})
        if fault == "500":
            return _error(500, "internal server error", "server_error")
        if fault == "hang":
            await self._hang(request)
            return _error(504, "hung request ended", "timeout")
        # garbage: alternately a non-JSON body and a completion without choices
        if t.attempt % 2:
            return JSONResponse({"object": "chat.completion", "model": MODEL, "choices": []})
        return Response(f"<html>{LABEL} bad gateway</html>", media_type="text/html")

    async def _hang(self, request: Request) -> None:
        # Hold the request until the client gives up (disconnects), hang_s passes, or the
        # server shuts down -- so hung requests never outlive their callers.
        with anyio.move_on_after(self.config.hang_s) as scope:
            self._hangs.add(scope)
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            finally:
                self._hangs.discard(scope)


def _usage(messages: list[dict[str, Any]], reply: Reply) -> dict[str, int]:
    out = len(reply.content) + len(reply.reasoning or "") + sum(
        len(n) + len(a) for _, n, a in reply.calls)
    prompt, completion = max(1, prompt_chars(messages) // 4), max(1, out // 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _completion(cid: str, reply: Reply, usage: dict[str, int]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.calls:
        message["tool_calls"] = [{"id": i, "type": "function",
                                  "function": {"name": n, "arguments": a}}
                                 for i, n, a in reply.calls]
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": MODEL,
            "system_fingerprint": MODEL, "usage": usage, "choices": [
                {"index": 0, "message": message, "finish_reason": reply.finish_reason,
                 "logprobs": None}]}


async def _sse(cid: str, reply: Reply, usage: dict[str, int] | None) -> AsyncIterator[bytes]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": MODEL, "choices": choices, **extra}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
        return event([{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}])

    yield delta({"role": "assistant", "content": ""})
    if reply.reasoning:
        yield delta({"reasoning_content": reply.reasoning})
    half = len(reply.content) // 2
    for piece in (reply.content[:half], reply.content[half:]):
        yield delta({"content": piece})
    for k, (call_id, name, args) in enumerate(reply.calls):
        yield delta({"tool_calls": [{"index": k, "id": call_id, "type": "function",
                                     "function": {"name": name, "arguments": ""}}]})
        half = len(args) // 2
        for piece in (args[:half], args[half:]):
            yield delta({"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
    yield delta({}, reply.finish_reason)
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


# ---- serving ------------------------------------------------------------------------------


def _uvicorn_config(app: Starlette) -> uvicorn.Config:
    # log_config=None: leave the host process's logging alone. A long keep-alive lets
    # clients reuse connections between an agent's turns.
    return uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                          lifespan="off", ws="none", http="h11", server_header=False,
                          timeout_keep_alive=30, timeout_graceful_shutdown=2, backlog=4096)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so port 0 works and the real port is known up front."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn that leaves signals to its host process and says when it is accepting."""

    def __init__(self, config: uvicorn.Config, ready: anyio.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_simulator(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0, *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `await tg.start(serve_simulator, cfg)` returns the bound port."""
    sim = Simulator(config)
    sock = _bind(host, port)
    ready = anyio.Event()
    server = _Server(_uvicorn_config(sim.app), ready)

    async def stop_when_cancelled() -> None:
        try:
            await ready.wait()
            task_status.started(sock.getsockname()[1])
            await anyio.sleep_forever()
        finally:
            sim.release_hangs()
            server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_cancelled)
        # Shielded so cancellation becomes uvicorn's graceful shutdown, not an abandoned socket.
        with anyio.CancelScope(shield=True):
            await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


def run_simulator_forever(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0, *,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve in the foreground (`swarm sim`) until SIGINT/SIGTERM, then return."""
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    if on_ready is None:
        print(f"swarm simulator on http://{host}:{bound}/v1 (model {MODEL}; every answer "
              "is simulated)", file=sys.stderr, flush=True)
    else:
        on_ready(bound)
    # uvicorn shuts down gracefully on the signal, then re-raises it to the handler that was
    # there before: SIGINT's raises KeyboardInterrupt, and SIGTERM (`docker stop`) is given
    # the same one, so either ends the call with exit 0, not a traceback or a kill.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(_uvicorn_config(Simulator(config).app)).run(sockets=[sock])


class SimulatorThread:
    """A simulator on its own event loop in a background thread, for tests and benchmarks."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or SimConfig()
        self.host, self.port = host, port
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> SimulatorThread:
        with self._stack as stack:
            self._portal = stack.enter_context(start_blocking_portal(name="swarm-simulator"))
            _, self.port = self._portal.start_task(
                serve_simulator, self.config, self.host, self.port)
            self._stack = stack.pop_all()
        return self

    def stop(self) -> None:
        if self._portal is not None:
            with contextlib.suppress(RuntimeError):  # already stopped
                self._portal.call(self._portal.stop, True)
            self._portal = None
        self._stack.close()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as r:
            result: dict[str, Any] = json.load(r)
            return result

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/stats/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
