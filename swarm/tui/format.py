"""Text for the watcher's header, counts, plan cells and event log. Pure: no I/O."""

from __future__ import annotations

import time

from textual.markup import escape as _escape

from swarm.models import (
    TERMINAL_RUN_STATUSES,
    Event,
    NodeStatus,
    NodeStatusChanged,
    RunRecord,
)
from swarm.tui.snapshot import COUNT_LABELS, NodeRow, Snapshot

STATUS_STYLE: dict[str, str] = {
    "pending": "dim",
    "queued": "cyan",
    "running": "bold yellow",
    "done": "green",
    "failed": "red",
    "retrying": "magenta",
    "dead": "bold red",
    "planning": "cyan",
    "merging": "bold cyan",
    "cancelled": "yellow",
    "budget_exhausted": "yellow",
}
INFINITY = "∞"


def escape(text: str) -> str:
    """Markup-safe text. A trailing backslash would escape the closing tag that follows."""
    return _escape(text + " " if text.endswith("\\") else text)


def human_tokens(n: int) -> str:
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def human_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


def budget_parts(run: RunRecord) -> list[str]:
    """Each budget as used/limit (∞ where the run has no limit)."""
    b, u = run.spec.budget, run.usage
    return [
        f"tokens {human_tokens(u.tokens)}/"
        f"{human_tokens(b.max_tokens) if b.max_tokens else INFINITY}",
        f"cost ${u.cost_usd:.4f}/" + (f"${b.max_cost_usd:.2f}" if b.max_cost_usd else INFINITY),
        f"wall {human_duration(run.elapsed_s)}/"
        + (human_duration(b.max_wall_s) if b.max_wall_s else INFINITY),
        f"steps {u.steps}/{b.max_steps or INFINITY}",
    ]


def header_markup(snap: Snapshot, connection: str = "") -> str:
    run = snap.run
    style = STATUS_STYLE.get(run.status, "")
    goal = " ".join(run.spec.goal.split())
    goal = goal if len(goal) <= 160 else goal[:159] + "…"
    state = f"[{style}]{run.status}[/]"
    if run.status in TERMINAL_RUN_STATUSES:
        state += " [dim](finished: viewing)[/]"
    if connection:
        state += f"  [bold reverse red] {escape(connection)} [/]"
    simulated = " [dim]\\[simulated][/]" if run.spec.simulate else ""
    lines = [
        f"[b]{escape(run.id)}[/]  {state}  elapsed [b]{human_duration(run.elapsed_s)}[/]  "
        f"tokens [b]{human_tokens(run.usage.tokens)}[/]  cost [b]${run.usage.cost_usd:.4f}[/]  "
        f"llm calls {run.usage.llm_calls}  plan rev {max(snap.revision, 0)}{simulated}",
        f"[dim]goal:[/] {escape(goal)}",
        "[dim]budget:[/] " + "  ·  ".join(budget_parts(run)),
    ]
    if run.error:
        lines.append(f"[red]reason:[/] {escape(run.error[:200])}")
    return "\n".join(lines)


def counts_markup(snap: Snapshot) -> str:
    """`total N = planned a + queued b + ...`: the same snapshot's rows, so they add up."""
    parts = []
    for status, label in COUNT_LABELS.items():
        n = snap.counts.get(status, 0)
        style = STATUS_STYLE[status] if n else "dim"
        parts.append(f"[{style}]{label} {n}[/]")
    return f"[b]total {snap.total}[/] = " + " + ".join(parts)


def counts_plain(snap: Snapshot) -> str:
    body = " + ".join(f"{label} {snap.counts.get(s, 0)}" for s, label in COUNT_LABELS.items())
    return f"total {snap.total} = {body}"


COLUMNS: tuple[tuple[str, str, int], ...] = (
    # key, label, width (the last column takes what is left)
    ("depth", "d", 3),
    ("id", "node", 26),
    ("status", "status", 14),
    ("role", "kind/role", 14),
    ("attempt", "try", 6),
    ("steps", "steps", 6),
    ("tokens", "tokens", 8),
    ("last", "activity", 10),
    ("title", "title", 0),
)


def row_cells(row: NodeRow) -> tuple[str, ...]:
    """Plain cell values, in COLUMNS order (compared to find what changed)."""
    kind_role = row.role if row.kind in ("agent", "?") else f"{row.kind}/{row.role}"
    return (
        "-" if row.depth < 0 else str(row.depth),
        row.id,
        COUNT_LABELS[row.status],
        kind_role,
        f"{row.attempt}/{row.max_attempts}" if row.max_attempts else str(row.attempt),
        str(row.steps),
        human_tokens(row.tokens),
        clock(row.updated_at),
        row.title,
    )


def status_of_label(label: str) -> NodeStatus | None:
    return next((s for s, lab in COUNT_LABELS.items() if lab == label), None)


def event_line(ev: Event) -> str:
    stamp = clock(ev.at)
    if isinstance(ev, NodeStatusChanged):
        reason = f"  {ev.reason}" if ev.reason else ""
        return (f"{stamp} {ev.node} -> {COUNT_LABELS[ev.status]} "
                f"(attempt {ev.attempt}){reason}")[:400]
    fields = ev.model_dump(exclude={"run", "at", "type"}, exclude_none=True)
    body = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"{stamp} {ev.type:<10} {body}"[:400]
