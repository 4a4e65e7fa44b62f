"""The tools an agent can call: schemas from pydantic models, execution against a Sandbox.

A bad call (arguments that are not JSON or do not fit the schema, or an unknown tool) is not
an exception: it becomes a tool result that tells the model what was wrong, so the model can
correct itself. The agent loop bounds how many such corrections it allows.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm.errors import SandboxError
from swarm.models import NodeResult, ToolCall, ToolResult
from swarm.sandbox.base import Sandbox

# What goes back into the transcript is capped: a long `cat` must not eat the context window.
OUTPUT_CAP_CHARS = 12_000


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShellArgs(_Args):
    """Run a shell command in the workspace (/workspace) of your sandbox."""

    command: str = Field(min_length=1, description="bash command line")
    timeout_s: float | None = Field(default=None, gt=0, le=3600, description="seconds")


class ReadFileArgs(_Args):
    """Read a text file from your workspace."""

    path: str = Field(min_length=1, description="path relative to the workspace")


class WriteFileArgs(_Args):
    """Create or overwrite a file in your workspace."""

    path: str = Field(min_length=1, description="path relative to the workspace")
    content: str


class ListFilesArgs(_Args):
    """List files under a folder of your workspace."""

    path: str = Field(default=".", description="folder relative to the workspace")


class FinishArgs(_Args):
    """Finish the task: hand on a summary of what you did and found (and optional data)."""

    summary: str = Field(min_length=1)
    data: dict[str, Any] | None = Field(default=None, description="structured result")


TOOLS: dict[str, type[_Args]] = {
    "shell": ShellArgs,
    "read_file": ReadFileArgs,
    "write_file": WriteFileArgs,
    "list_files": ListFilesArgs,
    "finish": FinishArgs,
}
FINISH = "finish"


def tool_schemas(names: list[str]) -> list[dict[str, Any]]:
    """OpenAI `tools` entries for the named tools (unknown names are a plan error upstream).
    Built once per tool set: generating JSON schemas costs more than an agent step."""
    return _schemas(tuple(names))


@functools.cache
def _schemas(names: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        model = TOOLS[name]
        schema = model.model_json_schema()
        schema.pop("title", None)
        out.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": (model.__doc__ or name).strip(),
                    "parameters": schema,
                },
            }
        )
    return out


class BadCall(Exception):
    """Internal: a call the model must correct. Never escapes this module's callers."""


def parse_call(call: ToolCall, allowed: list[str]) -> _Args:
    """Validate a call's name and arguments, or raise BadCall with a message for the model."""
    if call.name not in allowed or call.name not in TOOLS:
        raise BadCall(f"unknown tool {call.name!r}; available tools: {', '.join(allowed)}")
    try:
        raw = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise BadCall(
            f"arguments for {call.name} are not valid JSON ({exc.msg} at char {exc.pos}); "
            "send a JSON object matching the tool's schema"
        ) from None
    try:
        return TOOLS[call.name].model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
            for e in exc.errors()
        )
        raise BadCall(f"invalid arguments for {call.name}: {problems}") from None


def cap(text: str, limit: int = OUTPUT_CAP_CHARS) -> str:
    """Keep head and tail of long output and say how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[-tail:]}"


async def execute(
    args: _Args, call: ToolCall, sandbox: Sandbox, *, exec_timeout_s: float
) -> ToolResult:
    """Run one validated call. Sandbox failures become failed tool results, not crashes."""
    try:
        content, ok = await _dispatch(args, sandbox, exec_timeout_s)
    except (SandboxError, OSError, ValueError) as exc:
        # A missing file or a refused path is the model's to fix, not the node's to die of.
        content, ok = f"error: {exc}", False
    return ToolResult(call_id=call.id, name=call.name, content=cap(content), ok=ok)


async def _dispatch(args: _Args, sandbox: Sandbox, exec_timeout_s: float) -> tuple[str, bool]:
    if isinstance(args, ShellArgs):
        timeout = min(args.timeout_s or exec_timeout_s, exec_timeout_s)
        res = await sandbox.exec(args.command, timeout_s=timeout)
        status = "timed out" if res.timed_out else f"exit code {res.exit_code}"
        note = " (output was cut)" if res.truncated else ""
        return f"[{status}{note}]\n{res.output}", res.exit_code == 0 and not res.timed_out
    if isinstance(args, ReadFileArgs):
        data = await sandbox.read_file(args.path)
        return data.decode("utf-8", errors="replace"), True
    if isinstance(args, WriteFileArgs):
        await sandbox.write_file(args.path, args.content.encode())
        return f"wrote {len(args.content.encode())} bytes to {args.path}", True
    if isinstance(args, ListFilesArgs):
        files = await sandbox.list_files(args.path)
        lines = [f"{f.path}{'/' if f.is_dir else ''}\t{f.size}" for f in files]
        return "\n".join(lines) or "(empty)", True
    raise BadCall(f"tool {type(args).__name__} cannot be executed here")


def finish_result(args: FinishArgs) -> NodeResult:
    return NodeResult(summary=args.summary, data=args.data)
