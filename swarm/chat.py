"""What engines need from the model client (llm.LLM provides it), so they never import
openai. The reply is an llm.ChatResult: `.message`, `.content`, `.tool_calls`, `.usage`."""

from __future__ import annotations

from typing import Any, Protocol


class ChatModel(Protocol):
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
    ) -> Any: ...
