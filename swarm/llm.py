"""Chat completions on any OpenAI-compatible endpoint: the only module that imports `openai`.

It owns what every agent shares per endpoint: a few HTTP clients, a concurrency limit, request
and token rate limits, retries with backoff that honours `Retry-After`, and usage/cost
accounting. Requests go out as plain JSON through the client's low-level `post`, so provider
fields the SDK does not model (`reasoning_content`, ...) survive both ways and no per-call
CPU is spent transforming long transcripts through the SDK's typed params.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx2
import openai
from pydantic import BaseModel

from swarm.errors import ModelError, ModelUnavailable
from swarm.models import Event, ModelWaiting, ToolCall, Usage
from swarm.settings import Endpoint

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})
MAX_RETRY_AFTER_S = 900.0  # a provider asking for longer (a daily quota) is down for us
OUTPUT_ESTIMATE = 512  # tokens reserved for the answer when the caller gives no max_tokens
CALLS_PER_CLIENT = 64  # in-flight calls per HTTP client before another client pays off
MAX_CLIENTS = 16
# Fields in a response message that only describe it and must not be sent back.
_RESPONSE_ONLY = frozenset({"annotations", "refusal", "audio", "function_call", "parsed"})


class ChatResult(BaseModel):
    message: dict[str, Any]  # the assistant message exactly as it goes back into the transcript
    content: str | None
    tool_calls: list[ToolCall]
    usage: Usage
    finish_reason: str | None
    model: str


class _Retry(Exception):
    """One failed attempt that may succeed if tried again."""

    def __init__(self, reason: str, *, retry_after: float | None = None, garbage: bool = False):
        super().__init__(reason)
        self.reason, self.retry_after, self.garbage = reason, retry_after, garbage


class TokenBucket:
    """`per_min` units a minute, bursting to `burst_s` seconds' worth; FIFO for waiters.

    The burst is short on purpose: providers enforce per-minute limits over shorter windows
    too, and a full minute's burst at start would invite 429s."""

    def __init__(self, per_min: float, burst_s: float = 10.0) -> None:
        self.rate = per_min / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = anyio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, n: float) -> float:
        """Wait until `n` units are free and take them; returns what was taken."""
        n = min(n, self.capacity)  # a request bigger than the bucket must still go, alone
        async with self._lock:  # one waiter at a time keeps order and avoids a herd
            self._refill()
            while self.level < n:
                await anyio.sleep((n - self.level) / self.rate)
                self._refill()
            self.level -= n
        return n

    def settle(self, taken: float, actual: float) -> None:
        """Correct an estimate once the real count is known (may leave the bucket in debt)."""
        self._refill()
        self.level = min(self.capacity, self.level + taken - actual)


class _EndpointState:
    """What all agents using one endpoint share."""

    def __init__(self, label: str, endpoint: Endpoint, n_clients: int, burst_s: float) -> None:
        self.label, self.endpoint = label, endpoint
        key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        self._secret = key or ""
        if n_clients <= 0:
            n_clients = min(MAX_CLIENTS, math.ceil(endpoint.max_concurrency / CALLS_PER_CLIENT))
        per_client = max(1, math.ceil(endpoint.max_concurrency / n_clients))
        # Several clients, each with a small pool: a pool's bookkeeping per request grows
        # with the connections it holds. One TLS context for all (35 ms to build each).
        # The transport is aiohttp, the SDK's own option "for improved concurrency
        # performance" (openai[aiohttp]): measured with 300 calls in flight, 1.1 ms of CPU
        # per call against 3.1 ms for the default httpx transport (bench/llm_client.py).
        tls = ssl.create_default_context()
        timeout = httpx2.Timeout(endpoint.timeout_s, connect=min(endpoint.timeout_s, 10.0))
        self.clients = [
            openai.AsyncOpenAI(
                base_url=endpoint.base_url, api_key=key or "sk-none", max_retries=0,
                timeout=timeout,
                http_client=openai.DefaultAioHttpClient(
                    verify=tls, timeout=timeout, limits=httpx2.Limits(
                        max_connections=per_client * 2,
                        max_keepalive_connections=per_client * 2)),
            )
            for _ in range(n_clients)
        ]
        self._next = 0
        self.limiter = anyio.CapacityLimiter(endpoint.max_concurrency)
        rpm, tpm = endpoint.requests_per_min, endpoint.tokens_per_min
        self.requests = TokenBucket(rpm, burst_s) if rpm else None
        self.tokens = TokenBucket(tpm, burst_s) if tpm else None

    def client(self) -> openai.AsyncOpenAI:
        self._next = (self._next + 1) % len(self.clients)
        return self.clients[self._next]

    def redact(self, text: str) -> str:
        """One line, at most 300 characters, never the API key."""
        if len(self._secret) >= 8:
            text = text.replace(self._secret, "***")
        return " ".join(text.split())[:300]


