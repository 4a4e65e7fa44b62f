"""An agent's conversation, rebuilt from its checkpointed steps. Pure: no I/O.

Everything the loop needs to decide what to do next (messages, the next step number, whether
tool calls are still owed their results, how often a call was repeated, tokens used) is
derived from the step records, so resume is "load the records, then continue".
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from swarm.models import StepRecord, ToolCall, ToolResult, Usage

INVALID = "invalid call:"  # prefix of the tool result that asks the model to fix a call


def calls_of(message: dict[str, Any] | None) -> list[ToolCall]:
    if not message:
        return []
    out = []
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function") or {}
        name, args = fn.get("name", ""), fn.get("arguments", "")
        out.append(ToolCall(id=tc.get("id", ""), name=name, arguments=args))
    return out


def call_key(call: ToolCall) -> str:
    """Identity of a call for the loop guard: name plus canonical arguments."""
    try:
        args = json.dumps(json.loads(call.arguments), sort_keys=True)
    except (json.JSONDecodeError, TypeError):
        args = call.arguments
    return f"{call.name}:{args}"


def tool_message(result: ToolResult) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": result.call_id, "content": result.content}


@dataclass
class Transcript:
    system: str
    task: str
    records: list[StepRecord] = field(default_factory=list)

    @property
    def next_n(self) -> int:
        return max((r.n for r in self.records), default=-1) + 1

    @property
    def steps_taken(self) -> int:
        # From usage, not from counting records: compaction folds old steps into a summary.
        return self.usage.steps

    @property
    def usage(self) -> Usage:
        total = Usage()
        for r in self.records:
            total = total + r.usage
        return total

    def pending_calls(self) -> list[ToolCall]:
        """Calls of the last model turn whose results were never recorded (a crash between)."""
        if not self.records or self.records[-1].kind != "assistant":
            return []
        return calls_of(self.records[-1].message)

    def last_message(self) -> dict[str, Any] | None:
        for r in reversed(self.records):
            if r.kind == "assistant":
                return r.message
        return None

    def call_counts(self) -> Counter[str]:
        return Counter(
            call_key(c) for r in self.records if r.kind == "assistant" for c in calls_of(r.message)
        )

    def bad_streak(self) -> int:
        """Consecutive most recent tool turns in which every call was rejected."""
        streak = 0
        for r in reversed(self.records):
            if r.kind != "tools":
                continue
            rejected = [x for x in r.results if x.content.startswith(INVALID)]
            if r.results and len(rejected) == len(r.results):
                streak += 1
            else:
                break
        return streak

    def messages(self) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.task},
        ]
        for r in self.records:
            if r.kind == "compaction":
                msgs.append(
                    {"role": "user", "content": f"Summary of your earlier steps:\n{r.summary}"}
                )
            elif r.kind == "assistant" and r.message is not None:
                msgs.append(r.message)
            elif r.kind == "tools":
                msgs.extend(tool_message(x) for x in r.results)
        return msgs

    def estimated_tokens(self) -> int:
        # ~4 characters a token is close enough to decide when to compact.
        return sum(len(json.dumps(m, ensure_ascii=False)) for m in self.messages()) // 4

    def compaction_split(self, keep: int) -> int:
        """Index into records before which everything can be summarised, keeping the last
        `keep` records and never separating a model turn from its tool results."""
        cut = max(0, len(self.records) - keep)
        while cut > 0 and self.records[cut].kind == "tools":
            cut -= 1
        return cut

    def render(self, records: list[StepRecord]) -> str:
        """Plain text of some records, for the summariser."""
        lines = []
        for r in records:
            if r.kind == "compaction":
                lines.append(f"(earlier summary) {r.summary}")
            elif r.kind == "assistant" and r.message:
                if r.message.get("content"):
                    lines.append(f"assistant: {r.message['content']}")
                lines.extend(f"call {c.name} {c.arguments[:500]}" for c in calls_of(r.message))
            elif r.kind == "tools":
                lines.extend(f"result {x.name}: {x.content[:1000]}" for x in r.results)
        return "\n".join(lines)
