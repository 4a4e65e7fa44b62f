"""RESULT.md: what the run produced and what it cost, for a person to read.

Pure: text in, text out. Model output (synthesis, summaries, errors) goes into table cells
escaped, so a stray pipe or newline cannot break the table.
"""

from __future__ import annotations

from swarm.merge.conflicts import ConflictRecord
from swarm.merge.files import FileMergeReport, branch_name
from swarm.models import Model, NodeStatus, Usage

SIMULATED_BANNER = (
    "> **Produced with the swarm simulator: not real model output.** Every plan, answer and "
    "merge below is deterministic test text."
)
SUMMARY_CHARS = 160
ERROR_CHARS = 400


class NodeReportRow(Model):
    id: str
    title: str = ""
    status: NodeStatus
    attempts: int = 0
    steps: int = 0
    tokens: int = 0
    summary: str = ""
    error: str | None = None


def escape_cell(text: str) -> str:
    """One table cell: backslashes and pipes escaped, line breaks folded into spaces."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.split())


def first_line(text: str, limit: int) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def render_report(
    *,
    run_id: str,
    goal: str,
    status: str,
    synthesis: str,
    nodes: list[NodeReportRow],
    files: FileMergeReport | None,
    usage: Usage,
    elapsed_s: float,
    simulated: bool,
) -> str:
    parts = [f"# swarm run {run_id}"]
    if simulated:
        parts.append(SIMULATED_BANNER)
    parts += [
        _goal(goal, status),
        "## Synthesis\n\n" + (synthesis.strip() or "_No text results to synthesise._"),
        _nodes_table(nodes),
        _failures(nodes),
        _files(files),
        _usage(usage, elapsed_s),
    ]
    return "\n\n".join(parts) + "\n"


def _goal(goal: str, status: str) -> str:
    quoted = "\n".join(f"> {line}" for line in goal.strip().splitlines()) or "> (none)"
    return f"## Goal\n\n{quoted}\n\nStatus: **{escape_cell(status)}**"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _nodes_table(nodes: list[NodeReportRow]) -> str:
    if not nodes:
        return "## Nodes\n\n_No nodes ran._"
    rows = [
        [f"`{n.id}`", n.title, n.status, str(n.attempts), str(n.steps), f"{n.tokens:,}",
         first_line(n.summary, SUMMARY_CHARS)]
        for n in nodes
    ]
    header = ["node", "title", "status", "attempts", "steps", "tokens", "what it did"]
    return "## Nodes\n\n" + _table(header, rows)


def _failures(nodes: list[NodeReportRow]) -> str:
    troubled = [n for n in nodes if n.error or n.attempts > 1 or n.status in {"failed", "dead"}]
    if not troubled:
        return "## Failures and retries\n\nNone: every node finished on its first attempt."
    lines = []
    for n in troubled:
        error = escape_cell(first_line(n.error or "", ERROR_CHARS)) or "no error recorded"
        lines.append(f"- `{n.id}`: {n.status} after {n.attempts} attempt(s): {error}")
    return "## Failures and retries\n\n" + "\n".join(lines)


def _files(files: FileMergeReport | None) -> str:
    if files is None:
        return "## File merge\n\nNo file merge was made."
    branches = ", ".join(f"`{branch_name(n)}`" for n in files.merged) or "none"
    commit = f"`{files.commit}`" if files.commit else "none"
    parts = [
        f"Branches merged into `main`: {len(files.merged)} ({branches}).",
        f"Files in the result: {files.files}. Commit: {commit}.",
        _conflicts(files.conflicts),
    ]
    if files.skipped:
        parts.append("Not copied from workspaces:\n\n"
                     + "\n".join(f"- {escape_cell(s)}" for s in files.skipped))
    return "## File merge\n\n" + "\n\n".join(parts)


def _conflicts(conflicts: list[ConflictRecord]) -> str:
    if not conflicts:
        return "No conflicts."
    rows = [
        [f"`{c.node}`", ", ".join(c.files), "yes" if c.resolved else "no", c.how]
        for c in conflicts
    ]
    return "Conflicts:\n\n" + _table(["node", "files", "resolved", "how"], rows)


def _usage(usage: Usage, elapsed_s: float) -> str:
    header = ["tokens in", "tokens out", "LLM calls", "steps", "cost (USD)", "wall time"]
    row = [f"{usage.tokens_in:,}", f"{usage.tokens_out:,}", f"{usage.llm_calls:,}",
           f"{usage.steps:,}", f"${usage.cost_usd:.4f}", format_duration(elapsed_s)]
    return "## Usage and cost\n\n" + _table(header, [row])