class LLM:
    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        *,
        on_event: Callable[[Event], Awaitable[None]] | None = None,
        clients_per_endpoint: int | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rate_burst_s: float = 10.0,
    ) -> None:
        if not endpoints:
            raise ModelUnavailable("no model endpoint configured")
        self.endpoints = dict(endpoints)
        self.on_event = on_event
        # None: sized to the endpoint's max_concurrency, one client per 64 calls, up to 16.
        self.clients_per_endpoint = clients_per_endpoint or 0
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.rate_burst_s = rate_burst_s
        self._states: dict[str, _EndpointState] = {}
        self._random = random.Random()

    def endpoint_for(self, role: str) -> Endpoint:
        return self.endpoints[self._label_for(role)]

    def _label_for(self, role: str) -> str:
        if role in self.endpoints:
            return role
        if "default" in self.endpoints:
            return "default"
        raise ModelUnavailable(f"no endpoint for role {role!r} and no 'default' endpoint")

    def _state(self, role: str) -> _EndpointState:
        label = self._label_for(role)
        state = self._states.get(label)
        if state is None:
            ep = self.endpoints[label]
            # Roles configured with the same endpoint share its limits and connections.
            state = next((s for s in self._states.values() if s.endpoint == ep), None)
            state = state or _EndpointState(label, ep, self.clients_per_endpoint,
                                            self.rate_burst_s)
            self._states[label] = state
        return state

    @staticmethod
    def cost(endpoint: Endpoint, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * endpoint.price_in_per_m + tokens_out * endpoint.price_out_per_m) / 1e6

    async def aclose(self) -> None:
        states = {id(s): s for s in self._states.values()}.values()
        self._states.clear()
        for state in states:
            for client in state.clients:
                await client.close()

    async def chat(
        self,
        role: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        run: str,
        node: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> ChatResult:
        st = self._state(role)
        ep = st.endpoint
        body: dict[str, Any] = {"model": model or ep.model, "messages": messages}
        if tools:
            body["tools"] = tools
        if max_tokens:
            body["max_tokens"] = max_tokens
        headers = {"X-Swarm-Run": run, "X-Swarm-Node": node or "-"}
        prompt_estimate = _prompt_chars(messages, tools) // 4
        estimate = prompt_estimate + (max_tokens or OUTPUT_ESTIMATE)
        attempts = ep.max_retries + 1
        for attempt in range(attempts):
            try:
                data = await self._attempt(st, body, headers, estimate)
                return _result(st, data, body["model"], prompt_estimate)
            except _Retry as failure:
                if attempt + 1 == attempts:
                    error = ModelError if failure.garbage else ModelUnavailable
                    raise error(f"{st.label} endpoint ({ep.model}): {failure.reason} "
                                f"(gave up after {attempts} attempts)") from None
                await self._wait(st, failure, attempt, run, node)
        raise AssertionError("unreachable")

    async def _wait(self, st: _EndpointState, failure: _Retry, attempt: int, run: str,
                    node: str | None) -> None:
        if failure.retry_after is not None:
            delay = failure.retry_after
        else:  # full jitter: concurrent callers that failed together spread out
            cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
            delay = self._random.uniform(0, cap)
        reason = f"{failure.reason}; retry {attempt + 1}/{st.endpoint.max_retries} in {delay:.2f}s"
        log.info("model %s: %s", st.label, reason)
        if self.on_event is not None:
            await self.on_event(ModelWaiting(run=run, node=node, endpoint=st.label,
                                             wait_s=round(delay, 3), reason=reason))
        await anyio.sleep(delay)  # parked, not holding a concurrency slot

    async def _attempt(self, st: _EndpointState, body: dict[str, Any], headers: dict[str, str],
                       estimate: int) -> dict[str, Any]:
        ep = st.endpoint
        async with st.limiter:
            # Rate tokens are taken inside the slot, right before sending, so a call queued
            # for a slot does not spend them early and burst later.
            if st.requests:
                await st.requests.take(1)
            taken = await st.tokens.take(estimate) if st.tokens else 0.0
            try:
                # A guard over the whole call: the client's timeout is per read, and a server
                # that trickles bytes would never trip it.
                with anyio.fail_after(ep.timeout_s * 2 + 5):
                    response = await st.client().post(
                        "/chat/completions", cast_to=httpx2.Response, body=body,
                        options={"headers": headers})
            except openai.APIStatusError as e:
                raise _status_failure(st, e) from None
            except openai.APITimeoutError as e:
                refused = _connection_error(e)
                if refused is not None:  # the aiohttp transport reports a refusal as a timeout
                    raise _Retry(f"connection failed: {st.redact(str(refused))}") from None
                raise _Retry(f"timed out after {ep.timeout_s:g}s") from None
            except openai.APIConnectionError as e:
                raise _Retry(f"connection failed: {st.redact(str(e.__cause__ or e))}") from None
            except TimeoutError:
                raise _Retry(f"no complete answer within {ep.timeout_s * 2 + 5:g}s") from None
            data = _parse_body(st, response)
            if st.tokens:
                usage = data.get("usage") or {}
                st.tokens.settle(taken, int(usage.get("total_tokens") or estimate))
            return data


def _connection_error(e: BaseException) -> OSError | None:
    """The socket error (refused, unreachable, DNS) somewhere behind `e`, if any."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _status_failure(st: _EndpointState, e: openai.APIStatusError) -> Exception:
    status = e.status_code
    detail = e.body.get("message") if isinstance(e.body, dict) else None
    reason = st.redact(f"HTTP {status}: {detail or e.message}")
    if status in RETRY_STATUSES or status >= 500:
        return _Retry(reason, retry_after=retry_after_s(e.response.headers))
    return ModelError(f"{st.label} endpoint ({st.endpoint.model}) refused the request: {reason}")


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds a response asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or an
    HTTP date. None when absent or unreadable."""
    lowered = {k.lower(): v for k, v in headers.items()}
    seconds: float | None = None
    if "retry-after-ms" in lowered:
        try:
            seconds = float(lowered["retry-after-ms"]) / 1000
        except ValueError:
            seconds = None
    if seconds is None and "retry-after" in lowered:
        value = lowered["retry-after"].strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - (
                    time.time() if now is None else now)
            except (TypeError, ValueError):
                return None
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _parse_body(st: _EndpointState, response: httpx2.Response) -> dict[str, Any]:
    try:
        data = json.loads(response.content)
    except ValueError:
        kind = response.headers.get("content-type", "?")
        raise _Retry(f"response is not JSON ({kind}): {st.redact(response.text[:80])}",
                     garbage=True) from None
    if not isinstance(data, dict):
        raise _Retry("response is not a JSON object", garbage=True)
    if data.get("error"):  # some gateways answer 200 with an error object
        raise _Retry(f"error in response: {st.redact(json.dumps(data['error']))}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message"), dict):
        raise _Retry("response has no choices[0].message", garbage=True)
    return data


