"""Text synthesis: node summaries -> one answer to the goal, by a tree of merger calls.

Each call sees at most `fan_in` inputs of at most `max_chars_per_input` characters, so the
prompt size is bounded whatever the number of nodes. The model is reached through the
`ChatModel` Protocol (what `llm.LLM` provides), so this engine never imports openai.
"""

from __future__ import annotations

from typing import Any

from swarm.chat import ChatModel
from swarm.errors import UserError
from swarm.merge.reduce import reduce_levels, tree_reduce
from swarm.models import Usage

MIN_CHARS_PER_INPUT = 200  # below this a truncated input says nothing useful

_SYSTEM = """You are the merger of an agent swarm. Sub-agents each worked on part of one goal;
you combine their results into one synthesis.

Goal:
{goal}

Rules: keep every concrete finding, number, name, file and decision; drop repetition; say so
explicitly where inputs disagree; never invent anything the inputs do not contain. An input
marked as truncated was cut by swarm to fit, not by its author.

{task}"""

_FINAL_TASK = """This is the final merge: write the synthesis the user will read, as
well-structured Markdown that answers the goal."""

_PARTIAL_TASK = """This is an intermediate merge (level {level}): your text will be merged
with others later. Write at most {limit} characters, and keep node ids next to their findings."""


def clip(text: str, limit: int) -> str:
    """At most `limit` characters of `text`, saying in the text itself how much was cut."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:limit]}\n[truncated by swarm: {cut} of {len(text)} characters not shown]"


class TextMerger:
    def __init__(
        self,
        llm: ChatModel,
        *,
        fan_in: int = 8,
        max_chars_per_input: int = 6000,
        model: str | None = None,
    ) -> None:
        if fan_in < 2:
            raise UserError(f"merge fan-in must be at least 2, got {fan_in}")
        if max_chars_per_input < MIN_CHARS_PER_INPUT:
            raise UserError(
                f"max_chars_per_input must be at least {MIN_CHARS_PER_INPUT}, "
                f"got {max_chars_per_input}"
            )
        self.llm = llm
        self.fan_in = fan_in
        self.max_chars = max_chars_per_input
        self.model = model

    async def synthesize(
        self, run: str, goal: str, results: list[tuple[str, str]]
    ) -> tuple[str, Usage]:
        """One synthesis of (node id, summary) pairs, and the summed usage of every call.

        No results give "" and one result is returned as it is: neither needs a model call.
        """
        if not results:
            return "", Usage()
        if len(results) == 1:
            return results[0][1], Usage()
        levels = reduce_levels(len(results), self.fan_in)
        usages: dict[tuple[int, int], Usage] = {}

        async def combine(texts: list[str], level: int, index: int) -> str:
            final = level == levels - 1
            text, usage = await self._combine(run, goal, texts, level, index, final=final)
            usages[(level, index)] = usage
            return text

        leaves = [f"node {node}:\n{summary or '(no summary)'}" for node, summary in results]
        text = await tree_reduce(leaves, self.fan_in, combine)
        # Summed in (level, index) order so the float cost is the same whatever order the
        # concurrent calls finished in.
        total = sum((usages[key] for key in sorted(usages)), Usage())
        return text, total

    async def _combine(
        self, run: str, goal: str, texts: list[str], level: int, index: int, *, final: bool
    ) -> tuple[str, Usage]:
        node = f"merge:L{level}:{index}"
        reply = await self.llm.chat(
            "merger", self._messages(goal, texts, level, final), None,
            run=run, node=node, model=self.model,
        )
        usage = getattr(reply, "usage", None)
        content = getattr(reply, "content", None)
        if not content or not content.strip():
            # One empty answer must not sink a whole run's deliverable: pass the inputs up,
            # labelled, and let the next level (or the reader) deal with them.
            content = f"[merger {node} returned no text; its inputs follow unmerged]\n\n" + (
                "\n\n".join(clip(t, self.max_chars) for t in texts)
            )
        return content, usage if isinstance(usage, Usage) else Usage()

    def _messages(
        self, goal: str, texts: list[str], level: int, final: bool
    ) -> list[dict[str, Any]]:
        task = _FINAL_TASK if final else _PARTIAL_TASK.format(level=level, limit=self.max_chars)
        system = _SYSTEM.format(goal=clip(goal, self.max_chars), task=task)
        kind = "result" if level == 0 else "partial synthesis"
        # One level-1 heading per input: the separator a reader (and the simulator) splits on.
        parts = [
            f"# {kind} {i} of {len(texts)}\n\n{clip(text, self.max_chars)}"
            for i, text in enumerate(texts, 1)
        ]
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": "\n\n".join(parts)},
        ]
