"""Recorded model calls: the merge stage's checkpoints.

A merge (a `merge` node's tree of merger calls, the run's final synthesis, the merge agent
that resolves file conflicts) is rerun from the start after a crash. `RecordedChat` wraps the
model client so that every answer is recorded before it is returned, and a call identical to
one made before (same role, node label, model, messages and tools) is answered from the record.
A rerun therefore replays what was done and asks the model only for what was not: a crash
repeats at most the calls that were in flight, each at most once.

Where the record lives is a `Recorder`: a `merge` node records into its own fenced step stream
(a zombie worker cannot write there), the coordinator's merge stage into a run-level hash.
Recording charges the call's usage to the run in the same write, so callers do not.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import anyio

from swarm.llm import ChatResult
from swarm.models import Claim, StepRecord
from swarm.settings import Endpoint


class Recorder(Protocol):
    async def recall(self, key: str) -> ChatResult | None: ...
    async def record(self, key: str, result: ChatResult) -> None: ...


class ChatClient(Protocol):
    async def chat(self, role: str, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None, *, run: str,
                   node: str | None = None, model: str | None = None,
                   max_tokens: int | None = None) -> ChatResult: ...
    def endpoint_for(self, role: str) -> Endpoint: ...


def call_key(role: str, node: str | None, model: str | None, messages: list[dict[str, Any]],
             tools: list[dict[str, Any]] | None, max_tokens: int | None) -> str:
    body = json.dumps([role, node, model, messages, tools, max_tokens], sort_keys=True,
                      ensure_ascii=False, default=str)
    digest = hashlib.sha256(body.encode()).hexdigest()[:32]
    return f"{node or '-'}:{digest}"


class RecordedChat:
    """A ChatModel that records every answer and replays answers to repeated calls."""

    def __init__(self, llm: ChatClient, recorder: Recorder) -> None:
        self.llm, self.recorder = llm, recorder
        self.replayed = 0

    def endpoint_for(self, role: str) -> Endpoint:
        return self.llm.endpoint_for(role)

    async def chat(self, role: str, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None, *, run: str,
                   node: str | None = None, model: str | None = None,
                   max_tokens: int | None = None) -> ChatResult:
        key = call_key(role, node, model, messages, tools, max_tokens)
        known = await self.recorder.recall(key)
        if known is not None:
            self.replayed += 1
            return known
        result = await self.llm.chat(role, messages, tools, run=run, node=node, model=model,
                                     max_tokens=max_tokens)
        await self.recorder.record(key, result)
        return result


class StepStoreLike(Protocol):
    async def load_steps(self, run_id: str, node_id: str) -> list[StepRecord]: ...
    async def append_step(self, claim: Claim, step: StepRecord, event: Any = None) -> Any: ...


class NodeRecorder:
    """Records into a node's step stream, fenced by the worker's claim (kind `assistant`,
    the call's key and answer in `message`)."""

    def __init__(self, store: StepStoreLike, claim: Claim) -> None:
        self.store, self.claim = store, claim
        self._known: dict[str, ChatResult] | None = None
        self._next = 0
        self._lock = anyio.Lock()  # the calls of one merge level come in concurrently

    async def _load(self) -> dict[str, ChatResult]:
        async with self._lock:
            if self._known is None:
                await self._read()
            assert self._known is not None
            return self._known

    async def _read(self) -> None:
        job = self.claim.job
        steps = await self.store.load_steps(job.run, job.node)
        self._known = {}
        for step in steps:
            message = step.message or {}
            if "replay_key" in message and "answer" in message:
                self._known[message["replay_key"]] = ChatResult.model_validate(message["answer"])
        self._next = max((s.n for s in steps), default=-1) + 1

    async def recall(self, key: str) -> ChatResult | None:
        return (await self._load()).get(key)

    async def record(self, key: str, result: ChatResult) -> None:
        known = await self._load()
        n, self._next = self._next, self._next + 1
        message = {"role": "assistant", "content": result.content, "replay_key": key,
                   "answer": result.model_dump(mode="json")}
        await self.store.append_step(self.claim, StepRecord(n=n, kind="assistant",
                                                            message=message,
                                                            usage=result.usage))
        known[key] = result


class RunStoreLike(Protocol):
    async def recall_call(self, run_id: str, key: str) -> str | None: ...
    async def record_call(self, run_id: str, key: str, answer: str, usage: Any) -> None: ...


class RunRecorder:
    """Records into the run's hash of merge-stage calls (the coordinator's merge stage: only
    the run's leader writes there)."""

    def __init__(self, store: RunStoreLike, run: str) -> None:
        self.store, self.run = store, run

    async def recall(self, key: str) -> ChatResult | None:
        raw = await self.store.recall_call(self.run, key)
        return ChatResult.model_validate_json(raw) if raw else None

    async def record(self, key: str, result: ChatResult) -> None:
        await self.store.record_call(self.run, key, result.model_dump_json(), result.usage)