def _prompt_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    n = len(json.dumps(tools)) if tools else 0
    for m in messages:
        content = m.get("content")
        n += len(content) if isinstance(content, str) else len(json.dumps(content or ""))
        for call in m.get("tool_calls") or ():
            n += len(str((call.get("function") or {}).get("arguments", ""))) + 16
    return n


def _text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def _normalize_call(k: int, raw: Any) -> dict[str, Any]:
    """A tool call as the transcript keeps it: an id and string arguments, always, and every
    other field the provider sent (some need theirs back, e.g. thought signatures)."""
    call = dict(raw) if isinstance(raw, dict) else {}
    call.pop("index", None)
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if not isinstance(args, str):  # some local servers send an object
        args = json.dumps(args if args is not None else {})
    fn["name"], fn["arguments"] = str(fn.get("name") or ""), args
    if not call.get("id"):
        digest = hashlib.blake2b(f"{k}{fn['name']}{args}".encode(), digest_size=6).hexdigest()
        call["id"] = f"call_{k}_{digest}"
    call["type"] = call.get("type") or "function"
    call["function"] = fn
    return call


def _result(
    st: _EndpointState, data: dict[str, Any], model: str, prompt_estimate: int
) -> ChatResult:
    choice = data["choices"][0]
    raw = choice["message"]
    calls = [_normalize_call(k, c) for k, c in enumerate(raw.get("tool_calls") or ())]
    # Keep everything the provider sent (reasoning_content and friends must go back in later
    # turns) except empty values and fields that only describe the response.
    message = {k: v for k, v in raw.items()
               if k not in _RESPONSE_ONLY and k != "tool_calls" and v not in (None, "", [], {})}
    message["role"] = "assistant"
    if "content" not in message:  # null is valid beside tool calls, otherwise send ""
        message["content"] = None if calls else ""
    if calls:
        message["tool_calls"] = calls
    content = _text(raw.get("content"))
    usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
    out_estimate = (len(content or "") + sum(len(c["function"]["arguments"]) for c in calls)) // 4
    tokens_in = int(usage.get("prompt_tokens") or prompt_estimate)
    tokens_out = int(usage.get("completion_tokens") or out_estimate)
    return ChatResult(
        message=message,
        content=content,
        tool_calls=[ToolCall(id=c["id"], name=c["function"]["name"],
                             arguments=c["function"]["arguments"]) for c in calls],
        usage=Usage(tokens_in=tokens_in, tokens_out=tokens_out, llm_calls=1,
                    cost_usd=LLM.cost(st.endpoint, tokens_in, tokens_out)),
        finish_reason=choice.get("finish_reason"),
        model=str(data.get("model") or model),
    )
