"""A node's detail as markup: its state, errors and retries, sandbox, workspace files and the
transcript (model turns, tool calls and their output, cut where long). Pure: no I/O."""

from __future__ import annotations

import json
from typing import Any

from swarm.models import StepRecord
from swarm.tui.format import STATUS_STYLE, clock, escape, human_tokens
from swarm.tui.snapshot import COUNT_LABELS
from swarm.tui.source import NodeDetail

TEXT_LIMIT = 600
LINE_LIMIT = 14
MAX_RECORDS = 200
MAX_FILES_SHOWN = 60


def cut(text: str, limit: int = TEXT_LIMIT, lines: int = LINE_LIMIT) -> str:
    """`text` shortened to `limit` characters and `lines` lines, saying how much was cut."""
    kept = text.splitlines()
    short = "\n".join(kept[:lines])
    if len(short) > limit:
        short = short[:limit]
    if short != text:
        return f"{short}… [{len(text) - len(short)} more chars]"
    return text


def indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.splitlines() or [""])


def detail_markup(d: NodeDetail) -> str:
    return "\n".join([*_state(d), "", *_sandbox(d), "", *_files(d), "", *_transcript(d.steps)])


def _state(d: NodeDetail) -> list[str]:
    spec, st = d.spec, d.state
    title = escape(spec.title) if spec and spec.title else ""
    out = [f"[b]{escape(d.node_id)}[/]  {title}"]
    if st is None:
        out.append("[dim]no state yet (planned)[/]")
    else:
        style = STATUS_STYLE.get(st.status, "")
        limit = f"/{spec.limits.max_attempts}" if spec else ""
        out.append(
            f"status [{style}]{COUNT_LABELS[st.status]}[/]  attempt {st.attempt}{limit}  "
            f"steps {st.steps}  tokens {human_tokens(st.usage.tokens)}  "
            f"llm calls {st.usage.llm_calls}  cost ${st.usage.cost_usd:.4f}  "
            f"last activity {clock(st.updated_at)}")
        if st.error:
            out.append(f"[red]error:[/] {escape(cut(st.error, 400, 6))}")
        if st.result and st.result.summary:
            out.append(f"[green]result:[/] {escape(cut(st.result.summary, 400, 6))}")
    if spec:
        out.append(f"kind {spec.kind}  role {spec.role}  deps "
                   f"{escape(', '.join(spec.deps[:12]) or '-')}"
                   + (f" (+{len(spec.deps) - 12})" if len(spec.deps) > 12 else ""))
        if spec.instructions:
            out.append(f"[dim]instructions:[/] {escape(cut(spec.instructions, 300, 4))}")
    if d.history:
        out.append("[b]status changes[/] (errors and retries)")
        for ev in d.history:
            reason = f"  [red]{escape(cut(ev.reason, 200, 2))}[/]" if ev.reason else ""
            out.append(f"  {clock(ev.at)} {COUNT_LABELS[ev.status]} attempt {ev.attempt}{reason}")
    return out


def _sandbox(d: NodeDetail) -> list[str]:
    st, spec = d.state, d.spec
    worker = st.worker if st and st.worker else "-"
    network = "on" if spec and spec.network else "off"
    tools = ", ".join(spec.tools) if spec else "-"
    return ["[b]sandbox[/]",
            f"  backend {escape(d.sandbox)}  worker {escape(worker)}  network {network}",
            f"  tools {escape(tools)}"]


def _files(d: NodeDetail) -> list[str]:
    out = [f"[b]workspace[/] {escape(str(d.workspace))}"]
    if d.files is None:
        out.append("  [dim](not on this host, or not created yet)[/]")
        return out
    if not d.files:
        out.append("  [dim](empty)[/]")
    for path, size in d.files[:MAX_FILES_SHOWN]:
        out.append(f"  {escape(path)}  [dim]{size} B[/]")
    if len(d.files) > MAX_FILES_SHOWN:
        out.append(f"  [dim]… {len(d.files) - MAX_FILES_SHOWN} more files[/]")
    return out


def _transcript(steps: list[StepRecord]) -> list[str]:
    out = [f"[b]transcript[/] ({len(steps)} records)"]
    if not steps:
        out.append("  [dim](no steps yet)[/]")
    if len(steps) > MAX_RECORDS:
        out.append(f"  [dim]… {len(steps) - MAX_RECORDS} earlier records not shown[/]")
    for rec in steps[-MAX_RECORDS:]:
        out.extend(_record(rec))
    return out


def _record(rec: StepRecord) -> list[str]:
    if rec.kind == "compaction":
        return [f"[magenta]step {rec.n} · compaction of steps <{rec.upto}[/]",
                escape(indent(cut(rec.summary or "")))]
    if rec.kind == "tools":
        out = [f"[cyan]step {rec.n} · tool results[/]"]
        for r in rec.results:
            mark = "[green]ok[/]" if r.ok else "[red]failed[/]"
            out.append(f"  ← {escape(r.name)} {mark}")
            out.append(escape(indent(cut(r.content))))
        return out
    tokens = rec.usage.tokens_in + rec.usage.tokens_out
    out = [f"[yellow]step {rec.n} · model turn[/] [dim]{human_tokens(tokens)} tokens "
           f"{clock(rec.at)}[/]"]
    msg: dict[str, Any] = rec.message or {}
    if msg.get("reasoning_content"):
        out.append("  [dim]reasoning:[/]")
        out.append("[dim]" + escape(indent(cut(str(msg["reasoning_content"])))) + "[/]")
    if msg.get("content"):
        out.append(escape(indent(cut(str(msg["content"])))))
    for tc in msg.get("tool_calls") or []:
        fn = tc.get("function") or {}
        out.append(f"  → [b]{escape(str(fn.get('name', '?')))}[/] "
                   + escape(cut(_args(fn.get("arguments", "")), 400, 8)))
    return out


def _args(raw: Any) -> str:
    """Tool arguments as compact JSON where they parse (the model may send broken JSON)."""
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except (TypeError, ValueError):
        return str(raw)
